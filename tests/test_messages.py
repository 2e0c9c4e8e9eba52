"""Messages a user meets: install hints in the checkout form, a load mismatch listed briefly."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlora
import fastlora.model as fm
from fastlora.adapter import SAFETENSORS_NAME, load_adapter, save_adapter

transformers = pytest.importorskip("transformers")
from test_model import tiny_bert  # noqa: E402


def test_from_peft_without_peft_names_the_checkout_install(monkeypatch):
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[peft\]"'):
        fastlora.from_peft(torch.nn.Linear(2, 2))


def test_load_mismatch_lists_a_few_keys_and_a_count(tmp_path):
    """An adapter of every linear layer, its keys renamed so none fits: the message names the
    first few missing and unexpected keys and how many there are, on short lines."""
    base = tiny_bert()
    save_adapter(fm.apply_lora(copy.deepcopy(base), "all-linear", r=2), tmp_path)
    file = tmp_path / SAFETENSORS_NAME
    tensors = load_file(file)
    n = sum("encoder.layer" in k for k in tensors)  # the pooler's keys keep their names
    assert n > 20
    save_file({k.replace("encoder.layer", "encoder.block"): v for k, v in tensors.items()}, file)
    with pytest.raises(ValueError) as info:
        load_adapter(fm.apply_lora(copy.deepcopy(base), "all-linear", r=2), tmp_path)
    msg = str(info.value)
    assert f"({n} in all)" in msg  # missing: every key the model expects
    assert msg.count("encoder.block") <= 5 and msg.count("encoder.layer") <= 5, msg
    assert max(len(line) for line in msg.splitlines()) < 800, msg
    assert len(msg) < 2000, len(msg)


def test_load_wrong_shapes_lists_a_few_and_a_count(tmp_path):
    base = tiny_bert()
    save_adapter(fm.apply_lora(copy.deepcopy(base), "all-linear", r=2), tmp_path)
    file = tmp_path / SAFETENSORS_NAME
    tensors = load_file(file)
    save_file({k: torch.cat([v, v]) if "lora_A" in k else v for k, v in tensors.items()}, file)
    n_bad = sum("lora_A" in k for k in tensors)
    with pytest.raises(ValueError, match=r"expected shape \[2, \d+\], got \[4, \d+\]") as info:
        load_adapter(fm.apply_lora(copy.deepcopy(base), "all-linear", r=2), tmp_path)
    msg = str(info.value)
    assert msg.count("expected shape") == 5 and f"({n_bad} tensors of the wrong shape" in msg
