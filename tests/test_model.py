"""Model-level API on tiny randomly initialised transformers models: target matching against
PEFT's own matcher, apply/freeze/count, merge_lora, from_peft (outputs and training), errors."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fastlora.model as fm
from fastlora.layer import FastLoRALinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# tolerance per dtype for whole-model outputs and losses (same math, different op order)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
TRAIN_STEPS = 4
SEQ = 7


def tiny_bert(seed: int = 0, cls=None, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return (cls or transformers.BertModel)(config).to(dtype).eval()


def tiny_llama(seed: int = 0, tie: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2Model(config).eval()


def token_ids(seed: int = 1, batch: int = 3, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def peft_model(base: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(
            base, peft.LoraConfig(**kwargs)
        ).eval()  # PEFT returns it in train mode


def peft_targets(base: nn.Module, **kwargs) -> list[str]:
    """The names PEFT's own matcher adapts for the same arguments."""
    pm = peft_model(copy.deepcopy(base), **kwargs)
    return sorted(
        n
        for n, m in pm.base_model.model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )


def perturb_factors(model: nn.Module, seed: int = 3) -> None:
    """Non-zero factors, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fm.lora_layers(model).values():
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g).to(layer.lora_A))
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B))


def train_losses(
    model: nn.Module, ids: torch.Tensor, optimizer=None, steps: int = TRAIN_STEPS
) -> list[float]:
    """A few AdamW steps towards a fixed target; returns the losses."""
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        out = hidden(model, ids)
        target = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
        loss = ((out - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# target matching: the same set as PEFT's matcher


TARGET_CASES = {
    "suffixes": {"target_modules": ["query", "value"]},
    "dotted-suffix": {"target_modules": ["attention.self.query"]},
    "full-name": {"target_modules": ["encoder.layer.1.output.dense"]},
    "shared-suffix": {"target_modules": ["dense"]},
    "regex": {"target_modules": r".*\.layer\.0\..*(query|key)"},
    "all-linear": {"target_modules": "all-linear"},
    "exclude-list": {"target_modules": ["dense"], "exclude_modules": ["output.dense"]},
    "exclude-regex": {"target_modules": r".*dense", "exclude_modules": r".*attention.*"},
}


@pytest.mark.parametrize("case", list(TARGET_CASES), ids=list(TARGET_CASES))
def test_targets_match_peft(case):
    base = tiny_bert()
    kwargs = TARGET_CASES[case]
    ours = sorted(
        fm.find_target_modules(base, kwargs["target_modules"], kwargs.get("exclude_modules"))
    )
    assert ours == peft_targets(base, r=2, **kwargs)
    model = fm.apply_lora(copy.deepcopy(base), r=2, **kwargs)
    assert sorted(fm.lora_layers(model)) == ours


def test_all_linear_skips_lm_head():
    base = tiny_llama()
    names = fm.find_target_modules(base, "all-linear")
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert sorted(names) == peft_targets(base, r=2, target_modules="all-linear")
    model = fm.apply_lora(base, "ALL-LINEAR", r=2)
    # resolved to the adapted names so a saved adapter targets exactly these layers
    assert model.fastlora_config.target_modules == sorted(names)


def test_all_linear_skips_classifier_head():
    base = tiny_bert(cls=transformers.BertForSequenceClassification)
    names = fm.find_target_modules(base, "all-linear")
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert sorted(names) == peft_targets(
        base, r=2, target_modules="all-linear", task_type="SEQ_CLS"
    )


# ---------------------------------------------------------------------------------------------
# target errors


def test_unknown_target_lists_linear_layers():
    with pytest.raises(ValueError) as err:
        fm.apply_lora(tiny_bert(), ["qkv", "query"])
    msg = str(err.value)
    assert "['qkv'] match no module of BertModel" in msg
    assert "dense, key, query, value" in msg
    assert "encoder.layer.0" not in msg  # issue 14: the leaf names only, no full listing


def test_suffix_must_follow_a_dot():
    # PEFT's rule: "uery" is not a suffix of "...self.query" (it must follow a ".")
    with pytest.raises(ValueError, match=r"\['uery'\] match no module"):
        fm.apply_lora(tiny_bert(), ["uery"])


def test_regex_must_match_whole_name():
    with pytest.raises(ValueError, match="regex 'query' matches no module name .*whole name"):
        fm.apply_lora(tiny_bert(), "query")


def test_non_linear_target_refused():
    with pytest.raises(
        TypeError, match=r"encoder.layer.0.attention \(BertAttention, not an nn.Linear\)"
    ):
        fm.apply_lora(tiny_bert(), ["attention"])


@pytest.mark.parametrize("targets", [["c_attn"], "all-linear"], ids=["c_attn", "all-linear"])
def test_conv1d_refused(targets):
    model = tiny_gpt2()
    with pytest.raises(
        TypeError, match=r"h.0.attn.c_attn \(a transposed Conv1D, PEFT's fan_in_fan_out=True"
    ):
        fm.apply_lora(model, targets)
    assert not fm.lora_layers(model)


def test_everything_excluded():
    with pytest.raises(ValueError, match="every module matched by .* is excluded"):
        fm.apply_lora(tiny_bert(), ["query"], exclude_modules=["query"])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"target_modules": []}, "expected at least one name"),
        ({"target_modules": 3}, "target_modules: expected a regex string"),
        ({"target_modules": ["query"], "r": 0}, "r: expected an integer >= 1"),
        (
            {"target_modules": ["query"], "lora_dropout": 1.0},
            r"lora_dropout: expected a float in \[0, 1\)",
        ),
        (
            {"target_modules": ["query"], "init_lora_weights": "loftq"},
            "init_lora_weights: expected one of",
        ),
        (
            {"target_modules": ["query"], "init_lora_weights": "pissa", "r": 40},
            r"r=40 exceeds min\(out, in\)=32",
        ),
    ],
    ids=["empty", "int", "r0", "dropout1", "loftq", "pissa-rank"],
)
def test_apply_bad_arguments(bad, match):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        fm.apply_lora(model, **bad)
    assert not fm.lora_layers(model) and not hasattr(model, "fastlora_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_twice_refused():
    model = fm.apply_lora(tiny_bert(), ["query"])
    with pytest.raises(ValueError, match="already has FastLoRALinear layers"):
        fm.apply_lora(model, ["value"])


def test_apply_to_peft_model_refused():
    with pytest.raises(TypeError, match="use fastlora.from_peft"):
        fm.apply_lora(peft_model(tiny_bert(), r=2, target_modules=["query"]), ["value"])


def test_pissa_refuses_tied_weights():
    model = tiny_llama(tie=True)
    with pytest.raises(
        ValueError, match=r"lm_head.weight is shared with \['model.embed_tokens.weight'\]"
    ):
        fm.apply_lora(model, ["lm_head"], r=2, init_lora_weights="pissa")


# ---------------------------------------------------------------------------------------------
# apply: freezing, counting, config


def test_apply_freezes_counts_and_records(capsys):
    base = tiny_bert()
    ids = token_ids()
    ref = hidden(base, ids)
    model = fm.apply_lora(
        base, ["query", "value"], r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in fm.lora_layers(model) for f in "AB"}
    assert len(trainable) == 2 * 2 * 2
    n_trainable, n_total = fm.trainable_parameters(model)
    assert n_trainable == 4 * (4 * 32 + 32 * 4)
    assert n_total == sum(p.numel() for p in base.parameters())
    fm.print_trainable_parameters(model)
    assert capsys.readouterr().out == (
        f"trainable params: {n_trainable:,d} || all params: {n_total:,d} || "
        f"trainable%: {100 * n_trainable / n_total:.4f}\n"
    )
    cfg = model.fastlora_config
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.init_lora_weights) == (
        4,
        16,
        0.1,
        True,
        True,
    )
    assert cfg.target_modules == ["query", "value"]
    layer = model.encoder.layer[1].attention.self.value
    assert isinstance(layer, FastLoRALinear) and layer.scaling == 16 / 2 and not layer.training
    torch.testing.assert_close(hidden(model, ids), ref, atol=0, rtol=0)  # B = 0 at init


def test_apply_lora_trains_like_peft():
    """apply_lora with PEFT's factors copied in trains exactly like PEFT (float64)."""
    base = tiny_bert(dtype=torch.float64)
    ids = token_ids()
    pm = peft_model(
        copy.deepcopy(base),
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        init_lora_weights=False,
    )
    model = fm.apply_lora(base, ["query", "value", "dense"], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, layer in fm.lora_layers(model).items():
            theirs = pm.base_model.model.get_submodule(name)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)
    tol = TOL[torch.float64]
    torch.testing.assert_close(hidden(model, ids), hidden(pm, ids), atol=tol, rtol=tol)
    assert train_losses(model, ids) == pytest.approx(train_losses(pm, ids), abs=tol, rel=tol)


# ---------------------------------------------------------------------------------------------
# merge_lora


@pytest.mark.parametrize("init", [True, "pissa", "olora"], ids=str)
def test_merge_lora_same_outputs(init):
    model = fm.apply_lora(
        tiny_bert(dtype=torch.float64),
        ["query", "value", "output.dense"],
        r=4,
        init_lora_weights=init,
    )
    perturb_factors(model)
    ids = token_ids()
    before = hidden(model, ids)
    names = sorted(fm.lora_layers(model))
    merged = fm.merge_lora(model)
    assert merged is model and not fm.lora_layers(model) and not hasattr(model, "fastlora_config")
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
    tol = TOL[torch.float64]
    torch.testing.assert_close(hidden(model, ids), before, atol=tol, rtol=tol)
    with pytest.warns(UserWarning, match="already merged"):
        fm.merge_lora(model)  # a second merge: a warning, the model as it is


def test_merge_lora_of_merged_layer():
    model = fm.apply_lora(tiny_bert(dtype=torch.float64), ["query"], r=2)
    perturb_factors(model)
    ids = token_ids()
    before = hidden(model, ids)
    model.encoder.layer[0].attention.self.query.merge()
    fm.merge_lora(model)  # already merged: not added twice
    torch.testing.assert_close(
        hidden(model, ids), before, atol=TOL[torch.float64], rtol=TOL[torch.float64]
    )


# ---------------------------------------------------------------------------------------------
# from_peft


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_from_peft_same_outputs_and_training(dtype, rslora):
    base = tiny_bert(dtype=dtype)
    ids = token_ids()
    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["query", "key", "value", "dense"],
        "use_rslora": rslora,
        "init_lora_weights": False,
    }
    theirs = peft_model(copy.deepcopy(base), **kwargs)
    ours_peft = peft_model(copy.deepcopy(base), **kwargs)
    with torch.no_grad():
        for p, q in zip(theirs.parameters(), ours_peft.parameters()):
            q.copy_(p)
    # an optimizer built on PEFT's parameters keeps working: from_peft keeps the same tensors
    optimizer = torch.optim.AdamW([p for p in ours_peft.parameters() if p.requires_grad], lr=1e-2)
    peft_layer = ours_peft.base_model.model.encoder.layer[0].attention.self.query
    ours = fm.from_peft(ours_peft)
    layer = ours.encoder.layer[0].attention.self.query
    assert isinstance(layer, FastLoRALinear)
    assert layer.lora_A is peft_layer.lora_A["default"].weight
    assert layer.weight is peft_layer.base_layer.weight
    assert len(fm.lora_layers(ours)) == 2 * 6 + 1  # q, k, v and three "dense" per layer, the pooler
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in ours.modules())
    cfg = ours.fastlora_config
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.init_lora_weights) == (4, 8, rslora, False)
    tol = TOL[dtype]
    torch.testing.assert_close(hidden(ours, ids), hidden(theirs, ids), atol=tol, rtol=tol)
    assert train_losses(ours, ids, optimizer) == pytest.approx(
        train_losses(theirs, ids), abs=tol, rel=tol
    )
    torch.testing.assert_close(
        layer.lora_B,
        theirs.base_model.model.encoder.layer[0].attention.self.query.lora_B["default"].weight,
        atol=tol,
        rtol=tol,
    )


def test_from_peft_with_dropout_in_eval_and_pissa():
    base = tiny_bert()  # PEFT's PiSSA refuses float64
    ids = token_ids()
    pm = peft_model(
        copy.deepcopy(base),
        r=4,
        target_modules=["query", "value"],
        lora_dropout=0.2,
        init_lora_weights="pissa",
    )
    ref = hidden(pm, ids)
    model = fm.from_peft(pm)
    layer = model.encoder.layer[0].attention.self.value
    assert layer.lora_dropout == 0.2 and model.fastlora_config.init_lora_weights == "pissa"
    tol = TOL[torch.float32]
    torch.testing.assert_close(hidden(model, ids), ref, atol=tol, rtol=tol)
    # the base is the residual, so the whole model still equals the original
    torch.testing.assert_close(hidden(model, ids), hidden(base, ids), atol=1e-4, rtol=1e-4)


def _merged():
    pm = peft_model(tiny_bert(), r=2, target_modules=["query"])
    pm.base_model.model.encoder.layer[0].attention.self.query.merge()
    return pm


REFUSALS = {
    # several adapters convert (tests/test_multi_adapter.py); a SEQ_CLS head (modules_to_save)
    # converts too (tests/test_heads.py)
    "trainable-tokens": (
        lambda: peft_model(tiny_bert(), r=2, target_modules=["query"],
                           trainable_token_indices=[1, 2]),
        r"word_embeddings: TrainableTokensWrapper",
    ),
    "conv1d": (
        lambda: peft_model(tiny_gpt2(), r=2, target_modules=["c_attn"], fan_in_fan_out=True),
        "fan_in_fan_out",
    ),
    "merged": (_merged, r"encoder.layer.0.attention.self.query: the adapter is merged"),
    "lora-bias": (
        lambda: peft_model(tiny_bert(), r=2, target_modules=["query"], lora_bias=True),
        "lora_bias",
    ),
    "rank-pattern": (
        lambda: peft_model(
            tiny_bert(),
            r=2,
            target_modules=["query"],
            rank_pattern={"layer.0.attention.self.query": 4},
        ),
        "rank_pattern",
    ),
    "embedding": (
        lambda: peft_model(tiny_bert(), r=2, target_modules=["word_embeddings"]),
        r"embeddings.word_embeddings: Embedding",
    ),
    "no-lora": (lambda: tiny_bert(), "found no PEFT LoRA Linear layers"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_from_peft_refuses(case):
    make, match = REFUSALS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = make()
    with pytest.raises((ValueError, TypeError), match=match):
        fm.from_peft(pm)
    # nothing converted
    assert not any(isinstance(m, FastLoRALinear) for m in pm.modules())


def test_error_messages_are_specific():
    # one message per problem, each naming the layer
    pm = peft_model(tiny_bert(), r=2, target_modules=["query"], lora_bias=True)
    with pytest.raises(ValueError) as err:
        fm.from_peft(pm)
    assert re.search(r"encoder.layer.1.attention.self.query: lora_bias=True", str(err.value))


def test_adapters_of_half_precision_layers_are_kept_in_float32_like_peft():
    import torch
    from torch import nn

    import fastlora

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)

    model = fastlora.apply_lora(build(), ["0"], r=4)
    layer = model[0]
    assert layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32
    kept = fastlora.apply_lora(build(), ["0"], r=4, autocast_adapter_dtype=False)
    assert kept[0].lora_A.dtype == torch.bfloat16
