"""Mixed-adapter batches under the Hugging Face Trainer: names from the collator, each
adapter trained from its own samples only, checkpoints in PEFT's multi-adapter layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora.integrations import AdapterCheckpointCallback, AdapterNamesCollator

transformers = pytest.importorskip("transformers")


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1).mean(-1)
        loss = None if labels is None else ((out - labels) ** 2).mean()
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, names) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(len(names), 3, 6, generator=g)
        self.y = torch.randn(len(names), generator=g)
        self.names = names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i], "adapter_names": self.names[i]}


def stack(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def model_with_adapters():
    torch.manual_seed(0)
    model = Regressor()
    fastlora.apply_lora(model, ["fc1"], r=2, init_lora_weights=False, adapter_name="a")
    fastlora.apply_lora(model, ["fc1"], r=3, init_lora_weights=False, adapter_name="b")
    return model


def train(model, names, tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(names), max_steps=1,
        learning_rate=0.5, report_to=[], use_cpu=True, save_strategy="no", optim="sgd",
        lr_scheduler_type="constant", logging_strategy="no", **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(names),
                                   data_collator=AdapterNamesCollator(stack),
                                   callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    return trainer


def test_trainer_step_equals_manual_mixed_step(tmp_path):
    names = ["a", "__base__", "a", "a"]  # "b" has no sample: it must not move
    model = model_with_adapters()
    manual = copy.deepcopy(model)
    before_b = model.fc1.adapter("b").lora_A.detach().clone()
    train(model, names, tmp_path)
    data = AdapterNamesCollator(stack)([Rows(names)[i] for i in range(len(names))])
    assert data.pop("adapter_names") == names
    with fastlora.adapter_batch(manual, names):
        manual(data["x"], data["labels"])["loss"].backward()
    expected = manual.fc1.lora_A.detach() - 0.5 * manual.fc1.lora_A.grad
    torch.testing.assert_close(model.fc1.lora_A.detach(), expected)
    torch.testing.assert_close(model.fc1.adapter("b").lora_A.detach(), before_b, rtol=0, atol=0)


def test_trainer_checkpoint_holds_every_adapter(tmp_path):
    model = model_with_adapters()
    trainer = train(model, ["a", "b", "b", "a"], tmp_path)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "a" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "b" / "adapter_config.json").is_file()
    assert not (tmp_path / "out" / "trainable_extra.safetensors").exists()


def test_collator_names_missing():
    with pytest.raises(KeyError, match="examples \\[1\\] have no 'adapter_names'"):
        AdapterNamesCollator(stack)([{"x": torch.ones(1), "adapter_names": "a"}, {"x": torch.ones(1)}])
