"""``modules_to_save`` (a classifier head trained whole) travels between PEFT and fastlora in
both directions, and in the Trainer callback's checkpoints. Yardstick: PEFT itself (its
``PeftModel.from_pretrained``, ``save_pretrained`` and the logits of its model)."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastlora  # noqa: E402
import fastlora.model as fm  # noqa: E402
from fastlora.adapter import CONFIG_NAME, SAFETENSORS_NAME  # noqa: E402
from test_model import perturb_factors, tiny_bert, token_ids  # noqa: E402

TOL = 1e-5  # float32, a 2-layer encoder: PEFT adds B(Ax) in another order


def _classifier(head_seed: int | None = None, cls=None):
    """The same base each time; ``head_seed`` gives the head other random weights."""
    model = tiny_bert(cls=cls or transformers.BertForSequenceClassification)
    if head_seed is not None:
        _train_head(model, head_seed)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _train_head(model, seed: int = 4) -> None:
    """A head (``model.classifier``, or the module itself) that is neither the initial one nor
    another model's."""
    head = getattr(model, "classifier", model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def _peft(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**kw)).eval()


def test_apply_lora_trains_and_saves_the_head_peft_reads_it(tmp_path):
    model = fm.apply_lora(_classifier(), ["query", "value"], r=4, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("bert.") and "lora_" not in n for n in trainable)
    perturb_factors(model)
    _train_head(model)
    fastlora.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / SAFETENSORS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]

    ids = token_ids()
    ours = _logits(model.eval(), ids)
    theirs = peft.PeftModel.from_pretrained(_classifier(head_seed=9), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, ids), ours, atol=TOL, rtol=TOL)
    again = fastlora.load_adapter(_classifier(head_seed=9), tmp_path).eval()
    torch.testing.assert_close(_logits(again, ids), ours, atol=TOL, rtol=TOL)
    assert again.classifier.weight.requires_grad  # loaded heads train on, as the factors do


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_peft_task_head_loads_and_converts(tmp_path, task_type):
    """PEFT's task defaults put the head in modules_to_save; both load_adapter (from the file)
    and from_peft (from the live model, keeping PEFT's trained head object) restore it."""
    cls = (transformers.BertForSequenceClassification if task_type == "SEQ_CLS"
           else transformers.BertForTokenClassification)  # fmt: skip
    pm = _peft(_classifier(cls=cls), r=4, target_modules=["query", "value"],
               task_type=task_type, init_lora_weights=False)  # fmt: skip
    with torch.no_grad():
        _train_head(pm.base_model.model.classifier.modules_to_save["default"])
    ids = token_ids()
    theirs = _logits(pm, ids)
    pm.save_pretrained(tmp_path)

    loaded = fastlora.load_adapter(_classifier(head_seed=9, cls=cls), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), theirs, atol=TOL, rtol=TOL)

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["modules_to_save"] = None  # the task type alone implies the head (PEFT's default)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded = fastlora.load_adapter(_classifier(head_seed=9, cls=cls), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), theirs, atol=TOL, rtol=TOL)

    head = pm.base_model.model.classifier.modules_to_save["default"]
    model = fm.from_peft(pm)
    assert model.classifier is head  # PEFT's trained copy, the same parameters
    assert "classifier" in model.fastlora_config.modules_to_save
    torch.testing.assert_close(_logits(model, ids), theirs, atol=TOL, rtol=TOL)
    fastlora.save_adapter(model, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(_classifier(head_seed=9, cls=cls), str(tmp_path / "back"))
    torch.testing.assert_close(_logits(back.eval(), ids), theirs, atol=TOL, rtol=TOL)


def test_trainer_checkpoint_keeps_a_hand_trained_head_in_the_adapter(tmp_path):
    """The callback's save (``save_checkpoint``): a head made trainable by hand goes in the
    adapter file, which PEFT and load_adapter read into a fresh model."""
    from fastlora.integrations import EXTRA_NAME, load_checkpoint, save_checkpoint

    model = fm.apply_lora(_classifier(), ["query", "value"], r=4)
    model.classifier.requires_grad_(True)
    perturb_factors(model)
    _train_head(model)
    save_checkpoint(model, str(tmp_path))
    assert not os.path.exists(tmp_path / EXTRA_NAME)
    ids = token_ids()
    ours = _logits(model.eval(), ids)
    theirs = peft.PeftModel.from_pretrained(_classifier(head_seed=9), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, ids), ours, atol=TOL, rtol=TOL)
    loaded = fastlora.load_adapter(_classifier(head_seed=9), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), ours, atol=TOL, rtol=TOL)
    # resume: a model built the same way (head trainable by hand) gets the head back
    resumed = fm.apply_lora(_classifier(head_seed=9), ["query", "value"], r=4)
    resumed.classifier.requires_grad_(True)
    load_checkpoint(resumed, str(tmp_path))
    torch.testing.assert_close(_logits(resumed.eval(), ids), ours, atol=TOL, rtol=TOL)


def test_bad_modules_to_save():
    with pytest.raises(ValueError, match=r"modules_to_save: \['head'\] match no module of "
                       r"BertForSequenceClassification.*top-level modules are: bert, dropout"):
        fm.apply_lora(_classifier(), ["query"], r=2, modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"modules_to_save: \['bert.encoder.layer.0.attention"
                       r".self.query'\] would be both trained whole and adapted"):
        fm.apply_lora(_classifier(), ["query"], r=2, modules_to_save=["layer.0.attention.self.query"])
    with pytest.raises(TypeError, match="modules_to_save: expected a list of module names"):
        fm.apply_lora(_classifier(), ["query"], r=2, modules_to_save="classifier")
    base = _classifier()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError):
        fm.apply_lora(base, ["query"], r=2, modules_to_save=["attention"])  # holds a target
    assert not fm.lora_layers(base) and base.state_dict().keys() == before.keys()
