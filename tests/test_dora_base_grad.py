"""DoRA with a base a user unfroze (``layer.weight.requires_grad_(True)``, as LoRA allows):
``dW`` and ``db`` carry DoRA's column scale ``m / ||W + s B A||`` (the norm a constant, as in
PEFT), on both backends, with and without dropout (the torch path draws the test's mask).

Yardstick: autograd through ``fastlora.reference.dora_linear_reference`` in float64."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import dora_torch
from fastlora.dropout import pack_mask
from fastlora.reference import dora_linear_reference
from helpers import ATOL, max_err

M, K, N, R, S = 13, 24, 20, 3, 1.5


def _layer(dtype: torch.dtype, p: float) -> fastlora.FastLoRALinear:
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(K, N, r=R, lora_alpha=R * S, lora_dropout=p, use_dora=True,
                                    dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.uniform_(0.5, 2.0)  # far from the norm: c != 1
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    return layer


def _reference(layer, x, dy, keep, p, dtype):
    """(dW, db) of the float64 reference evaluated in ``dtype``."""
    W = layer.weight.detach().to(dtype).requires_grad_()
    b = layer.bias.detach().to(dtype).requires_grad_()
    A, B, m = (t.detach().to(dtype) for t in (layer.lora_A, layer.lora_B,
                                              layer.lora_magnitude_vector))
    y = dora_linear_reference(x.to(dtype), W, b, A, B, m, layer.scaling, keep, p)
    return torch.autograd.grad(y, (W, b), dy.to(dtype))


def _check(layer, x, dy, keep, p, dtype):
    layer.train(p > 0)
    y = layer(x.to(dtype))
    y.backward(dy.to(dtype))
    want = _reference(layer, x, dy, keep, p, torch.float64)
    same = _reference(layer, x, dy, keep, p, dtype)
    for name, got, w, sd in zip(("dW", "db"), (layer.weight.grad, layer.bias.grad), want, same):
        assert got is not None and got.dtype == dtype, name
        bound = 2 * max_err(sd, w) + ATOL[dtype] * max(1.0, w.abs().max().item())
        err = max_err(got, w)
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(M, K, generator=g, dtype=torch.float64), torch.randn(
        M, N, generator=g, dtype=torch.float64)


def test_unfrozen_base_gets_dora_scaled_grads(backend):
    dtype = torch.float32
    x, dy = _data()
    _check(_layer(dtype, 0.0), x, dy, None, 0.0, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unfrozen_base_with_dropout_torch(monkeypatch, dtype):
    p = 0.25  # a multiple of 2**-16: 1/(1-p) is exact on both sides
    x, dy = _data()
    keep = torch.rand(M, K, generator=torch.Generator().manual_seed(5)) >= p
    padded = torch.zeros(M, -(-K // 8) * 8, dtype=torch.bool)
    padded[:, :K] = keep
    monkeypatch.setattr(dora_torch, "draw_packed_mask",
                        lambda rows, cols, p, device: pack_mask(padded).to(device))
    with fastlora.use_backend("torch"):
        _check(_layer(dtype, p), x, dy, keep, p, dtype)
