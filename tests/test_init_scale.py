"""The scale of each plain initialisation matches PEFT's (``init_lora_weights`` True,
"gaussian", False): same distributions of ``lora_A``/``lora_B``, compared by their standard
deviation and range on layers large enough that sampling error is ~1%.

Yardstick: PEFT's ``LoraLayer.reset_lora_parameters`` on a layer of the same shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import fastlora  # noqa: E402

K, N, R = 2048, 16, 4  # 8192 samples of A: relative std error about 1 / sqrt(2 * 8192) < 1%


def _peft_factors(mode) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0"],
                                                         init_lora_weights=mode))
    layer = wrapped.base_model.model[0]
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@pytest.mark.parametrize("mode", [True, "gaussian", False], ids=["kaiming", "gaussian", "false"])
def test_plain_inits_have_peft_scale(mode):
    torch.manual_seed(1)
    layer = fastlora.FastLoRALinear(K, N, r=R, lora_alpha=8, init_lora_weights=mode)
    A_peft, B_peft = _peft_factors(mode)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert A.std() == pytest.approx(A_peft.std().item(), rel=0.05)
    assert A.abs().max() <= 1.25 * A_peft.abs().max()  # same support (uniform) or tails
    if mode is False:  # PEFT's init_lora_weights=False: B random too (nn.Linear-like)
        assert B.std() == pytest.approx(B_peft.std().item(), rel=0.25)  # 64 samples only
    else:
        assert torch.count_nonzero(B) == 0 and torch.count_nonzero(B_peft) == 0
