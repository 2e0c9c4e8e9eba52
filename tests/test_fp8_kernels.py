"""The Triton FP8 loader under the interpreter (the real @triton.jit code on CPU tensors):
the standalone decode against the float64 table of test_fp8, and the fused forward and dx
mainloops (pointer and TMA loads) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_matches_reference, triton_runs_here

if not triton_runs_here():
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastlora import bases, fp8  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402
from test_fp8 import TABLE, decode64, fp8_weight, random_fp8  # noqa: E402

_kernels = pytest.importorskip("fastlora.kernels.api")
from fastlora.kernels import dequant_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_code_decodes_as_the_table(dtype):
    codes = torch.arange(256, dtype=torch.uint8).reshape(2, 128).to(DEVICE)
    W = dequant_fp8.dequantize_fp8(codes, torch.ones(1, 1, device=DEVICE), (128, 128), dtype)
    want = TABLE.reshape(2, 128).to(dtype)
    assert torch.equal(W.isnan().cpu(), want.isnan())
    assert torch.equal(W.cpu().nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("shape,block", [((70, 300), (128, 128)), ((45, 70), (16, 32))],
                         ids=["row-scale", "gathered-scale"])
def test_decode_kernel_matches_float64(shape, block):
    codes, scale = random_fp8(*shape, block, seed=shape[1], nan=True)
    W = dequant_fp8.dequantize_fp8(codes.view(torch.uint8).to(DEVICE), scale.to(DEVICE), block,
                                   torch.float32)  # fmt: skip
    want = decode64(codes, scale, block).float()
    assert torch.equal(W.isnan().cpu(), want.isnan())
    assert torch.equal(W.cpu().nan_to_num(), want.nan_to_num())


def _launch(x, weight, b, A, B, s, p, seed, dy, tma):
    base4 = bases.base_of(weight).kernel_args() if bases.is_fp8(weight) else None
    y, u = _kernels.lora_forward(x, weight, b, A, B, s, p, seed, tma=tma, base4=base4)
    dx, dA, dB = _kernels.lora_backward(dy, x, weight, A, B, u, s, p, seed, tma=tma, base4=base4)
    return y, dx, dA, dB


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_forward_and_dx_match_float64(dtype, tma):
    M, K, N, r, s = 33, 160, 136, 4, 1.5  # K % 16 == 0 (TMA), N and K cross a scale block
    weight = fp8_weight(N, K, seed=2)
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    b, A = torch.randn(N, generator=g), torch.randn(r, K, generator=g) * K**-0.5
    B = torch.randn(N, r, generator=g) * r**-0.5
    seed = torch.zeros(1, dtype=torch.int64)
    y, dx, dA, dB = _launch(x.to(dtype), weight, b.to(dtype), A.to(dtype), B.to(dtype), s, 0.0,
                            seed, dy.to(dtype), tma)  # fmt: skip
    W64 = decode64(weight, weight.fp8_scale_inv)
    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_reference(leaves[0], W64, b.double(), leaves[1], leaves[2], s)
    y64.backward(dy.double())
    same = [t.to(dtype).requires_grad_() for t in (x, A, B)]
    yd = lora_linear_reference(same[0], W64.to(dtype), b.to(dtype), same[1], same[2], s)
    yd.backward(dy.to(dtype))
    assert_matches_reference(y, y64, yd, dtype, "y")
    for name, ours, want, plain in zip(("dx", "dA", "dB"), (dx, dA, dB), leaves, same):
        assert_matches_reference(ours, want.grad, plain.grad, dtype, name)


def test_fused_dropout_equals_the_dense_kernels_on_the_decoded_weight():
    M, K, N, r = 17, 96, 40, 3
    weight = fp8_weight(N, K, block=(16, 32), seed=4)
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    A, B = torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g) * 0.5
    seed = torch.tensor([1234], dtype=torch.int64)
    ours = _launch(x, weight, None, A, B, 2.0, 0.3, seed, dy, False)
    dense = _launch(x, decode64(weight, weight.fp8_scale_inv, (16, 32)).float(), None, A, B, 2.0,
                    0.3, seed, dy, False)  # fmt: skip
    for a, d in zip(ours, dense):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-5)


def test_fp8_is_fused_for_any_k():
    weight = fp8_weight(8, 100, seed=6)
    assert _kernels.fused_4bit_ok(100, bases.base_of(weight).kernel_args())
    assert fp8.E4M3 == weight.dtype
