"""A 4-bit weight that bitsandbytes repacked for its AVX512-BF16 CPU inference path (scales
rounded to bf16: lossy) is restored to the standard layout with a warning that says the base
lost precision and how to avoid it, wherever fastlora meets it: ``from_linear``, ``apply_lora``,
``load_adapter``, ``from_peft``. The repacking is produced with bitsandbytes' own conversion,
so the tests run on any CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

import fastlora  # noqa: E402
import fastlora.model as fm  # noqa: E402
from qlora_helpers import dequantized, linear4bit  # noqa: E402

LOST = r"lost precision.*support_avx512bf16_for_cpu = False"


def _repack(lin) -> None:
    """What bitsandbytes does at a Linear4bit's first eval forward without grad on an
    AVX512-BF16 CPU."""
    lin.weight.data, lin.weight.quant_state = bnbF._convert_weight_packed_for_cpu(
        lin.weight.data, lin.weight.quant_state
    )
    lin.quant_state = lin.weight.quant_state
    assert lin.weight.quant_state.packing_format_for_cpu


def _model(repacked: bool) -> nn.Sequential:
    model = nn.Sequential(linear4bit(64, 64, seed=0), nn.ReLU(), linear4bit(64, 32, seed=1))
    if repacked:
        _repack(model[2])
    return model


def test_repacking_is_lossy():
    """The premise of the warning: bitsandbytes' round trip changes the decoded weight."""
    lin = linear4bit(64, 32)
    before = dequantized(lin.weight)
    _repack(lin)
    assert fastlora.bases.restore_standard_packing(lin)
    assert not torch.equal(dequantized(lin.weight), before)


def test_from_linear_warns_and_restores():
    lin = linear4bit(64, 32)
    _repack(lin)
    with pytest.warns(UserWarning, match="from_linear: the 4-bit base weights of linear " + LOST):
        layer = fastlora.FastLoRALinear.from_linear(lin, r=2)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ dequantized(layer.weight).T + layer.bias)


def test_apply_lora_warns_naming_the_layer():
    with pytest.warns(UserWarning, match="apply_lora: the 4-bit base weights of 2 " + LOST):
        fastlora.apply_lora(_model(repacked=True), ["0", "2"], r=2)


def test_no_warning_without_repacking():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.apply_lora(_model(repacked=False), ["0", "2"], r=2)


def test_load_adapter_warns(tmp_path):
    fastlora.save_adapter(fastlora.apply_lora(_model(False), ["0"], r=2), tmp_path)
    with pytest.warns(UserWarning, match="load_adapter: the 4-bit base weights of 2 " + LOST):
        fastlora.load_adapter(_model(repacked=True), tmp_path)


def test_from_peft_warns():
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_model(False), peft.LoraConfig(r=2, target_modules=["0"]))
    _repack(pm.base_model.model[0].base_layer)
    with pytest.warns(UserWarning, match=r"from_peft: the 4-bit base weights of 0.base_layer " + LOST):
        model = fm.from_peft(pm)
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
