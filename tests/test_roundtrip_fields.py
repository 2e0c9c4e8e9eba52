"""Every adapter-config field survives ``save_adapter`` -> ``load_adapter`` onto a fresh base,
and the loaded model computes what the saved one did, in train mode (dropout on) as well as
in eval. Module names are Llama's, hierarchical, with exclusions in both forms.

Yardsticks: the model that was saved (same seed, same input) and the JSON that PEFT reads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastlora  # noqa: E402
from fastlora.model import lora_layers  # noqa: E402

LAYER_FIELDS = ("r", "lora_alpha", "lora_dropout", "scaling", "use_rslora", "use_dora")
CONFIGS = {
    "lists": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                  exclude_modules=["model.layers.1.self_attn.v_proj"], r=3, lora_alpha=5,
                  lora_dropout=0.25, use_rslora=True, init_lora_weights="gaussian"),
    "regex-dora": dict(target_modules=r".*\.(q|v|o)_proj",
                       exclude_modules=r"model\.layers\.0\.self_attn\.o_proj", r=2,
                       lora_alpha=7, lora_dropout=0.1, use_dora=True),
    "no-exclude": dict(target_modules=["up_proj"], r=4, lora_alpha=4, lora_dropout=0.3),
}


def _base():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1)
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_every_config_field_survives_a_round_trip(tmp_path, case):
    kwargs = CONFIGS[case]
    torch.manual_seed(0)
    model = fastlora.apply_lora(_base(), **kwargs)
    with torch.no_grad():  # B != 0, so the adapter (and its dropout) shows in the output
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    fastlora.save_adapter(model, tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    defaults = {"use_rslora": False, "use_dora": False}
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora"):
        assert saved[key] == kwargs.get(key, defaults.get(key)), key
    want_exclude = kwargs.get("exclude_modules")
    want_exclude = sorted(want_exclude) if isinstance(want_exclude, list) else want_exclude
    assert saved["exclude_modules"] == want_exclude

    loaded = fastlora.load_adapter(_base(), tmp_path)
    ours, theirs = model.fastlora_config, loaded.fastlora_config
    for f in dataclasses.fields(ours):
        if f.compare:
            assert getattr(theirs, f.name) == getattr(ours, f.name), f.name
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    for name, layer in lora_layers(model).items():
        other = lora_layers(loaded)[name]
        for attr in LAYER_FIELDS:
            assert getattr(other, attr) == getattr(layer, attr), f"{name}.{attr}"

    ids = torch.randint(0, 32, (2, 6))
    for train in (True, False):
        model.train(train)
        loaded.train(train)
        torch.manual_seed(5)
        want = model(ids).logits
        torch.manual_seed(5)
        got = loaded(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"train={train}")
    model.train()
    torch.manual_seed(5)
    dropped = model(ids).logits
    torch.manual_seed(6)
    assert not torch.equal(dropped, model(ids).logits), "dropout must show in train mode"
