"""LoRA initialisations: plain (True/"gaussian"/False) and decomposition ("pissa"/"olora"),
checked against their definitions, against PEFT, and for the unchanged output at step 0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastlora import inits
from fastlora.layer import FastLoRALinear
from helpers import half_ulp, unit_roundoff

# tolerance per dtype for reconstructions and outputs (SVD/QR round-off on 16x24 matrices)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
OUT, IN, R, ALPHA = 16, 24, 4, 8


def base_linear(dtype=torch.float64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(dtype)


def lora_from(linear: nn.Linear, mode, r=R, alpha=ALPHA) -> FastLoRALinear:
    return FastLoRALinear.from_linear(
        copy.deepcopy(linear), r=r, lora_alpha=alpha, init_lora_weights=mode
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["pissa", "olora"])
def test_decomposition_keeps_output(mode, dtype):
    """W_res + s B A rebuilds W, and the layer's output is the base's, within what rounding
    allows. The residual is taken in fp32 (fp64 for fp64) against the factors as stored, so
    the rebuild is off by one rounding of W_res to the dtype plus the fp32 error of s B A
    (gamma bound, (r + 2) u_acc (|W| + s |B| |A|)). The output adds the layer's own compute
    in the dtype: fp32 accumulation over K + r terms and at most three stores (u, the
    low-rank part with bias, y), each one unit roundoff of the magnitudes. Yardstick: the
    original layer in float64."""
    linear = base_linear(dtype)
    layer = lora_from(linear, mode)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert not torch.equal(layer.weight, linear.weight)  # the residual replaced W
    W, b, x64 = linear.weight.detach().double(), linear.bias.detach().double(), x.double()
    Wr, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    s = layer.scaling
    u_acc = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    low = s * B.abs() @ A.abs()
    rebuild = half_ulp(Wr.abs(), dtype) + (R + 2) * u_acc * (W.abs() + low)
    err = (Wr + s * B @ A - W).abs()
    assert (err <= rebuild).all(), f"rebuild: max err {err.max():.3e}"
    with torch.no_grad():
        y = layer(x).double()
    mag = x64.abs() @ (Wr.abs() + low).t() + b.abs()
    bound = x64.abs() @ rebuild.t() + ((IN + R + 2) * u_acc + 3 * unit_roundoff(dtype)) * mag
    err = (y - (x64 @ W.t() + b)).abs()
    assert (err <= bound).all(), f"output: max err {err.max():.3e}, bound {bound.min():.3e}"


def test_pissa_stores_principal_part():
    linear = base_linear()
    layer = lora_from(linear, "pissa")
    W = linear.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    s, A, B = layer.scaling, layer.lora_A.detach(), layer.lora_B.detach()
    tol = TOL[torch.float64]
    # s * B A is the best rank-r approximation, the residual holds the rest of the spectrum
    torch.testing.assert_close(s * B @ A, U[:, :R] @ torch.diag(S[:R]) @ Vh[:R], atol=tol, rtol=0)
    torch.testing.assert_close(
        torch.linalg.svdvals(layer.weight.detach())[: IN - R][: OUT - R], S[R:], atol=tol, rtol=0
    )
    # A = sqrt(S_r/s) V_r^T and B = U_r sqrt(S_r/s): orthogonal rows/columns with norms S_r/s
    torch.testing.assert_close(A @ A.T, torch.diag(S[:R] / s), atol=tol, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.diag(S[:R] / s), atol=tol, rtol=0)


def test_olora_stores_leading_columns():
    linear = base_linear()
    layer = lora_from(linear, "olora")
    W = linear.weight.detach()
    s, A, B = layer.scaling, layer.lora_A.detach(), layer.lora_B.detach()
    tol = TOL[torch.float64]
    torch.testing.assert_close(
        B.T @ B, torch.eye(R, dtype=W.dtype), atol=tol, rtol=0
    )  # Q_r orthonormal
    torch.testing.assert_close(
        A[:, :R], torch.triu(A[:, :R]), atol=0, rtol=0
    )  # R_r upper trapezoidal
    # B A = Q_r R_r = Q_r Q_r^T W (the projection on the first r columns' span)
    torch.testing.assert_close(B @ A, B @ B.T @ W, atol=tol, rtol=0)
    torch.testing.assert_close(layer.weight.detach(), W - s * B @ A, atol=tol, rtol=0)


@pytest.mark.parametrize("mode", ["pissa", "olora"])
def test_decomposition_matches_peft(mode):
    peft = pytest.importorskip("peft")
    linear = base_linear(torch.float32)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = copy.deepcopy(linear)

    pm = peft.get_peft_model(
        Holder(),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=mode),
    )
    theirs = pm.base_model.model.proj
    ours = lora_from(linear, mode)
    tA, tB = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
    tol = TOL[torch.float32]
    # the residual and the low-rank product are unique (sign choices of SVD/QR cancel)
    torch.testing.assert_close(
        ours.weight.detach(), theirs.base_layer.weight.detach(), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        ours.lora_B.detach() @ ours.lora_A.detach(), tB @ tA, atol=tol, rtol=0
    )


def test_low_precision_factorised_in_float32():
    linear = base_linear(torch.bfloat16)
    layer = lora_from(linear, "pissa")
    assert layer.weight.dtype == layer.lora_A.dtype == torch.bfloat16
    A32, B32 = inits.pissa_factors(linear.weight.float(), R, layer.scaling)
    assert torch.equal(layer.lora_A, A32.to(torch.bfloat16))
    assert torch.equal(layer.lora_B, B32.to(torch.bfloat16))
    # the residual is taken against the factors as stored
    stored = layer.lora_B.float() @ layer.lora_A.float()
    assert torch.equal(
        layer.weight, (linear.weight.float() - layer.scaling * stored).to(torch.bfloat16)
    )


def test_plain_inits_keep_weight():
    linear = base_linear()
    for mode, b_zero in [(True, True), ("gaussian", True), ("GAUSSIAN", True), (False, False)]:
        layer = lora_from(linear, mode)
        assert torch.equal(layer.weight, linear.weight)
        assert bool((layer.lora_B == 0).all()) is b_zero
        assert not bool((layer.lora_A == 0).all())


@pytest.mark.parametrize(
    "mode, kwargs, match",
    [
        (
            "pissa",
            {"r": 17},
            r"init_lora_weights='pissa': r=17 exceeds min\(out_features, in_features\)=16",
        ),
        ("olora", {"r": 17}, r"init_lora_weights='olora': r=17 exceeds"),
        ("pissa", {"alpha": -2}, r"needs scaling = lora_alpha / r > 0, got -0.5"),
        ("pissa_niter_4", {}, "'pissa_niter_N' is not supported"),
        (
            "corda",
            {},
            (
                r"init_lora_weights: expected one of "
                r"\(True, False, 'gaussian', 'pissa', 'olora'\), got 'corda'"
            ),
        ),
        (None, {}, "got None"),
    ],
    ids=["pissa-rank", "olora-rank", "pissa-negative-alpha", "pissa-niter", "corda", "none"],
)
def test_bad_modes(mode, kwargs, match):
    linear = base_linear()
    with pytest.raises(ValueError, match=match):
        lora_from(linear, mode, **kwargs)


def test_initialize_is_the_layer_entry_point():
    layer = lora_from(base_linear(), True)
    before = layer.weight.detach().clone()
    layer.reset_lora_parameters("olora")
    assert not torch.equal(layer.weight, before)
    torch.testing.assert_close(
        layer.weight + layer.scaling * layer.lora_B @ layer.lora_A,
        before,
        atol=TOL[torch.float64],
        rtol=0,
    )
