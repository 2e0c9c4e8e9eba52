"""QLoRA paths a user hits that the small shapes elsewhere miss: a double-quantized weight with
more than 256 absmax blocks (so the second-level scale index is not always 0), and a 4-bit
layer with dropout in eval mode.

Yardstick: the float64 reference on ``qlora_helpers.decode64`` (the test's own NF4/FP4 tables
and double-quantization formula); the error budget is twice that of the same reference run in
the compute dtype on that weight rounded to it, plus ATOL (helpers.assert_matches_reference)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

import fastlora  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402
from helpers import assert_matches_reference, compute_dtypes  # noqa: E402
from qlora_helpers import decode64, linear4bit, params4bit  # noqa: E402


def _grads(fn, x, A, B, dy):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = fn(x, A, B)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B), dy.to(y.dtype)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nested_quant_with_more_than_256_absmax_blocks(backend, device, quant_type):
    """N=64, K=512, blocksize 64: 512 absmax blocks, two second-level (nested) blocks whose
    scales differ by 100x, so a kernel that reads only the first nested scale is far off."""
    N, K, M, r, s = 64, 512, 5, 4, 1.5
    g = torch.Generator().manual_seed(0)
    rows = torch.logspace(-1, 1, N, dtype=torch.float64)[:, None]  # later rows 100x larger
    W = (torch.randn(N, K, generator=g, dtype=torch.float64) * rows * K**-0.5).float()
    w = params4bit(W.to(device), quant_type, nested=True, blocksize=64)
    assert w.quant_state.absmax.numel() == 512 and w.quant_state.state2.absmax.numel() == 2
    W64 = decode64(w)
    assert (W64 - W.double().to(device)).abs().max() < 0.2 * W.abs().max()  # the decode is sane
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(device)
    A = (torch.randn(r, K, generator=g, dtype=torch.float64) * K**-0.5).to(device)
    B = (torch.randn(N, r, generator=g, dtype=torch.float64) * r**-0.5).to(device)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(device)
    truth = _grads(lambda x, A, B: lora_linear_reference(x, W64, None, A, B, s), x, A, B, dy)
    for dtype in [d for d in compute_dtypes(backend) if d != torch.float64]:
        got = _grads(lambda x, A, B: fastlora.lora_linear(x, w, None, A, B, s),
                     *(t.to(dtype) for t in (x, A, B)), dy)
        Wd = W64.to(dtype)
        same = _grads(lambda x, A, B: lora_linear_reference(x, Wd, None, A, B, s),
                      *(t.to(dtype) for t in (x, A, B)), dy)
        for name, o, t, sd in zip(("y", "dx", "dA", "dB"), got, truth, same):
            assert_matches_reference(o, t, sd, dtype, f"{name} {dtype}")


def test_eval_mode_turns_dropout_off_on_a_4bit_layer(backend, device):
    """``lora_dropout=0.5`` in eval: deterministic, equal to the reference without dropout;
    in train mode two seeds differ (the control: dropout is really configured)."""
    lin = linear4bit(64, 24, "nf4", nested=True, blocksize=64, device=device)
    layer = fastlora.FastLoRALinear.from_linear(lin, r=4, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2)).to(device)
    layer.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        y1 = layer(x)
        torch.manual_seed(2)
        y2 = layer(x)
        want = lora_linear_reference(x.double(), decode64(lin.weight), lin.bias.double(),
                                     layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
        same = lora_linear_reference(x, decode64(lin.weight).float(), lin.bias.float(),
                                     layer.lora_A.float(), layer.lora_B.float(), layer.scaling)
    assert torch.equal(y1, y2), "eval output depends on the seed: dropout is on"
    assert_matches_reference(y1, want, same, torch.float32, "eval y")
    layer.train()
    with torch.no_grad():
        torch.manual_seed(1)
        t1 = layer(x)
        torch.manual_seed(2)
        assert not torch.equal(t1, layer(x))
