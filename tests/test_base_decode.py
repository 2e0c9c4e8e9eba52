"""The torch path's 4-bit decode (``fastlora.bases``) equals bitsandbytes' decode exactly.

The QLoRA layer tests bound fastlora's error by twice that of bitsandbytes' own Linear4bit
path, which on the CPU misdecodes quantization blocks that straddle rows (bitsandbytes 0.50,
see tests/qlora_helpers.py): on those shapes the bound is O(1) and a wrong decode would hide.
Here the yardstick is bitsandbytes' decode itself (its generic layout where its CPU kernel
is wrong), compared bit for bit: both are one fp32 product per element, rounded once.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fastlora import bases  # noqa: E402
from qlora_helpers import dequantized, params4bit  # noqa: E402

QUANT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.mark.parametrize("N, K, blocksize", [(7, 100, 64), (5, 96, 64), (6, 128, 64), (9, 48, 32)],
                         ids=["straddle-K100", "straddle-K96", "K128", "K48-bs32"])
@pytest.mark.parametrize("quant_type, nested", QUANT, ids=["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_dense_decode_equals_bitsandbytes(quant_type, nested, N, K, blocksize):
    g = torch.Generator().manual_seed(K)
    # blocks scaled far apart, so a wrong absmax index cannot hide
    W = (torch.randn(N, K, generator=g).reshape(-1) * torch.logspace(-2, 2, N * K)).reshape(N, K)
    w = params4bit(W, quant_type, nested, blocksize)
    want = dequantized(w)
    base = bases.base_of(w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(base.dense(dtype), want.to(dtype)), dtype
