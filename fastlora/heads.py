"""Fully trained modules beside the adapter, PEFT's ``modules_to_save`` (a classifier head).

A module named by ``modules_to_save`` trains whole and travels in the adapter file under its
own state-dict keys, ``base_model.model.<module path>.<key>`` (PEFT writes
``base_model.model.classifier.weight`` for ``modules_to_save=["classifier"]``), so PEFT's
``PeftModel.from_pretrained`` and ``fastlora.load_adapter`` both restore it.

Matching is PEFT's (``peft.utils.other._set_trainable``): an entry selects every module whose
qualified name ends with it; entries that match nothing are ignored (PEFT's task defaults list
``"classifier"`` and ``"score"``, of which a model has one), but a list that matches nothing at
all is an error. PEFT trains a copy and keeps the original for ``disable_adapter``; fastlora
trains the module in place (it has no disabled state), so the memory is the module's once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# PEFT's defaults added to modules_to_save by task_type (PeftModelForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering)
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
KEY_PREFIX = "base_model.model."


def normalise(value: object, arg: str = "modules_to_save") -> list[str] | None:
    """None, or the sorted distinct entries of a list of non-empty names."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{arg}: expected a list of module names or suffixes, got {value!r}")
    value = list(value)
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{arg}: expected non-empty strings, got {value!r}")
    return sorted(set(value)) or None


def with_task_defaults(modules_to_save: object, task_type: object) -> list[str] | None:
    """``modules_to_save`` plus PEFT's heads for ``task_type`` (e.g. ``"SEQ_CLS"``)."""
    names = normalise(modules_to_save) or []
    task = getattr(task_type, "value", task_type)
    names += TASK_HEADS.get(task, ())
    return sorted(set(names)) or None


def find(model: nn.Module, modules_to_save: list[str] | None, lora_names: Iterable[str] = (),
         arg: str = "modules_to_save", strict: bool = True) -> list[str]:
    """Qualified names of the modules ``modules_to_save`` selects (the outermost of nested
    matches). ``ValueError`` when the list matches no module (unless ``strict=False``: a
    loaded adapter's task defaults, PEFT's leniency), or a match overlaps a LoRA layer
    (``lora_names``: adapted names, or the names about to be adapted)."""
    if not modules_to_save:
        return []
    matched = [n for n, _ in model.named_modules() if n and n.endswith(tuple(modules_to_save))]
    names = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    if not names and strict:
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"{arg}: {modules_to_save} match no module of {type(model).__name__} (a name "
            f"must end with an entry); its top-level modules are: {top}"
        )
    lora = set(lora_names)
    clash = [n for n in names if any(t == n or t.startswith(n + ".") or n.startswith(t + ".")
                                     for t in lora)]  # fmt: skip
    if clash:
        raise ValueError(
            f"{arg}: {clash} would be both trained whole and adapted with LoRA (or hold/sit in "
            "an adapted layer); remove them from modules_to_save or from target_modules"
        )
    return names


def mark_trainable(model: nn.Module, names: list[str]) -> None:
    for name in names:
        model.get_submodule(name).requires_grad_(True)


def resolved(model: nn.Module) -> list[str]:
    """The qualified names of the heads recorded in ``model.fastlora_config``."""
    config = getattr(model, "fastlora_config", None)
    return find(model, getattr(config, "modules_to_save", None), strict=False)


def param_ids(model: nn.Module) -> set[int]:
    """The parameters of the recorded heads (saved in the adapter file)."""
    return {id(p) for n in resolved(model) for p in model.get_submodule(n).parameters()}


def state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The heads' tensors under PEFT's adapter-file keys."""
    return {
        f"{KEY_PREFIX}{name}.{key}": t.detach()
        for name in names
        for key, t in model.get_submodule(name).state_dict().items()
    }


def expected_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in state(model, names).items()}


@torch.no_grad()
def load(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the heads' tensors (checked beforehand) in and leave the heads trainable."""
    for name in names:
        module = model.get_submodule(name)
        for key, t in module.state_dict(keep_vars=True).items():
            t.copy_(tensors[f"{KEY_PREFIX}{name}.{key}"])
    mark_trainable(model, names)


def adopt_trainable(model: nn.Module) -> list[str]:
    """Record, as ``modules_to_save`` of ``model.fastlora_config``, the outermost modules
    whose parameters all train and hold no LoRA layer (a head made trainable by hand,
    ``model.classifier.requires_grad_(True)``), so that they travel in the adapter file.
    Returns the names added."""
    from fastlora.model import lora_layers  # heads sit below model.py

    config = model.fastlora_config
    lora = list(lora_layers(model))
    known = set(resolved(model))
    found: list[str] = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if (not name or not params or any(name.startswith(f + ".") for f in found + list(known))
                or name in known or not all(p.requires_grad for p in params)
                or any(t == name or t.startswith(name + ".") or name.startswith(t + ".")
                       for t in lora)):  # a LoRA layer's own submodules (named adapters) too
            continue
        found.append(name)
    if found:
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(found))
    return found


def unwrap_peft(model: nn.Module, wrapper_type: type, adapter: str) -> list[str]:
    """Replace each PEFT ``ModulesToSaveWrapper`` of ``model`` with its trained copy for
    ``adapter`` (the very module object, so its parameters carry over); the names replaced."""
    from fastlora.model import _set_submodule

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, wrapper_type):
            copies = module.modules_to_save  # one copy (checked), keyed by its adapter's name
            copy = copies[adapter] if adapter in copies else next(iter(copies.values()))
            _set_submodule(model, name, copy)
            names.append(name)
    return names


def peft_wrapper_problems(name: str, module: nn.Module, adapter: str | None) -> list[str]:
    """Why a PEFT ``ModulesToSaveWrapper`` cannot be converted (disabled, another adapter)."""
    problems = []
    if adapter is not None and adapter not in module.modules_to_save:
        problems.append(f"{name}: modules_to_save has no copy for adapter {adapter!r}")
    if module.disable_adapters:
        problems.append(f"{name}: modules_to_save is disabled; enable adapters first")
    if len(module.modules_to_save) > 1:
        problems.append(f"{name}: modules_to_save holds several adapters "
                        f"{sorted(module.modules_to_save)}; fastlora holds one")
    return problems
