"""Shared by the QLoRA tests: bitsandbytes 4-bit weights and layers, and the yardstick
decode of a 4-bit weight (bitsandbytes' own dequantize_4bit)."""

from __future__ import annotations

import torch
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF


def params4bit(W: torch.Tensor, quant_type: str, nested: bool, blocksize: int) -> nn.Parameter:
    """bitsandbytes quantizes ``W`` [N, K] (its dtype becomes quant_state.dtype)."""
    return bnb.nn.Params4bit(
        W.detach().clone(), requires_grad=False, blocksize=blocksize,
        compress_statistics=nested, quant_type=quant_type,
    ).to(W.device)  # fmt: skip


def linear4bit(
    K: int,
    N: int,
    quant_type: str = "nf4",
    nested: bool = True,
    blocksize: int = 64,
    bias: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    quant_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> "bnb.nn.Linear4bit":
    """A quantized ``Linear4bit`` [N, K] on ``device`` from a seeded ``nn.Linear``."""
    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    lin = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype,
                            compress_statistics=nested, quant_type=quant_type)  # fmt: skip
    lin.weight = bnb.nn.Params4bit(
        dense.weight.data.to(quant_dtype), requires_grad=False, blocksize=blocksize,
        compress_statistics=nested, quant_type=quant_type, module=lin,
    )  # fmt: skip
    if bias:
        lin.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return lin.to(device)  # bitsandbytes quantizes on the move to a device


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] in float32 as bitsandbytes decodes it.

    ``bitsandbytes.functional.dequantize_4bit`` where that is right; bitsandbytes 0.50's
    AVX512 CPU kernel misdecodes blocks that straddle rows (K not a multiple of blocksize),
    so those shapes take bitsandbytes' generic decode (the CUDA layout), written out here:
    code table ``quant_state.code`` indexed by the nibbles, high nibble first, times the
    absmax of each run of ``blocksize`` elements of the flattened weight."""
    qs = weight.quant_state
    N, K = qs.shape
    if K % qs.blocksize == 0:
        return bnbF.dequantize_4bit(weight.data, qs).float()
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    packed = weight.data.reshape(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[: N * K]
    scale = absmax.float().repeat_interleave(qs.blocksize)[: N * K]
    return (qs.code.float()[codes.long()] * scale).reshape(N, K)


# The 4-bit code tables written out here, not read from bitsandbytes: NF4 (the QLoRA paper's
# normal-float quantiles, as bitsandbytes stores them) and bitsandbytes' FP4 (sign bit 8; the
# magnitudes of codes 0-7 as exact fractions).
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25)
FP4_TABLE = _FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES)


def decode64(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] in float64 from the packed codes, independently of bitsandbytes' decoders:
    ``table[code(i)] * absmax[i // blocksize]`` over the flat index (high nibble first), and
    under double quantization ``absmax[j] = code2[q[j]] * absmax2[j // nested_blocksize] +
    offset`` with the 8-bit table ``code2`` that the quant state carries."""
    qs = weight.quant_state
    N, K = qs.shape
    table = torch.tensor(NF4_TABLE if qs.quant_type == "nf4" else FP4_TABLE, dtype=torch.float64)
    if qs.nested:
        s2 = qs.state2
        j = torch.arange(qs.absmax.numel())
        absmax = (s2.code.double()[qs.absmax.long()] * s2.absmax.double()[j // s2.blocksize]
                  + float(qs.offset))
    else:
        absmax = qs.absmax.double()
    packed = weight.data.reshape(-1).view(torch.uint8).cpu()
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[: N * K].long()
    scale = absmax.cpu().repeat_interleave(qs.blocksize)[: N * K]
    return (table[codes] * scale).reshape(N, K).to(weight.device)
