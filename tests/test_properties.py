"""Property-based tests: random shapes, strides, dtypes, bias, dropout, train/eval and
requires_grad combinations, every backend against the float64 reference.

Tolerances come from the accumulation length, not from the case: a length-n dot product in
fp32 accumulation is off by at most n * 2**-24 times the dot product of the magnitudes
(the classic gamma_n bound), and each store in a narrow dtype adds one rounding of its
unit roundoff. The bound is evaluated elementwise from |x|, |W|, |A|, |B|, |dy|.

Dropout has its own half of the cases (so the fixed "ci" profile of tests/conftest.py always
gives each backend dropout cases). The yardstick's mask never comes from the code under test
with its scale: on the torch backend the test draws the keep mask itself and hands it in
packed (bit j of byte c is column 8c + j, the documented layout); on the Triton backend the
kernels draw it from Philox, the test reads only which elements were dropped (test_kernels
checks that pattern against an independent Philox), and the 1/(1-p) factor is the closed form
of the documented rate in both cases.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastlora
from fastlora import torch_backend
from fastlora.reference import lora_linear_reference
from helpers import available_backends, compute_dtypes

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}
ACC_ROUNDOFF = 2.0**-24  # every backend accumulates in fp32 (fp64 for float64 inputs)


def _bound(mag: torch.Tensor, n: int, dtype: torch.dtype, stored: torch.Tensor) -> torch.Tensor:
    acc = UNIT_ROUNDOFF[torch.float64] if dtype == torch.float64 else ACC_ROUNDOFF
    # accumulation error + rounding of the stored inputs/intermediates/output; the factor 4
    # covers the few separate roundings (u, the product, the store) each bounded by one unit,
    # and, below the normal range, by half the subnormal spacing (fl(v) = v(1 + d) + e,
    # |e| <= spacing / 2: an fp16 dx of 3.5e-6 is stored to within 3e-8, not 2e-9)
    spacing = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    return n * acc * mag + 4 * UNIT_ROUNDOFF[dtype] * (stored.abs() + mag) + 2 * spacing


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, another memory layout."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "sliced":
        return torch.cat([t, torch.zeros_like(t)], dim=1)[:, : t.shape[1]]
    if kind == "expanded" and t.shape[0] > 0:
        return t[:1].expand_as(t)
    return t


def drawn_rate(backend: str, p: float) -> float:
    """The drop rate a backend documents: the torch backend draws 16-bit uniforms, so ``p``
    rounded to a multiple of 2**-16 (docs/api.md, "The torch backend"); Philox's 31-bit uniforms
    resolve p far below any test's noise."""
    return round(p * 2**16) / 2**16 if backend == "torch" else p


def _dropped_pattern(M, K, p, seed, dtype, device):
    """Which elements a Triton call with (M, K, p) keeps after torch.manual_seed(seed): with
    W = 0, A = B = I and s = 1 the layer returns D(ones), nonzero exactly where kept."""
    ones = torch.ones(M, K, dtype=dtype, device=device)
    eye = torch.eye(K, dtype=dtype, device=device)
    torch.manual_seed(seed)
    y = fastlora.lora_linear(ones, torch.zeros(K, K, dtype=dtype, device=device), None, eye, eye, 1.0,
                             dropout_p=p, training=True)
    return y != 0


def _packed(keep: torch.Tensor) -> torch.Tensor:
    """The test's own packing: [rows, cols] bool -> [rows, ceil(cols/8)] uint8, little-endian bits."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=1, bitorder="little"))


@st.composite
def cases(draw, backend, dropout):
    interp = backend == "triton" and not torch.cuda.is_available()
    big = 40 if interp else 160
    return dict(
        M=draw(st.integers(0, big)),
        K=draw(st.integers(1, 48 if interp else 96)),
        N=draw(st.integers(1, 48 if interp else 96)),
        r=draw(st.integers(1, 24)),
        lead=draw(st.sampled_from([(), (2,), (1, 3)])),
        dtype=draw(st.sampled_from(compute_dtypes(backend))),
        bias=draw(st.booleans()),
        # outside the dropout half, a nonzero p comes only with eval (which must ignore it)
        training=(training := True if dropout else draw(st.booleans())),
        p=draw(st.sampled_from([0.1, 0.3, 0.5] if dropout else [0.0] if training else [0.0, 0.3])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        grads=draw(st.sampled_from([(True, True, True), (False, True, True), (True, False, True),
                                    (True, True, False), (False, False, True)])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check(backend, c):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, lead = c["dtype"], c["lead"]
    M, K, N, r = c["M"], c["K"], c["N"], c["r"]
    g = torch.Generator().manual_seed(c["seed"])
    rows = M * (int(torch.tensor(lead).prod()) if lead else 1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev, dtype)

    x2 = _layout(rnd(rows, K), c["layout"])
    w, A, B = rnd(N, K, scale=K**-0.5), rnd(r, K, scale=K**-0.5), rnd(N, r, scale=r**-0.5)
    b = rnd(N) if c["bias"] else None
    dy = rnd(rows, N)
    s = 1.7
    p = c["p"] if c["training"] else 0.0
    if c["layout"] == "contiguous" and lead:
        x = x2.view(*lead, M, K)  # leading dims only for the contiguous layout
    else:
        x = x2
    need_x, need_A, need_B = c["grads"]
    xg = x.detach().clone() if c["layout"] == "contiguous" else x.detach()
    xg.requires_grad_(need_x)
    Ag, Bg = A.clone().requires_grad_(need_A), B.clone().requires_grad_(need_B)

    active = p > 0
    keep = None
    if active and backend == "torch":
        # the test draws the mask and the torch backend is handed it, packed
        keep = torch.rand(rows, K, generator=g, dtype=torch.float64) >= p
        drawn = _packed(keep).to(dev)
        patch = mock.patch.object(torch_backend, "draw_packed_mask", lambda *a: drawn)
    else:
        patch = contextlib.nullcontext()
    with patch:
        torch.manual_seed(c["seed"])
        y = fastlora.lora_linear(xg, w, b, Ag, Bg, s, dropout_p=c["p"], training=c["training"])
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    y2 = y.reshape(rows, N)
    if need_x or need_A or need_B:
        y.backward(dy.view_as(y))

    if active and keep is None:
        keep = _dropped_pattern(rows, K, p, c["seed"], dtype, dev)
    # m / (1 - p) with the documented rate, in closed form
    mask = None if keep is None else keep.to(dev, torch.float64) / (1 - drawn_rate(backend, p))
    keep = 1.0 if mask is None else mask
    x64, w64, A64, B64, dy64 = (t.double() for t in (x2, w, A, B, dy))
    b64 = None if b is None else b.double()
    ref = lora_linear_reference(x64, w64, b64, A64, B64, s, mask, 0.0)
    xa = x64.abs() * (keep.abs() if mask is not None else 1.0)
    u_mag = s * xa @ A64.abs().t()
    mag_y = x64.abs() @ w64.abs().t() + u_mag @ B64.abs().t() + (0 if b64 is None else b64.abs())
    tol = _bound(mag_y, K + r + 2, dtype, ref)
    err = (y2.double() - ref).abs()
    assert (err <= tol).all(), f"y: max err {err.max():.3e}, case {c}"

    g_mag = s * dy64.abs() @ B64.abs()  # |g|, [rows, r]
    if need_x:
        want = dy64 @ w64 + (s * dy64 @ B64 @ A64) * keep
        mag = dy64.abs() @ w64.abs() + (g_mag @ A64.abs()) * (keep if mask is not None else 1.0)
        got = xg.grad.reshape(rows, K).double()
        assert ((got - want).abs() <= _bound(mag, N + r + 2, dtype, want)).all(), f"dx, case {c}"
    else:
        assert xg.grad is None
    if need_A:
        want = (s * dy64 @ B64).t() @ (x64 * keep)
        mag = g_mag.t() @ xa
        assert ((Ag.grad.double() - want).abs() <= _bound(mag, rows + N + 2, dtype, want)).all(), f"dA, case {c}"
    if need_B:
        u = s * (x64 * keep) @ A64.t()
        want = dy64.t() @ u
        mag = dy64.abs().t() @ u_mag
        assert ((Bg.grad.double() - want).abs() <= _bound(mag, rows + K + 2, dtype, want)).all(), f"dB, case {c}"


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["no-dropout", "dropout"])
@pytest.mark.parametrize("backend_name", available_backends())
def test_matches_reference_on_random_cases(backend_name, regime):
    @given(cases(backend_name, regime == "dropout"))
    def run(c):
        with fastlora.use_backend(backend_name):
            _check(backend_name, c)

    run()
