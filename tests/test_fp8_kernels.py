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


# ------------------------------------------------------------------ routing on sm_90

from fastlora.kernels import lora_backward as _bwd_mod  # noqa: E402
from fastlora.kernels import lora_forward as _fwd_mod  # noqa: E402


def test_fused_loader_rules_follow_the_compiled_builds():
    """``fp8_fused_ok`` with the GPU tables: the loader runs only in builds the compile report
    holds spill-free (and, on sm_90, with the codes through TMA)."""
    ok = _fwd_mod.fp8_fused_ok
    gpu = {"interpreter": False}
    for kernel in ("forward", "dx"):
        assert ok(80, "16bit", 4096, 16, False, kernel, **gpu)  # sm_80: pointer build
        assert ok(90, "16bit", 4096, 64, True, kernel, **gpu)  # sm_90: TMA build
        assert not ok(90, "16bit", 4096, 64, False, kernel, **gpu)  # no sm_90 pointer build
        assert not ok(90, "16bit", 4104, 64, True, kernel, **gpu)  # K % 16: no 1-byte TMA
        for arch, tma in ((80, False), (90, True)):  # IEEE fp32: refused on every arch
            assert not ok(arch, "fp32", 4096, 16, tma, kernel, **gpu)
        assert ok(80, "tf32", 4096, 128, False, kernel, **gpu)
    assert ok(90, "tf32", 4096, 64, True, "dx", **gpu)
    assert not ok(90, "tf32", 4096, 128, True, "dx", **gpu)  # spills: decodes once
    assert ok(90, "tf32", 4096, 128, True, "forward", **gpu)


class _Spy:
    """Records the BASE of every forward / dx launch and each standalone FP8 decode."""

    def __init__(self, monkeypatch, arch):
        self.bases, self.decodes = [], 0
        for mod in (_fwd_mod, _bwd_mod):
            monkeypatch.setattr(mod, "current_device_info", lambda: (arch, 4))
            monkeypatch.setattr(mod, "launch", self._launch(mod.launch))
        real = dequant_fp8.dequantize_fp8

        def decode(*a, **k):
            self.decodes += 1
            return real(*a, **k)

        monkeypatch.setattr(dequant_fp8, "dequantize_fp8", decode)

    def _launch(self, real):
        def launch(spec, *a, **k):
            if "BASE" in spec.constexprs:
                self.bases.append(spec.constexprs["BASE"])
            return real(spec, *a, **k)

        return launch


def _check_against_float64(weight, x, dy, b, A, B, s, dtype, **kw):
    """Forward and backward through the launchers (``kw``: traceable, tma) against the
    float64 reference on the decoded weight."""
    base4 = bases.base_of(weight).kernel_args()
    seed = torch.zeros(1, dtype=torch.int64)
    y, u = _kernels.lora_forward(x, weight, b, A, B, s, 0.0, seed, base4=base4, **kw)
    dx, dA, dB = _kernels.lora_backward(dy, x, weight, A, B, u, s, 0.0, seed, base4=base4, **kw)
    W64 = decode64(weight, weight.fp8_scale_inv)
    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_reference(leaves[0], W64, b.double(), leaves[1], leaves[2], s)
    y64.backward(dy.double())
    same = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    yd = lora_linear_reference(same[0], W64.to(dtype), b, same[1], same[2], s)
    yd.backward(dy)
    assert_matches_reference(y, y64, yd, dtype, "y")
    for name, ours, want, plain in zip(("dx", "dA", "dB"), (dx, dA, dB), leaves, same):
        assert_matches_reference(ours, want.grad, plain.grad, dtype, name)


def _case(M, K, N, r, dtype, seed=7):
    weight = fp8_weight(N, K, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    b, A = torch.randn(N, generator=g), torch.randn(r, K, generator=g) * K**-0.5
    B = torch.randn(N, r, generator=g) * r**-0.5
    return weight, *(t.to(dtype) for t in (x, dy, b, A, B))


@pytest.mark.parametrize("case", ["odd-K", "unaligned-x", "traced"])
def test_sm90_calls_off_tma_decode_once_and_run_the_dense_kernels(monkeypatch, case):
    """On sm_90 the FP8 loader's pointer build is never launched: a K the 1-byte TMA cannot
    address, an x whose rows are not 16-byte aligned, or a torch.compile trace (the pointer
    builds) decode W once and run the dense kernels, with the reference's results."""
    dtype = torch.float16
    K = 136 if case == "odd-K" else 160  # 136 % 16 == 8: x's rows still TMA-aligned
    weight, x, dy, b, A, B = _case(33, K, 48, 4, dtype)
    if case == "unaligned-x":  # a column slice: row starts 2 bytes off 16
        x = torch.cat([torch.zeros(33, 1, dtype=dtype), x], 1)[:, 1:]
    spy = _Spy(monkeypatch, arch=90)
    _check_against_float64(weight, x, dy, b, A, B, 1.5, dtype, traceable=case == "traced")
    assert spy.decodes == 2  # forward and backward each decoded W once
    want = "dense" if case in ("traced", "unaligned-x") else "dense_tma"
    assert spy.bases == [want, want], spy.bases


def test_sm90_aligned_calls_load_the_codes_through_tma(monkeypatch):
    weight, x, dy, b, A, B = _case(33, 160, 48, 4, torch.float16)
    spy = _Spy(monkeypatch, arch=90)
    _check_against_float64(weight, x, dy, b, A, B, 1.5, torch.float16)
    assert spy.decodes == 0 and spy.bases == ["e4m3_tma", "e4m3_tma"]


def test_sm80_keeps_the_pointer_loader_for_any_k(monkeypatch):
    weight, x, dy, b, A, B = _case(21, 100, 40, 3, torch.float16)
    spy = _Spy(monkeypatch, arch=80)
    _check_against_float64(weight, x, dy, b, A, B, 0.5, torch.float16)
    assert spy.decodes == 0 and spy.bases == ["e4m3", "e4m3"]


def test_da_alone_over_fp8_plans_dense_tiles_with_the_gpu_tables(monkeypatch):
    """Without dx the dx kernel runs no W main loop: an FP8 call (even IEEE fp32, which has
    no FP8 tiles) plans the dense tiles instead of failing to find a config."""
    from fastlora.kernels import _configs

    monkeypatch.setattr(_configs, "interpreting", lambda: False)
    monkeypatch.setattr(_configs, "pick", _configs.pick.__wrapped__)  # no cached answers
    for esize, prec in ((4, "ieee"), (4, "tf32"), (2, "ieee")):
        for tma, base in ((False, "e4m3"), (True, "e4m3_tma")):
            _, dx_spec, *_ = _bwd_mod._plan.__wrapped__(
                256, 256, 256, 8, prec, esize, False, True, True, True, tma, 132, base,
                (128, 128))  # fmt: skip
            assert dx_spec.constexprs["COMPUTE_DX"] is False
            assert dx_spec.constexprs["BASE"] == base
