"""Dropout: PEFT's semantics (on the low-rank input only), seeded, exactly unbiased, one mask
per call shared by forward and backward, off in eval.

Yardsticks: closed-form statistics (bounds derived from the variance, Z standard deviations),
masks the test draws itself, the float64 reference, and directional derivatives. The Triton
mask (Philox) is checked against an independent Philox in tests/test_kernels.py.
"""

import math
from unittest import mock

import numpy as np
import pytest
import torch

import fastlora
from fastlora import torch_backend
from fastlora.dropout import (
    draw_packed_mask,
    keep_scale,
    pack_mask,
    unpack_mask,
    unpack_mask_into,
)
from fastlora.reference import lora_linear_reference
from helpers import make_inputs, max_err

# standard deviations a statistic may stray: P(|N(0,1)| > 5) = 6e-7 per check (and every
# check is seeded, so a pass is reproducible)
Z = 5.0
LEVELS = 2**16  # the torch backend's uniform resolution (docs/api.md: p rounded to 2**-16)
U64 = 2.0**-53  # float64 unit roundoff


def rounded_rate(p: float) -> float:
    """The drop rate the torch backend documents: p rounded to a multiple of 2**-16."""
    return round(p * LEVELS) / LEVELS


_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)


def count_kept(p: float, n: int, rows: int = 2048) -> int:
    """Kept elements among n = rows * cols draws of fastlora.dropout, in chunks of 2**24."""
    cols = 2**24 // rows
    total = 0
    for _ in range(n // (rows * cols)):
        total += int(_POPCOUNT[draw_packed_mask(rows, cols, p, torch.device("cpu")).long()].sum())
    return total


# ------------------------------------------------------------------ the mask (torch backend)


# Sizing: a rate q estimated from n draws has sigma = sqrt(q (1 - q) / n). To tell the drawn
# rate p_r from p itself, and from a threshold one level off, Z * sigma must stay below half
# of |p - p_r| and half of 2**-16: impossible at p = 0.1 in any affordable n (it needs
# n > 4e10), but at a rate of a few levels sigma shrinks with sqrt(q): n = 2**26 gives
# sigma = 4.8e-7 at q = 2**-16, so Z * sigma = 2.4e-6 < 2**-17 = 7.6e-6. Rates near 1 check
# the other end of the threshold (keep rate of a few levels).
RESOLVING = [1.45 / LEVELS, 1 - 1.45 / LEVELS]
N_RESOLVING = 2**26


@pytest.mark.parametrize("p", RESOLVING, ids=lambda p: f"p={p:.6g}")
def test_keep_rate_and_scale_resolve_the_rounding(p):
    p_r = rounded_rate(p)
    q = min(p_r, 1 - p_r)  # the rarer outcome sets sigma
    sigma = math.sqrt(q * (1 - q) / N_RESOLVING)
    # the sizing claim itself: the check separates p_r from p and from p_r +- one level
    assert Z * sigma < abs(p - p_r) / 2 and Z * sigma < 0.5 / LEVELS
    torch.manual_seed(0)
    kept = count_kept(p, N_RESOLVING)
    rate = kept / N_RESOLVING
    assert abs(rate - (1 - p_r)) <= Z * sigma, (rate, 1 - p_r, sigma)
    # exact unbiasedness: E[m * keep_scale(p)] = 1; keep_scale must use the drawn rate
    scale = keep_scale(p)
    mean = kept * scale / N_RESOLVING
    assert abs(mean - 1) <= Z * sigma * scale, (mean, sigma * scale)
    # and the same statistic would reject the unrounded factor 1 / (1 - p)
    assert abs(kept / (1 - p) / N_RESOLVING - 1) > Z * sigma * scale


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_at_common_rates(p):
    """n = 2**24: Z * sigma = 3.7e-4 at p = 0.1 (24 levels)."""
    n = 2**24
    p_r = rounded_rate(p)
    sigma = math.sqrt(p_r * (1 - p_r) / n)
    torch.manual_seed(1)
    kept = count_kept(p, n)
    assert abs(kept / n - (1 - p_r)) <= Z * sigma
    assert abs(kept * keep_scale(p) / n - 1) <= Z * sigma * keep_scale(p)


def test_mask_bits_are_independent():
    """Neighbours in a row share a 64-bit word (four 16-bit lanes) and a byte of the packed
    mask; rows are separate draws. At p = 1/2, P(m_ij == m_i'j') = 1/2 for distinct elements:
    the fraction of equal neighbours along columns (every lane pair) and rows is 1/2 +- Z sigma."""
    torch.manual_seed(2)
    rows, cols = 4096, 512
    keep = unpack_mask(draw_packed_mask(rows, cols, 0.5, torch.device("cpu")), cols)
    for a, b in [(keep[:, :-1], keep[:, 1:]), (keep[:, :-2], keep[:, 2:]),
                 (keep[:, :-3], keep[:, 3:]), (keep[:-1], keep[1:])]:
        n = a.numel()
        same = (a == b).double().mean().item()
        assert abs(same - 0.5) <= Z * math.sqrt(0.25 / n), same


def test_keep_scale_is_the_closed_form_of_the_drawn_rate():
    for p in [0.0, 0.1, 0.25, 0.5, *RESOLVING]:
        assert keep_scale(p) == LEVELS / (LEVELS - round(p * LEVELS))
    # where rounding matters, the plain 1 / (1 - p) is far off
    assert abs(keep_scale(RESOLVING[-1]) - 1 / (1 - RESOLVING[-1])) > 0.1 * keep_scale(RESOLVING[-1])


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_pack_unpack_against_numpy(cols):
    """The packed layout is numpy's little-endian packbits (bit j of byte c is column 8c + j)."""
    keep = torch.rand(5, -(-cols // 8) * 8, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_mask(keep)
    assert torch.equal(packed, torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little")))
    assert torch.equal(unpack_mask(packed, cols), keep[:, :cols])
    assert torch.equal(unpack_mask(packed, cols, torch.float32), keep[:, :cols].float())
    drawn = draw_packed_mask(3, cols, 0.5, torch.device("cpu"))
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, -(-cols // 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_unpack_into_a_buffer_is_unpack(cols, dtype):
    """The workspace form writes the same 0/1 values into the caller's (larger, dirty)
    buffer and returns a view of it."""
    keep = torch.rand(5, -(-cols // 8) * 8, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_mask(keep)
    buffer = torch.full((5 * 8 * -(-cols // 8) + 11,), 7.0, dtype=dtype)
    out = unpack_mask_into(packed, cols, buffer)
    assert out.shape == (5, cols) and out.dtype == dtype
    assert out.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(out, keep[:, :cols].to(dtype))


# ------------------------------------------------------------------ the layer, end to end


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_layer_output_is_unbiased(backend, device, p):
    """One input row repeated M times: every output row is an independent draw of the
    training output. Their mean must equal the eval output within Z standard deviations,
    from the closed-form variance: y_n = base_n + s sum_k x_k m_k / (1-p) C_nk with C = B A,
    so Var[y_n] = s^2 sum_k x_k^2 C_nk^2 p / (1-p) (p the drawn rate), and the mean of M rows
    has Var / M. Plus the floating-point error of the mean: at most that of one row, the
    accumulation bound (K + r + 2) u |.| of tests/test_properties.py."""
    interp = backend == "triton" and device.type == "cpu"
    M, K, N, r = (1024, 16, 8, 4) if interp else (2**14, 32, 8, 4)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, b, A, B = make_inputs(1, K, N, r, torch.float64, "cpu", seed=3)
    s = 1.5
    rows = x.expand(M, K)
    args = [t.to(device, dtype) for t in (w, b, A, B)]
    torch.manual_seed(4)
    y = fastlora.lora_linear(rows.to(device, dtype).contiguous(), *args[:1], args[1], *args[2:], s,
                             dropout_p=p, training=True).double().cpu()
    y_eval = lora_linear_reference(x, w, b, A, B, s)[0]
    p_r = rounded_rate(p) if backend == "torch" else p
    C = B @ A
    var = s**2 * (x[0] ** 2 * C**2).sum(1) * p_r / (1 - p_r)
    u = U64 if dtype == torch.float64 else 2.0**-24
    mag = w.abs() @ x[0].abs() + b.abs() + s * (B.abs() @ A.abs()) @ x[0].abs() / (1 - p_r)
    fp = (K + r + 2) * u * mag
    dev_ = (y.mean(0) - y_eval).abs()
    assert (dev_ <= Z * (var / M).sqrt() + fp).all(), (dev_, (var / M).sqrt())
    # the spread is the predicted one (a mask shared across rows, or none, would show here):
    # Var[sample variance] / Var^2 = 2 / (M - 1) + kurt / M, kurt the excess kurtosis of y_n,
    # sum_k a_k^4 kb / (sum_k a_k^2)^2 with a_k = x_k C_nk and kb = (1 - 6 p q) / (p q) that
    # of one Bernoulli(q = 1 - p)
    a2 = (x[0] ** 2 * C**2)
    kurt = (a2**2).sum(1) / a2.sum(1) ** 2 * (1 - 6 * p_r * (1 - p_r)) / (p_r * (1 - p_r))
    ratio = y.var(0) / var
    assert ((ratio - 1).abs() <= Z * (2 / (M - 1) + kurt / M).sqrt()).all(), ratio


def test_seed_reproduces_and_eval_turns_dropout_off(backend, device):
    x, w, b, A, B = make_inputs(32, 24, 16, 4, torch.float32, device)
    torch.manual_seed(7)
    y1 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    torch.manual_seed(7)
    y2 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    y3 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), 1.0)
    y_eval = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=False)
    assert max_err(y_eval, ref) < 1e-5
    assert max_err(y1, ref) > 1e-2  # dropout really acted in training


@pytest.mark.parametrize("p", [0.25, 1 - 1.45 / LEVELS])
def test_given_mask_matches_reference(p):
    """The test draws the keep mask and hands it to the torch backend packed (numpy's
    layout); forward and every gradient equal the float64 reference with that mask and the
    closed-form factor 1 / (1 - p_r), to float64 accumulation error."""
    M, K, N, r, s = 37, 40, 24, 5, 1.3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float64, "cpu")
    keep = torch.rand(M, K, generator=torch.Generator().manual_seed(8), dtype=torch.float64) >= 0.25
    packed = torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    with fastlora.use_backend("torch"), mock.patch.object(
        torch_backend, "draw_packed_mask", lambda *a: packed
    ):
        y = fastlora.lora_linear(xg, w, b, Ag, Bg, s, dropout_p=p, training=True)
    y.backward(dy)
    x64, A64, B64 = (t.clone().requires_grad_() for t in (x, A, B))
    ref = lora_linear_reference(x64, w, b, A64, B64, s, keep, rounded_rate(p))
    ref.backward(dy)
    tol = 64 * (K + N + M) * U64  # accumulation over at most K + N + M terms of size <= ~8
    for got, want in ((y, ref), (xg.grad, x64.grad), (Ag.grad, A64.grad), (Bg.grad, B64.grad)):
        assert max_err(got, want) <= tol * max(1.0, want.abs().max().item())


def test_interleaved_calls_keep_their_own_masks():
    """The torch backend forms the unpacked mask and x * mask in one scratch buffer reused by
    every call. Two dropout layers run forward, forward, then backward in reverse order (as
    autograd does), with K growing so the second call also regrows the buffer: each call's
    output and gradients equal the float64 reference with the mask the test handed it."""
    shapes = [(29, 16, 12), (29, 44, 9)]  # (M, K, N): K not a multiple of 8 in the second
    p, s, r = 0.3, 0.7, 4
    cases = []
    for i, (M, K, N) in enumerate(shapes):
        x, w, b, A, B = make_inputs(M, K, N, r, torch.float64, "cpu", seed=10 + i)
        keep = torch.rand(M, K, generator=torch.Generator().manual_seed(20 + i),
                          dtype=torch.float64) >= p
        packed = torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(30 + i), dtype=torch.float64)
        cases.append((x, w, b, A, B, keep, packed, dy))
    outs = []
    with fastlora.use_backend("torch"):
        for x, w, b, A, B, keep, packed, dy in cases:
            leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            with mock.patch.object(torch_backend, "draw_packed_mask", lambda *a, _p=packed: _p):
                outs.append((leaves, fastlora.lora_linear(leaves[0], w, b, leaves[1], leaves[2], s,
                                                          dropout_p=p, training=True)))
        for (leaves, y), case in reversed(list(zip(outs, cases))):
            y.backward(case[-1])
    for (leaves, y), (x, w, b, A, B, keep, packed, dy) in zip(outs, cases):
        ref_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        ref = lora_linear_reference(ref_leaves[0], w, b, ref_leaves[1], ref_leaves[2], s, keep,
                                    rounded_rate(p))
        ref.backward(dy)
        M, K = x.shape
        tol = 64 * (K + dy.shape[1] + M) * U64
        for got, want in [(y, ref)] + [(a.grad, c.grad) for a, c in zip(leaves, ref_leaves)]:
            assert max_err(got, want) <= tol * max(1.0, want.abs().max().item())


def test_backward_uses_the_forward_mask(backend, device):
    """Under a fixed seed the layer is linear in x, A and B separately, so the central
    difference (f(t + v) - f(t - v)) / 2 is J v exactly up to rounding; the backward's
    vector-Jacobian product must agree: <dy, J v> == <J^T dy, v>. A backward with another
    mask (or none) breaks this by O(1). Rounding: each side is a sum of |dy| or |v| times
    entries with the accumulation bound (length + 2) u |magnitude|, evaluated below."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    u = 2.0**-24 if dtype == torch.float32 else U64
    M, K, N, r, s, p = 24, 20, 12, 5, 1.3, 0.3
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, device)
    dy = make_inputs(M, N, 1, 1, dtype, device, seed=1)[0]
    gen = torch.Generator().manual_seed(2)

    def f(xx, AA, BB):
        torch.manual_seed(99)
        return fastlora.lora_linear(xx, w, b, AA, BB, s, dropout_p=p, training=True)

    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    grads = torch.autograd.grad(f(*leaves), leaves, dy)
    a64 = [t.double().abs() for t in (x, w, A, B, dy)]
    for i, g in enumerate(grads):
        v = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        plus, minus = [x, A, B], [x, A, B]
        plus[i], minus[i] = plus[i] + v, plus[i] - v
        fd = ((f(*plus).double() - f(*minus).double()) * dy.double()).sum() / 2
        vjp = (g.double() * v.double()).sum()
        # |y| magnitudes at t +- v, scaled by 1/(1-p) on the low-rank side
        mags = [t.clone() for t in a64[:4]]
        mags[(0, 2, 3)[i]] = mags[(0, 2, 3)[i]] + v.double().abs()
        xa, wa, Aa, Ba, dya = mags + [a64[4]]
        mag_y = xa @ wa.t() + s / (1 - p) * (xa @ Aa.t()) @ Ba.t() + b.double().abs()
        bound = (dya * mag_y).sum() * (K + r + 2) * u * 2
        bound += (v.double().abs() * g.double().abs()).sum() * (max(M, N, K) + r + 2) * u * 4
        assert abs(fd - vjp) <= bound, (i, fd.item(), vjp.item(), bound.item())


def test_gradcheck_with_dropout_under_fixed_seed():
    """float64 gradcheck of the torch backend with dropout: re-seeding before every call fixes
    the mask, so the op is a smooth function of (x, A, B)."""
    with fastlora.use_backend("torch"):
        x, w, b, A, B = make_inputs(6, 10, 7, 3, torch.float64, "cpu")

        def f(x, A, B):
            torch.manual_seed(1234)
            return fastlora.lora_linear(x, w, b, A, B, 0.7, dropout_p=0.4, training=True)

        inputs = tuple(t.clone().requires_grad_() for t in (x, A, B))
        assert torch.autograd.gradcheck(f, inputs)


def test_empty_batch_with_dropout(backend, device):
    x, w, b, A, B = make_inputs(0, 12, 8, 2, torch.float32, device, lead=(3,))
    x.requires_grad_()
    y = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.2, training=True)
    assert y.shape == (3, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
