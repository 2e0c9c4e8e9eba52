"""Target matching on the module names of real architectures (GPT-NeoX, Falcon, Llama), where
one name is a prefix of another (``dense`` / ``dense_h_to_4h`` / ``dense_4h_to_h``,
``q_proj`` / ``o_proj``): a regex must match the whole name, as PEFT's matcher does.

Yardstick: the layers PEFT's ``get_peft_model`` wraps for the same config."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora.model import find_target_modules, lora_layers  # noqa: E402


def _neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2)
    return transformers.GPTNeoXForCausalLM(cfg)


def _falcon():
    cfg = transformers.FalconConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, new_decoder_architecture=False)
    return transformers.FalconForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt-neox": _neox, "falcon": _falcon, "llama": _llama}
CASES = [
    ("gpt-neox", r".*\.dense"),
    ("gpt-neox", r".*dense_h_to_4h"),
    ("gpt-neox", r".*\.attention\.dense"),
    ("gpt-neox", ["dense"]),
    ("gpt-neox", ["dense", "dense_4h_to_h"]),
    ("falcon", r".*\.dense"),
    ("falcon", r".*\.(dense|query_key_value)"),
    ("llama", r".*\.(q|v)_proj"),
    ("llama", r"model\.layers\.0\..*proj"),
    ("llama", ["o_proj"]),
]


def _peft_names(model, targets) -> list[str]:
    config = peft.LoraConfig(r=2, target_modules=targets)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in wrapped.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("arch, targets", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_targets_on_hierarchical_names_match_peft(arch, targets):
    torch.manual_seed(0)
    base = MODELS[arch]()
    want = _peft_names(base, targets)
    assert want, "a case PEFT adapts nothing in tests nothing"
    assert sorted(find_target_modules(base, targets)) == want
    model = fastlora.apply_lora(copy.deepcopy(base), targets, r=2)
    assert sorted(lora_layers(model)) == want


def test_prefix_of_a_longer_name_is_not_matched():
    """``.*\\.dense`` adapts GPT-NeoX's attention output projection, never the MLP's
    ``dense_h_to_4h``/``dense_4h_to_h`` that merely start with it."""
    names = find_target_modules(_neox(), r".*\.dense")
    assert names == [f"gpt_neox.layers.{i}.attention.dense" for i in range(2)]
