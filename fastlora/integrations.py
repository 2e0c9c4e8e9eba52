"""Training frameworks: ``transformers.Trainer`` and TRL's ``SFTTrainer`` (any Trainer subclass).

A fastlora model trains under a Trainer as it is: only its trainable parameters (the LoRA
factors) reach the optimizer, and ``model.gradient_checkpointing_enable()`` works. What the
Trainer cannot know by itself is that the model is an adapter on a frozen base: it would save
the full model in every ``checkpoint-N/`` and, handed an adapter-only checkpoint, it cannot
resume (its non-PEFT path looks for ``model.safetensors``). One line fixes both::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[fastlora.integrations.AdapterCheckpointCallback()])

With it, every checkpoint (and ``trainer.save_model()``) holds the adapter in PEFT's format,
``adapter_config.json`` + ``adapter_model.safetensors`` (``peft.PeftModel.from_pretrained`` and
``fastlora.load_adapter`` read it), beside the Trainer's own optimizer, scheduler, RNG and state
files; ``trainer.train(resume_from_checkpoint=...)`` restores the adapter, then the Trainer
restores the optimizer and scheduler as usual; ``load_best_model_at_end`` reloads the best
adapter. A module left trainable whole (a classification head) is saved in the adapter file
as PEFT's ``modules_to_save`` (``fastlora.heads``), so ``load_adapter`` and
``PeftModel.from_pretrained`` restore it; other trainable parameters outside the adapter (part
of a module) are saved beside it in ``trainable_extra.safetensors`` and restored on resume
(PEFT ignores that file).

How: when the Trainer announces itself (``on_init_end``) the callback finds that Trainer and
overrides, on that instance only, its ``_save``, ``_load_from_checkpoint`` and
``_load_best_model``; a checkpoint that holds full weights still goes to the Trainer's own code.
Single-process and DDP training are covered; FSDP and DeepSpeed, which gather or shard the
state themselves, are refused.

Mixed-adapter batches: a batch with an ``"adapter_names"`` entry (one adapter name or
``"__base__"`` per sample; ``AdapterNamesCollator`` builds it from a per-example field) runs its
training or prediction step inside ``fastlora.adapter_batch``. A model with several adapters is
checkpointed in PEFT's multi-adapter layout and resumed from it.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from fastlora import heads
from fastlora.adapter import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from fastlora.model import DEFAULT_ADAPTER, adapter_configs, lora_layers
from fastlora.multi_adapter import adapter_batch

# the batch key a collator fills with one adapter name per sample (``AdapterNamesCollator``)
ADAPTER_NAMES_KEY = "adapter_names"

EXTRA_NAME = "trainable_extra.safetensors"
# files that mean "this checkpoint holds the full model": left to the Trainer's own loader
_FULL_WEIGHT_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)

try:  # the base class only; the callback works without it being importable at module load
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a test/peft extra
    _CallbackBase = object


def _lora_param_ids(model: nn.Module) -> set[int]:
    """The parameters ``save_adapter`` writes: the factors, DoRA's magnitude, the heads."""
    ids = heads.param_ids(model)
    for layer in lora_layers(model).values():
        for adapter in layer.adapter_names():
            ad = layer.adapter(adapter)
            for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                p = getattr(ad, name, None)
                if isinstance(p, nn.Parameter):
                    ids.add(id(p))
    return ids


def extra_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters of ``model`` that are not LoRA factors (e.g. a classifier head),
    by state-dict name."""
    lora = _lora_param_ids(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora}


def check_model(model: nn.Module) -> None:
    """``ValueError``/``TypeError`` unless ``model`` carries a fastlora adapter."""
    if type(model).__name__ in ("PeftModel", "PeftMixedModel") or hasattr(model, "peft_config"):
        raise TypeError(
            "AdapterCheckpointCallback: the Trainer's model is a PEFT model, which the Trainer "
            "already saves as an adapter; convert it with fastlora.from_peft(model) first, or "
            "drop the callback"
        )
    if getattr(model, "fastlora_config", None) is None or not lora_layers(model):
        raise ValueError(
            f"AdapterCheckpointCallback: the Trainer's model ({type(model).__name__}) has no "
            "fastlora adapter; call fastlora.apply_lora(model, ...) (or load_adapter/from_peft) "
            "before building the Trainer"
        )


def save_checkpoint(model: nn.Module, output_dir: str) -> None:
    """The adapter (PEFT's format) and any other trainable parameters into ``output_dir``."""
    from safetensors.torch import save_file

    heads.adopt_trainable(model)  # a head trained whole goes in the adapter file
    save_adapter(model, output_dir)
    extra = extra_trainable(model)
    if extra:
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in extra.items()}
        path = os.path.join(output_dir, EXTRA_NAME)
        try:
            save_file(tensors, path, metadata={"format": "pt"})
        except (OSError, RuntimeError) as err:
            raise OSError(f"AdapterCheckpointCallback: cannot write {path}: {err}") from err


def is_adapter_checkpoint(path: str) -> bool:
    """True for a directory holding a fastlora/PEFT adapter and no full model weights."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has(CONFIG_NAME) and has(SAFETENSORS_NAME) and not any(map(has, _FULL_WEIGHT_NAMES))


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Restore what ``save_checkpoint`` wrote: the adapter's factors (checked first, model
    unchanged on a mismatch) and the extra trainable parameters (names must match exactly)."""
    from safetensors.torch import load_file

    heads.adopt_trainable(model)  # as save_checkpoint did
    config = read_adapter_config(path)
    saved_heads = heads.find(model, heads.with_task_defaults(
        config.get("modules_to_save"), config.get("task_type")), strict=False)
    if set(saved_heads) != set(heads.resolved(model)):
        raise ValueError(
            f"resume from {path}: the checkpoint trains {sorted(saved_heads) or 'no modules'} "
            f"whole beside the adapter (modules_to_save), the model "
            f"{sorted(heads.resolved(model)) or 'none'}; build the model the same way (same "
            "trainable modules) before resuming"
        )
    extra_file = os.path.join(path, EXTRA_NAME)
    extra_now = extra_trainable(model)
    saved = load_file(extra_file, device="cpu") if os.path.isfile(extra_file) else {}
    if set(saved) != set(extra_now):
        raise ValueError(
            f"resume from {path}: the checkpoint holds trainable parameters outside the adapter "
            f"{sorted(saved) or 'none'}, the model has {sorted(extra_now) or 'none'}; build the "
            "model the same way (same trainable modules) before resuming"
        )
    for name, p in extra_now.items():
        if saved[name].shape != p.shape:
            raise ValueError(
                f"resume from {path}: {name} has shape {list(saved[name].shape)} in {EXTRA_NAME}, "
                f"{list(p.shape)} in the model"
            )
    for name in adapter_configs(model):  # PEFT's multi-adapter layout, as save_adapter writes it
        load_adapter(model, path if name == DEFAULT_ADAPTER else os.path.join(path, name),
                     adapter_name=name)
    with torch.no_grad():
        for name, p in extra_now.items():
            p.copy_(saved[name])


# ---------------------------------------------------------------------------------------------
# the Trainer-side overrides (bound to one Trainer instance)


def _unwrap(trainer: Any) -> nn.Module:
    try:
        return trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    except TypeError:  # older accelerate
        return trainer.accelerator.unwrap_model(trainer.model)


def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    """Trainer._save: the adapter instead of the full model; tokenizer and args as usual."""
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if not self.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    save_checkpoint(_unwrap(self), output_dir)
    if self.processing_class is not None:
        self.processing_class.save_pretrained(output_dir)
    torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
    if not is_adapter_checkpoint(resume_from_checkpoint):
        return self._fastlora_original["_load_from_checkpoint"](resume_from_checkpoint, model)
    load_checkpoint(_unwrap(self) if model is None else model, resume_from_checkpoint)
    return None


def _load_best_model(self) -> None:
    best = self.state.best_model_checkpoint
    if best is None or not is_adapter_checkpoint(best):
        return self._fastlora_original["_load_best_model"]()
    load_checkpoint(_unwrap(self), best)
    return None


def _routed(self, step: str, model: nn.Module, inputs: dict, *args, **kwargs):
    """Run the Trainer's ``step`` (forward and backward both: recomputed checkpointed blocks
    must see the same routing) with each sample on the adapter the batch names."""
    names = inputs.pop(ADAPTER_NAMES_KEY, None) if isinstance(inputs, MutableMapping) else None
    if names is None:
        return self._fastlora_original[step](model, inputs, *args, **kwargs)
    with adapter_batch(_unwrap(self), list(names)):
        return self._fastlora_original[step](model, inputs, *args, **kwargs)


def _training_step(self, model, inputs, *args, **kwargs):
    return _routed(self, "training_step", model, inputs, *args, **kwargs)


def _prediction_step(self, model, inputs, *args, **kwargs):
    return _routed(self, "prediction_step", model, inputs, *args, **kwargs)


_OVERRIDES = {
    "_save": _save,
    "_load_from_checkpoint": _load_from_checkpoint,
    "_load_best_model": _load_best_model,
    "training_step": _training_step,
    "prediction_step": _prediction_step,
}


class AdapterNamesCollator:
    """Wrap a collator for mixed-adapter training: each example's ``adapter_names`` entry
    (one name, or ``"__base__"``) is taken out before ``collator`` runs and the batch gets
    ``batch["adapter_names"]``, the list of them; the Trainer (with
    ``AdapterCheckpointCallback`` or ``attach``) runs the step inside ``adapter_batch``."""

    def __init__(self, collator: Any, key: str = ADAPTER_NAMES_KEY) -> None:
        self.collator, self.key = collator, key

    def __call__(self, features: list[dict]) -> dict:
        missing = [i for i, f in enumerate(features) if self.key not in f]
        if missing:
            raise KeyError(
                f"AdapterNamesCollator: examples {missing[:10]} have no {self.key!r} entry "
                "(one adapter name per example)"
            )
        names = [f[self.key] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch[ADAPTER_NAMES_KEY] = names
        return batch


def attach(trainer: Any) -> None:
    """Make ``trainer`` save and resume its fastlora model as an adapter (idempotent). The
    callback calls this; call it directly for a Trainer built without the callback."""
    for name in _OVERRIDES:
        if not callable(getattr(trainer, name, None)):
            raise TypeError(
                f"fastlora.integrations.attach: expected a transformers.Trainer, "
                f"{type(trainer).__name__} has no {name}()"
            )
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            "AdapterCheckpointCallback: FSDP and DeepSpeed gather the model state themselves; "
            "save the adapter from an unsharded copy (see the README's FSDP2 example)"
        )
    check_model(_unwrap(trainer))
    if getattr(trainer, "_fastlora_original", None) is not None:
        return
    trainer._fastlora_original = {name: getattr(trainer, name) for name in _OVERRIDES}
    for name, fn in _OVERRIDES.items():
        setattr(trainer, name, types.MethodType(fn, trainer))
    if callable(getattr(trainer, "_set_signature_columns_if_needed", None)):
        # remove_unused_columns keeps a dataset column of adapter names
        trainer._set_signature_columns_if_needed()
        if ADAPTER_NAMES_KEY not in trainer._signature_columns:
            trainer._signature_columns.append(ADAPTER_NAMES_KEY)


def _find_trainer(callback: Any) -> Any:
    """The Trainer whose callback handler holds ``callback``: the event comes from one of its
    methods, so it is ``self`` in a frame up the stack."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
                return owner
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError(
        "AdapterCheckpointCallback: could not find the Trainer that called it; pass it as "
        "Trainer(..., callbacks=[fastlora.integrations.AdapterCheckpointCallback()]), or call "
        "fastlora.integrations.attach(trainer)"
    )


class AdapterCheckpointCallback(_CallbackBase):
    """``Trainer(..., callbacks=[AdapterCheckpointCallback()])``: checkpoints hold the fastlora
    adapter in PEFT's format instead of the full model, and resuming restores it (see the
    module docstring)."""

    def on_init_end(self, args, state, control, **kwargs):
        attach(_find_trainer(self))
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        # added with trainer.add_callback() after __init__: saving still goes through us
        attach(_find_trainer(self))
        return control
