"""DoRA's Triton kernels (``dora_forward``/``dora_backward`` and the "triton" backend) against
the float64 DoRA reference, under TRITON_INTERPRET=1 without a GPU (fp32, fp16; bf16 on a
GPU only, as in test_kernels.py). The dropout mask is the one the kernels draw for the seed,
read back through the shrink kernel (``test_kernels.extract_mask``)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from helpers import ATOL, max_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import fastlora  # noqa: E402
from fastlora import dora  # noqa: E402
from fastlora.reference import dora_linear_reference  # noqa: E402
from test_kernels import BF16, DEVICE, DTYPES, SCALING, dtype_id, extract_mask, kernels  # noqa: E402
from test_kernels import seed_tensor  # noqa: E402

NAMES = ("y", "dx", "dA", "dB", "dm")
SHAPES = [(1, 40, 72, 1), (37, 40, 72, 3), (37, 72, 40, 16), (19, 40, 24, 20)]


def inputs(M, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    x, w = rnd(M, K), rnd(N, K, scale=K**-0.5)
    A, B = rnd(r, K, scale=K**-0.5), rnd(N, r, scale=r**-0.5)
    b = rnd(N) if bias else None
    m = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    dy = rnd(M, N)
    cast = [t if t is None else t.to(DEVICE, dtype) for t in (x, w, b, A, B, dy)]
    return cast, m.to(DEVICE, torch.float32)  # m: fp32, as apply_lora keeps it


def reference(x, w, b, A, B, m, dy, mask, p):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = dora_linear_reference(leaves[0], w, b, leaves[1], leaves[2], leaves[3], SCALING, mask, p)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def check(dtype, got, x, w, b, A, B, m, dy, mask=None, p=0.0):
    """Each of y, dx, dA, dB, dm within twice the error of the reference run in x's dtype
    (m in fp32) plus ATOL, measured against float64."""
    d64 = [t if t is None else t.double() for t in (x, w, b, A, B, m, dy)]
    ref = reference(*d64, mask, p)
    same = reference(x, w, b, A, B, m.to(dtype), dy, mask, p)
    for name, o, r64, rt in zip(NAMES, got, ref, same):
        if o is None:
            continue
        err, scale = max_err(o, r64), max(1.0, r64.abs().max().item())
        bound = 2 * max_err(rt, r64) + ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def run(dtype, shape, p, bias=True, tma=None, seed=31):
    M, K, N, r = shape
    (x, w, b, A, B, dy), m = inputs(M, K, N, r, dtype, bias)
    norm = dora.weight_norm(w, A, B, SCALING)
    s = seed_tensor(seed)
    y, u, z = kernels.dora_forward(x, w, b, A, B, m, norm, SCALING, p, s, tma=tma)
    assert y.dtype == z.dtype == dtype and z.shape == y.shape
    grads = kernels.dora_backward(dy, x, w, A, B, m, norm, u, z, SCALING, p, s, tma=tma)
    assert grads[3].dtype == m.dtype
    mask = extract_mask(s, M, K, p) if p else None
    check(dtype, (y, *grads), x, w, b, A, B, m, dy, mask, p)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtype", DTYPES + [BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_launchers_match_reference(shape, dtype, p, bias):
    run(dtype, shape, p, bias)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tma_persistent_build_matches_reference(dtype, p):
    """The sm_90 build (descriptors for x, W, y, z, dy; persistent programs)."""
    run(dtype, (53, 40, 72, 5), p, tma=True)


@pytest.mark.parametrize("need", [(False, False, False, True), (True, False, False, False),
                                  (False, True, True, False), (False, True, False, True)],
                         ids=["dm", "dx", "dA+dB", "dA+dm"])
def test_backward_makes_only_what_is_asked(need):
    M, K, N, r = 21, 24, 40, 4
    (x, w, b, A, B, dy), m = inputs(M, K, N, r, torch.float32)
    norm = dora.weight_norm(w, A, B, SCALING)
    s = seed_tensor(3)
    y, u, z = kernels.dora_forward(x, w, b, A, B, m, norm, SCALING, 0.25, s)
    got = kernels.dora_backward(dy, x, w, A, B, m, norm, u, z, SCALING, 0.25, s, *need)
    assert [g is not None for g in got] == list(need)
    full = kernels.dora_backward(dy, x, w, A, B, m, norm, u, z, SCALING, 0.25, s)
    for g, f in zip(got, full):
        if g is not None:
            assert torch.equal(g, f)


def test_lora_launchers_still_compute_lora():
    """The shared kernels with their default ADAPTER="lora" compute LoRA, not DoRA."""
    M, K, N, r = 17, 24, 40, 4
    (x, w, b, A, B, dy), _ = inputs(M, K, N, r, torch.float32)
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.0, seed_tensor())
    xd, wd, Ad, Bd = (t.double() for t in (x, w, A, B))
    assert max_err(y, xd @ wd.t() + b.double() + SCALING * (xd @ Ad.t()) @ Bd.t()) < 1e-4


# --------------------------------------------------------------------------- the backend


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_on_the_triton_backend_matches_the_torch_backend(bias):
    """FastLoRALinear(use_dora=True) through the "triton" backend: outputs and gradients of
    x, A, B and m equal the torch backend's (itself checked against PEFT) at p = 0."""
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(24, 40, r=4, lora_alpha=8, bias=bias, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 40))
    x = torch.randn(3, 7, 24)
    out = {}
    for backend in ("torch", "triton"):
        xg = x.clone().requires_grad_()
        with fastlora.use_backend(backend):
            y = layer(xg)
        y.backward(torch.ones_like(y))
        params = (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
        out[backend] = (y.detach(), xg.grad, *(p.grad.clone() for p in params))
        layer.zero_grad()
    for name, a, b in zip(NAMES, out["torch"], out["triton"]):
        assert max_err(a, b) <= 1e-5 * max(1.0, a.abs().max().item()), name


def test_triton_backend_dropout_trains_with_one_mask():
    """p > 0 through the backend: the backward sees the forward's mask (the gradients equal
    the reference's run with the mask the kernels drew for the seed apply drew)."""
    M, K, N, r, p = 13, 24, 16, 4, 0.25
    (x, w, b, A, B, dy), m = inputs(M, K, N, r, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    torch.manual_seed(11)
    with fastlora.use_backend("triton"):
        y = fastlora.lora_linear(leaves[0], w, b, leaves[1], leaves[2], SCALING, p, True,
                                 leaves[3])
    grads = torch.autograd.grad(y, leaves, dy)
    torch.manual_seed(11)  # the same draw as apply's: the seed tensor, then the mask
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    check(torch.float32, (y, *grads), x, w, b, A, B, m, dy, extract_mask(seed, M, K, p), p)


def test_dora_and_lora_layers_in_one_model_on_the_triton_backend():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    fastlora.apply_lora(model, ["0"], r=4, use_dora=True)
    with fastlora.use_backend("triton"):
        y = model(torch.randn(5, 16))
    y.sum().backward()
    assert model[0].lora_magnitude_vector.grad is not None


def test_dora_reads_the_strategy_as_lora_does(monkeypatch):
    """FASTLORA_STRATEGY=composition sends DoRA to the torch path from set_strategy(None) on
    (the variable read once, as for LoRA), and set_strategy("fused") overrides it."""
    from fastlora import dora_torch, triton_backend

    if DEVICE.type == "cuda":
        pytest.skip("on CUDA fp32 DoRA takes the torch path whatever the strategy")
    calls = []
    real = dora_torch.apply_dora
    monkeypatch.setattr(dora_torch, "apply_dora", lambda *a: calls.append(1) or real(*a))
    layer = fastlora.FastLoRALinear(24, 16, r=4, use_dora=True).to(DEVICE)
    x = torch.randn(5, 24, device=DEVICE)
    monkeypatch.setenv("FASTLORA_STRATEGY", "composition")
    triton_backend.set_strategy(None)
    try:
        with fastlora.use_backend("triton"):
            layer(x)
            assert len(calls) == 1
            monkeypatch.setenv("FASTLORA_STRATEGY", "fused")  # read once: not seen yet
            layer(x)
            assert len(calls) == 2
            previous = triton_backend.set_strategy("fused")
            layer(x)
            assert len(calls) == 2
            triton_backend.set_strategy(previous)
    finally:
        monkeypatch.undo()
        triton_backend.set_strategy(None)
