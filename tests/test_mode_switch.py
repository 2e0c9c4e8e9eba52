"""Switching a layer between train and eval at the same shape, as every training loop with
evaluation does: each call computes with its own mode's dropout (none in eval), whatever the
previous call ran (per-shape plans and caches must key on the dropout rate).

Yardstick: fastlora.reference.lora_linear_reference in float64."""

from __future__ import annotations

import torch

import fastlora
from fastlora.reference import lora_linear_reference
from helpers import assert_matches_reference

M, K, N, R = 24, 40, 36, 4


def _layer() -> fastlora.FastLoRALinear:
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(K, N, r=R, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference(layer, x, dtype):
    args = [t.detach().to(dtype) for t in (x, layer.weight, layer.bias, layer.lora_A,
                                           layer.lora_B)]
    return lora_linear_reference(*args, layer.scaling)


def test_eval_after_train_and_train_after_eval(backend):
    layer = _layer()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    want = _reference(layer, x, torch.float64)
    same = _reference(layer, x, torch.float32)
    with torch.no_grad():
        for round_ in range(2):
            layer.train()
            torch.manual_seed(round_)
            trained = layer(x)
            assert not torch.equal(trained, layer.eval()(x)), "train mode must drop"
            assert_matches_reference(layer(x), want, same, torch.float32, f"eval {round_}")
            layer.train()
            torch.manual_seed(round_)
            assert torch.equal(layer(x), trained), "the same seed gives the same mask"
