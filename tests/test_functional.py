"""lora_linear against the float64 reference, on every backend that runs here."""

import math

import pytest
import torch

import fastlora
from fastlora.reference import lora_linear_reference
from helpers import (
    assert_matches_reference,
    compute_dtypes,
    half_ulp,
    make_inputs,
    max_err,
    reference_grads,
)

# (M, K, N, r): odd on purpose: r = 1, r not a power of two, r > min(K, N),
# K and N not multiples of 16, M = 0 and 1
SHAPES = [
    (1, 8, 8, 1),
    (0, 24, 40, 4),
    (37, 40, 72, 3),
    (64, 72, 40, 20),
    (33, 17, 9, 16),  # r > min(K, N)
    (130, 96, 136, 8),
]
SHAPE_IDS = [f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES]


def _dtypes_for(backend):
    return compute_dtypes(backend)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_and_grads_match_reference(backend, shape, bias, device):
    M, K, N, r = shape
    scaling = 2.0 / r
    for dtype in _dtypes_for(backend):
        x, w, b, A, B = make_inputs(M, K, N, r, dtype, device, bias=bias)
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        # float64 truth and plain PyTorch in the same dtype
        d64 = [t.double() if t is not None else None for t in (x, w, b, A, B)]
        truth = reference_grads(*d64, scaling, dy.to(device))
        same = reference_grads(x, w, b, A, B, scaling, dy.to(device, dtype))

        xg = x.clone().requires_grad_()
        Ag = A.clone().requires_grad_()
        Bg = B.clone().requires_grad_()
        y = fastlora.lora_linear(xg, w, b, Ag, Bg, scaling)
        assert y.dtype == dtype and y.shape == (M, N)
        y.backward(dy.to(device, dtype))
        for name, got, t64, td in zip(("y", "dx", "dA", "dB"), (y, xg.grad, Ag.grad, Bg.grad), truth, same):
            assert_matches_reference(got, t64, td, dtype, f"{name} ({backend}, {dtype})")


def test_rslora_scaling_is_used(backend, device):
    x, w, b, A, B = make_inputs(16, 24, 20, 4, torch.float32, device)
    s = 8 / math.sqrt(4)
    y = fastlora.lora_linear(x, w, b, A, B, s)
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), s)
    assert max_err(y, ref) < 1e-4


@pytest.mark.parametrize("lead", [(2, 3), (5,), ()], ids=["lead2x3", "lead5", "2d"])
def test_leading_dims_and_strides(backend, lead, device):
    dtype = torch.float32
    K, N, r = 24, 40, 4
    x, w, b, A, B = make_inputs(7, K, N, r, dtype, device, lead=lead)
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), 0.5)
    y = fastlora.lora_linear(x, w, b, A, B, 0.5)
    assert y.shape == (*lead, 7, N)
    assert max_err(y, ref) < 1e-4
    # transposed and sliced views of x give the same numbers as the contiguous tensor
    xt = x.reshape(-1, K).t().contiguous().t()
    assert not xt.is_contiguous()
    assert max_err(fastlora.lora_linear(xt, w, b, A, B, 0.5), ref.reshape(-1, N)) < 1e-4
    xs = torch.cat([x.reshape(-1, K), x.reshape(-1, K)], dim=1)[:, ::2]
    assert max_err(fastlora.lora_linear(xs, w, b, A, B, 0.5), lora_linear_reference(
        xs.double(), w.double(), b.double(), A.double(), B.double(), 0.5)) < 1e-4


def test_zero_B_equals_base(backend, device):
    x, w, b, A, B = make_inputs(9, 16, 12, 4, torch.float32, device)
    y = fastlora.lora_linear(x, w, b, A, torch.zeros_like(B), 3.0)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))


def test_nan_propagates_like_linear(backend, device):
    x, w, b, A, B = make_inputs(4, 16, 8, 2, torch.float32, device)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = fastlora.lora_linear(x, w, b, A, B, 1.0)
    plain = torch.nn.functional.linear(x, w, b)
    assert torch.equal(torch.isfinite(y), torch.isfinite(plain))
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def _low_dtype(backend: str) -> torch.dtype:
    # bf16 tl.dot is wrong under Triton 3.9's interpreter: fp16 there
    return torch.float16 if backend == "triton" and not torch.cuda.is_available() else torch.bfloat16


def test_mixed_precision_adapters_get_grads_in_their_dtype(backend, device):
    """fp32 LoRA factors beside an fp16/bf16 base (PEFT's default): compute in x's dtype,
    gradients in each parameter's dtype, within twice the error of plain PyTorch doing the
    same in the low dtype (factors cast to it), against the float64 reference."""
    low = _low_dtype(backend)
    x, w, b, A, B = make_inputs(20, 32, 24, 4, torch.float32, device)
    A = A.clone().requires_grad_()
    B = B.clone().requires_grad_()
    xl = x.to(low).requires_grad_()
    y = fastlora.lora_linear(xl, w.to(low), b.to(low), A, B, 2.0)
    assert y.dtype == low
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert xl.grad.dtype == low
    dy = torch.ones(20, 24, dtype=torch.float64, device=device)
    _, _, dA, dB = reference_grads(xl.detach().double(), w.to(low).double(), b.to(low).double(),
                                   A.double(), B.double(), 2.0, dy)
    _, _, dA_low, dB_low = reference_grads(xl.detach(), w.to(low), b.to(low), A.detach().to(low),
                                           B.detach().to(low), 2.0, dy.to(low))
    assert_matches_reference(A.grad, dA, dA_low, low, "dA")
    assert_matches_reference(B.grad, dB, dB_low, low, "dB")


def test_mixed_precision_grads_are_exact_up_to_one_rounding(backend, device):
    """Data chosen so that every cast and every intermediate the low-precision path stores is
    exact; then A.grad and B.grad may differ from the exact value by at most the rounding of
    the result itself to the low dtype (half an ulp there), and are exact in float32.

    Derivation (K = 32, M = 20, N = 24, s = 2, dy = 1, entries of x in {-1, 0, 1}, of A and
    B in {-1/4, 0, 1/4}; the low dtype has p = 8 (bf16) or 11 (fp16) significant bits, so it
    holds every multiple of 1/2 up to 2**(p-1) in magnitude, and fp32 accumulators are exact
    for sums of at most 2**23 such terms):
      s*A, s*B, A, B: multiples of 1/4 of magnitude <= 1/2, exact in any float dtype;
      u = x (sA)^T: K terms of |.| <= 1/2, so |u| <= 16 and u is a multiple of 1/2: exact;
      dy B (and s dy B): N terms of |.| <= 1/4 (1/2), so |.| <= 12 and a multiple of 1/4: exact;
      dB = dy^T u: M terms, |dB| <= 320; dA = g^T x: M terms, |dA| <= 240: both multiples of
      1/2, exact in the fp32 accumulator, at most one rounding when stored in the low dtype."""
    low = _low_dtype(backend)
    M, K, N, r, s = 20, 32, 24, 4, 2.0
    g = torch.Generator().manual_seed(11)
    ternary = lambda *shape: torch.randint(-1, 2, shape, generator=g).double()  # noqa: E731
    x, A, B = ternary(M, K), ternary(r, K) / 4, ternary(N, r) / 4
    w, b = ternary(N, K) / 4, ternary(N) / 4
    A32 = A.float().to(device).requires_grad_()
    B32 = B.float().to(device).requires_grad_()
    xl = x.to(device=device, dtype=low)
    y = fastlora.lora_linear(xl, w.to(device, low), b.to(device, low), A32, B32, s)
    y.float().sum().backward()
    dy = torch.ones(M, N, dtype=torch.float64)
    dA = s * (dy @ B).t() @ x  # exact in float64: small multiples of 1/4
    dB = dy.t() @ (s * x @ A.t())
    for name, got, exact in (("dA", A32.grad, dA), ("dB", B32.grad, dB)):
        assert got.dtype == torch.float32, name
        err = (got.double().cpu() - exact).abs()
        bound = half_ulp(exact, low)
        assert (err <= bound).all(), f"{name}: error {err.max():.3e} beyond one rounding to {low}"


def test_frozen_inputs_get_no_grad_and_unfrozen_base_gets_exact_grads(backend, device):
    x, w, b, A, B = make_inputs(11, 16, 12, 3, torch.float32, device)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    Ag = A.clone().requires_grad_()
    y = fastlora.lora_linear(x, wg, bg, Ag, B, 1.5)  # x and B need no grad
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad is None and B.grad is None
    d64 = [t.double() for t in (x, w, b, A, B)]
    w64, b64 = d64[1].requires_grad_(), d64[2].requires_grad_()
    lora_linear_reference(d64[0], w64, b64, d64[3], d64[4], 1.5).backward(dy.double())
    assert max_err(wg.grad, w64.grad) < 1e-4
    assert max_err(bg.grad, b64.grad) < 1e-4


def test_non_contiguous_output_gradient(backend, device):
    """dy arrives transposed (a downstream .t()): the backward reads it through its strides."""
    x, w, b, A, B = make_inputs(19, 24, 40, 3, torch.float32, device)
    dy = torch.randn(40, 19, device=device).t()
    assert not dy.is_contiguous()
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    fastlora.lora_linear(xg, w, b, Ag, Bg, 1.5).backward(dy)
    truth = reference_grads(*(t.double() for t in (x, w, b, A, B)), 1.5, dy.double())
    for got, want in zip((xg.grad, Ag.grad, Bg.grad), truth[1:]):
        assert max_err(got, want) < 1e-4


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_tensor_hooks_see_every_saved_byte(backend, p):
    """Beyond x and the parameters, a training call saves u [M, r] and the dropout state (the
    torch path's packed bits, the Triton path's int64 seed), all through save_for_backward,
    so saved-tensor hooks (offloading, checkpointing, memory accounting) see each byte."""
    from benchmarks.memory import saved_bytes

    M, K, N, r = 12, 40, 24, 4
    layer = fastlora.FastLoRALinear(K, N, r=r, lora_alpha=8, lora_dropout=p).train()
    x = torch.randn(M, K, requires_grad=True)
    state = 0 if p == 0 else (M * math.ceil(K / 8) if backend == "torch" else 8)
    if backend == "triton" and p == 0:
        state = 8  # the unread seed placeholder is saved too: one int64
    assert saved_bytes(layer, x)["extra"] == M * r * 4 + state
