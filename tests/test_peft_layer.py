"""One layer side by side with PEFT's LoRA layer on the same weights."""

import pytest
import torch
from torch import nn

from fastlora import FastLoRALinear
from benchmarks.memory import saved_bytes
from helpers import max_err

peft = pytest.importorskip("peft")


class _Holder(nn.Module):
    def __init__(self, K, N, bias):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.proj(x)


def _pair(K, N, r, alpha, p, bias, rslora, dtype=torch.float64):
    torch.manual_seed(0)
    holder = _Holder(K, N, bias).to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"],
                          use_rslora=rslora, init_lora_weights=False)
    pm = peft.get_peft_model(holder, cfg)
    layer = pm.base_model.model.proj
    ours = FastLoRALinear.from_linear(nn.Linear(K, N, bias=bias, dtype=dtype), r=r, lora_alpha=alpha,
                                      lora_dropout=p, use_rslora=rslora)
    with torch.no_grad():
        ours.weight.copy_(layer.base_layer.weight)
        if bias:
            ours.bias.copy_(layer.base_layer.bias)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    return pm, layer, ours


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("K, N, r, alpha", [(24, 40, 4, 8), (33, 17, 5, 16), (16, 16, 1, 3)])
def test_same_outputs_and_gradients_as_peft(K, N, r, alpha, bias, rslora):
    pm, layer, ours = _pair(K, N, r, alpha, 0.0, bias, rslora)
    assert ours.scaling == layer.scaling["default"]
    x = torch.randn(3, 7, K, dtype=torch.float64)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = pm(xp), ours(xo)
    assert max_err(yp, yo) < 1e-12
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    assert max_err(xp.grad, xo.grad) < 1e-12
    assert max_err(layer.lora_A["default"].weight.grad, ours.lora_A.grad) < 1e-12
    assert max_err(layer.lora_B["default"].weight.grad, ours.lora_B.grad) < 1e-12


def test_same_in_eval_with_dropout_configured():
    pm, layer, ours = _pair(20, 12, 4, 8, 0.3, True, False)
    pm.eval()
    ours.eval()
    x = torch.randn(5, 20, dtype=torch.float64)
    assert max_err(pm(x), ours(x)) < 1e-12


def test_saved_for_backward_is_a_fraction_of_peft():
    """At p = 0.1 PEFT stores D(x) and a byte mask; fastlora stores u and a 1-bit mask."""
    M, K, N, r = 256, 128, 96, 8
    pm, _, ours = _pair(K, N, r, 16, 0.1, True, False, dtype=torch.float32)
    pm.train()
    ours.train()
    x = torch.randn(M, K, requires_grad=True)
    theirs = saved_bytes(pm, x)["extra"]
    mine = saved_bytes(ours, x)["extra"]
    expected = M * r * 4 + M * -(-K // 8)  # u in fp32 and the packed mask
    assert mine == expected, (mine, expected)
    assert mine <= 0.15 * theirs, (mine, theirs)
    # without dropout only u is stored beyond x and the parameters
    ours.eval()
    assert saved_bytes(ours, x)["extra"] == M * r * 4
