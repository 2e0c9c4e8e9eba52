"""The Trainer paths a user hits with ``AdapterCheckpointCallback``, on a model small enough for
the fast selection: resuming restores the adapter, a trained head and Adam's moments (bit for
bit against the uninterrupted run), and ``load_best_model_at_end`` ends on the best checkpoint.

Yardsticks: the uninterrupted run, and the tensors in the checkpoint directories."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fastlora  # noqa: E402
from fastlora.integrations import (  # noqa: E402
    AdapterCheckpointCallback, load_checkpoint, save_checkpoint,
)

K, CLASSES = 8, 3


class TinyClassifier(nn.Module):
    """body (adapted) -> head (trained in full); returns the Trainer's {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(K, 16), nn.Tanh(), nn.Linear(16, K))
        self.head = nn.Linear(K, CLASSES)

    def forward(self, x, labels=None):
        logits = self.head(self.body(x))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(1234)  # one base for every seed
    model = TinyClassifier()
    torch.manual_seed(seed)  # the adapter and the head differ per seed
    fastlora.apply_lora(model, ["body.0", "body.2"], r=2, lora_alpha=4, lora_dropout=0.1,
                        init_lora_weights="gaussian")
    model.head.requires_grad_(True)
    nn.init.normal_(model.head.weight)
    return model


def _rows(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=g)
    return [{"x": x[i], "labels": int(i % CLASSES)} for i in range(n)]


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                learning_rate=5e-2, report_to=[], logging_steps=1, use_cpu=True, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, out, resume=None, **kw):
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=_rows(),
                                   callbacks=[AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_restores_adapter_head_and_optimizer(tmp_path):
    full = _model(seed=0)
    _train(full, tmp_path / "a")
    final = _trainable(full)
    assert any("head" in n for n in final) and any("lora_A" in n for n in final)

    resumed = _model(seed=1)  # other factors and head: the resume must overwrite both
    assert not torch.equal(resumed.head.weight, full.head.weight)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    _train(resumed, tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    got = _trainable(resumed)
    assert got.keys() == final.keys()
    for name in final:  # same ops in the same order: equal to the bit
        torch.testing.assert_close(got[name], final[name], rtol=0, atol=0, msg=name)


def test_checkpoint_round_trip_restores_the_head_in_place(tmp_path):
    """load_checkpoint writes into the model's own head parameters (an optimizer holds them)."""
    saved = _model(seed=0)
    save_checkpoint(saved, str(tmp_path))
    other = _model(seed=1)
    head = other.head.weight
    load_checkpoint(other, str(tmp_path))
    assert other.head.weight is head
    for name, value in _trainable(saved).items():
        torch.testing.assert_close(_trainable(other)[name], value, rtol=0, atol=0, msg=name)


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    """A metric that is best at the first evaluation: training ends on checkpoint-2's adapter
    and head, not on the last checkpoint's."""
    evals = []

    def metric(_pred):
        evals.append(len(evals))
        return {"order": -len(evals)}  # 1st eval -1 (best), 2nd eval -2

    model = _model(seed=0)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="order", greater_is_better=True, save_total_limit=None),
        train_dataset=_rows(), eval_dataset=_rows(8, seed=1), compute_metrics=metric,
        callbacks=[AdapterCheckpointCallback()],
    )
    trainer.train()
    assert len(evals) == 2
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best, last = _model(seed=7), _model(seed=8)
    load_checkpoint(best, str(tmp_path / "checkpoint-2"))
    load_checkpoint(last, str(tmp_path / "checkpoint-4"))
    got, want, other = _trainable(model), _trainable(best), _trainable(last)
    assert any(not torch.equal(want[n], other[n]) for n in want), "the two checkpoints differ"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
