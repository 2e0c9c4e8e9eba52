"""Adapters on disk in PEFT's format: ``save_adapter`` and ``load_adapter``.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``: ``peft_type: "LORA"``,
``r``, ``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with PEFT's
key names ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. PEFT's older
``adapter_model.bin`` is read too. DoRA adapters (``use_dora: true``) also hold PEFT's
``base_model.model.<module path>.lora_magnitude_vector`` [out] per layer.

PiSSA/OLoRA (PEFT's conventions, both supported):

- default: the adapter is saved as trained with ``init_lora_weights: "pissa"``/``"olora"`` in
  the config. It must be loaded onto the *original* base model: PEFT's
  ``PeftModel.from_pretrained`` and ``fastlora.load_adapter`` both recompute the residual
  ``W_res = W - s * B0 A0`` (unique whatever the signs an SVD/QR returns) and then load the
  trained factors.
- ``convert_to_lora=True`` (PEFT's ``path_initial_model_for_weight_conversion``): the update
  ``s * (B A - B0 A0)`` is written as a plain LoRA of rank ``2r`` (``A' = [A; A0]``,
  ``B' = [B, -B0]``, ``lora_alpha`` doubled, or times sqrt(2) with rsLoRA, ``init_lora_weights:
  true``), which any LoRA loader applies to the original base. Needs the initial factors that
  ``apply_lora`` keeps in ``model.fastlora_config``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Union

import torch
from torch import nn

from fastlora import bases, heads, inits
from fastlora.dora import MAGNITUDE_KEY
from fastlora.model import (
    DEFAULT_ADAPTER,
    FastLoRAConfig,
    adapter_configs,
    apply_lora,
    check_adapter_name,
    config_from_peft,
    find_target_modules,
    lora_layers,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

PathLike = Union[str, "os.PathLike[str]"]


def _key(name: str, factor: str) -> str:
    return f"{KEY_PREFIX}{name}.{factor}.weight"


def _magnitude_key(name: str) -> str:
    """PEFT's key of a DoRA magnitude in a saved adapter (no ``.weight`` suffix)."""
    return f"{KEY_PREFIX}{name}.{MAGNITUDE_KEY}"


def _peft_config_dict(config: FastLoRAConfig, r: int, lora_alpha: float, init: Any) -> dict:
    """The ``adapter_config.json`` fields of a PEFT ``LoraConfig`` (the others take PEFT's
    defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "use_rslora": config.use_rslora,
        "init_lora_weights": init,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": config.use_dora,
        "lora_bias": False,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(
    model: nn.Module, path: PathLike, convert_to_lora: bool = False, adapter_name: str | None = None
) -> None:
    """Write ``model``'s LoRA factors as a PEFT adapter directory at ``path`` (created if needed)
    that ``peft.PeftModel.from_pretrained(base, path)`` and ``load_adapter`` read.

    ``adapter_name``: that adapter alone, at ``path``. ``None``: every adapter in PEFT's
    multi-adapter layout (``PeftModel.save_pretrained``'s): ``"default"`` at ``path``, each other
    adapter at ``path/<name>/``; a model with one adapter named ``"default"`` is thus written at
    ``path``. ``convert_to_lora``: for a PiSSA/OLoRA model, write the plain rank-``2r`` LoRA
    equivalent (see the module docstring); a no-op for plain inits. A failed write raises
    ``OSError`` naming ``path`` (the cause chained).
    """
    configs = adapter_configs(model)
    layers = lora_layers(model)
    if not configs or not layers:
        raise ValueError(
            "save_adapter: the model has no fastlora adapter "
            "(call fastlora.apply_lora, load_adapter or from_peft first)"
        )
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"save_adapter: {path!r} is a file; expected a directory")
    if adapter_name is not None:
        if adapter_name not in configs:
            raise ValueError(
                f"save_adapter: unknown adapter_name {adapter_name!r}; the model has {sorted(configs)}"
            )
        _save_one(model, path, adapter_name, configs[adapter_name], convert_to_lora)
        return
    for name, config in configs.items():
        where = path if name == DEFAULT_ADAPTER else os.path.join(path, name)
        _save_one(model, where, name, config, convert_to_lora)


def _adapter_views(model: nn.Module, adapter_name: str) -> dict:
    """Module name -> the object holding ``adapter_name``'s factors on that layer."""
    views = {}
    for name, layer in lora_layers(model).items():
        ad = layer.adapter(adapter_name)
        if ad is not None:
            views[name] = ad
    return views


def _save_one(model: nn.Module, path: str, adapter_name: str, config: FastLoRAConfig,
              convert_to_lora: bool) -> None:
    from safetensors.torch import save_file

    layers = _adapter_views(model, adapter_name)
    if not layers:
        raise ValueError(f"save_adapter: no layer holds adapter {adapter_name!r}")
    for name, layer in layers.items():
        if (layer.r, layer.lora_alpha, layer.use_rslora, layer.use_dora) != (
            config.r,
            config.lora_alpha,
            config.use_rslora,
            config.use_dora,
        ):
            raise ValueError(
                f"save_adapter: layer {name} has (r, lora_alpha, use_rslora, use_dora)="
                f"{(layer.r, layer.lora_alpha, layer.use_rslora, layer.use_dora)}, the model's "
                f"config {(config.r, config.lora_alpha, config.use_rslora, config.use_dora)}; "
                "one setting per adapter"
            )
    r, alpha, init = config.r, config.lora_alpha, config.init_lora_weights
    tensors: dict[str, torch.Tensor] = {}
    if convert_to_lora and inits.is_decomposition(init):
        missing = sorted(set(layers) - set(config.initial_factors))
        if missing:
            raise ValueError(
                f"save_adapter(convert_to_lora=True): the initial {init} factors of "
                f"{_short(missing)} "
                "are unknown (kept only by fastlora.apply_lora); save without convert_to_lora"
            )
        for name, layer in layers.items():
            A0, B0 = config.initial_factors[name]
            A, B = layer.lora_A.detach(), layer.lora_B.detach()
            tensors[_key(name, "lora_A")] = torch.cat([A, A0.to(A)], dim=0)
            tensors[_key(name, "lora_B")] = torch.cat([B, -B0.to(B)], dim=1)
        r = 2 * config.r
        alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
        init = True
    else:
        for name, layer in layers.items():
            tensors[_key(name, "lora_A")] = layer.lora_A.detach()
            tensors[_key(name, "lora_B")] = layer.lora_B.detach()
    if config.use_dora:
        # the magnitude is unchanged by convert_to_lora: W + s' B' A' is the same weight
        for name, layer in layers.items():
            tensors[_magnitude_key(name)] = layer.lora_magnitude_vector.detach()
    tensors.update(heads.state(model, heads.resolved(model)))
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    config_text = json.dumps(_peft_config_dict(config, r, alpha, init), indent=2, sort_keys=True)
    try:
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            f.write(config_text + "\n")
    except Exception as err:  # OSError, or safetensors' SafetensorError naming its temp file
        if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":
            raise
        raise OSError(
            f"save_adapter: cannot write the adapter to {path!r} "
            f"({type(err).__name__}: {err}); check that the directory is writable and has space"
        ) from err


# how many keys or names a load/save error lists before "... (N in all)"
MAX_LISTED = 5


def _short(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def read_adapter_config(path: PathLike) -> dict:
    """``adapter_config.json`` of the adapter directory ``path`` as a dict."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {os.fspath(path)!r}")
    try:
        with open(file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument type)
            f"load_adapter: {file} holds a {type(config).__name__}, expected a JSON object"
        )
    return config


def read_adapter_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the adapter directory ``path`` on the CPU (safetensors, else PEFT's .bin)."""
    path = os.fspath(path)
    st, bin_ = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"load_adapter: cannot read {st}: corrupted or truncated safetensors file ({err})"
            ) from err
    if os.path.isfile(bin_):
        try:
            state = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a damaged pickle/zip
            raise ValueError(
                f"load_adapter: cannot read {bin_}: corrupted or truncated file ({err})"
            ) from err
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"load_adapter: {bin_} does not hold a dict of tensors")
        return state
    raise FileNotFoundError(f"load_adapter: no {SAFETENSORS_NAME} or {BIN_NAME} in {path!r}")


def _expected_shapes(
    model: nn.Module, names: list[str], r: int, use_dora: bool = False
) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in names:
        m = model.get_submodule(name)
        shapes[_key(name, "lora_A")] = (r, m.in_features)
        shapes[_key(name, "lora_B")] = (m.out_features, r)
        if use_dora:
            shapes[_magnitude_key(name)] = (m.out_features,)
    return shapes


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str,
    any_dtype: frozenset = frozenset(),
) -> None:
    """``any_dtype``: keys whose tensors may be of any dtype (a head's integer buffers)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(
            f"unexpected keys {_short(unexpected)} (fastlora reads only "
            f"'{KEY_PREFIX}<module>.lora_A.weight'/'.lora_B.weight' of the target layers, "
            f"'.{MAGNITUDE_KEY}' when the config has use_dora: true, and the state of the "
            "modules_to_save modules)"
        )
    bad = []
    for key in sorted(set(expected) & set(tensors)):
        t = tensors[key]
        if tuple(t.shape) != expected[key]:
            bad.append(f"{key}: expected shape {list(expected[key])}, got {list(t.shape)}")
        elif not t.dtype.is_floating_point and key not in any_dtype:
            bad.append(f"{key}: expected a floating-point tensor, got {t.dtype}")
    problems += bad[:MAX_LISTED]
    if len(bad) > MAX_LISTED:
        problems.append(f"... ({len(bad)} tensors of the wrong shape or dtype in all)")
    if problems:
        raise ValueError(
            f"load_adapter: {where} does not fit the model:\n  " + ";\n  ".join(problems)
        )


def load_adapter(model: nn.Module, path: PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` under ``adapter_name`` and return it.
    An adapter of that name already on the model has its factors replaced; a new name on an
    adapted model is added beside the others (``apply_lora(..., adapter_name=...)``).

    On a model without fastlora layers the adapter's config is applied first (``apply_lora``
    with its ``target_modules``, ``r``, ... and, for PiSSA/OLoRA, the decomposition of the
    original weights); on a model that already has them (``apply_lora``/``from_peft``) the
    factors are replaced, which needs the same layers, ``r``, scaling and init family.
    Every name and shape is checked against the file before the model is touched; a problem
    raises ``ValueError`` saying what does not fit and leaves the model unchanged. The loaded
    factors are trainable, cast to each layer's dtype; so are the ``modules_to_save`` modules
    (a classifier head) whose state the file holds under PEFT's keys.
    """
    path = os.fspath(path)
    check_adapter_name(adapter_name)
    raw = read_adapter_config(path)
    config = config_from_peft(raw)
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise ValueError(
            f"load_adapter: {CONFIG_NAME} has r={config.r!r}, expected an integer >= 1"
        )
    tensors = read_adapter_tensors(path)
    where = os.path.join(
        path, SAFETENSORS_NAME if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)) else BIN_NAME
    )
    layers = _adapter_views(model, adapter_name)
    if layers:
        existing = adapter_configs(model).get(adapter_name)
        problems = []
        for name, layer in layers.items():
            if layer.r != config.r or not math.isclose(
                layer.scaling, config.scaling, rel_tol=1e-12
            ):
                problems.append(
                    f"{name} has r={layer.r}, scaling={layer.scaling}; the adapter "
                    f"r={config.r}, scaling={config.scaling}"
                )
        dora_layers = sorted(n for n, layer in layers.items() if layer.use_dora != config.use_dora)
        if dora_layers:
            problems.append(
                f"the adapter has use_dora={config.use_dora}, the layers {_short(dora_layers)} "
                f"use_dora={not config.use_dora}"
            )
        ours = existing.init_lora_weights if existing is not None else True
        if inits.is_decomposition(ours) != inits.is_decomposition(config.init_lora_weights) or (
            inits.is_decomposition(ours) and ours != config.init_lora_weights
        ):
            problems.append(
                f"the model's base was prepared with init_lora_weights={ours!r}, the adapter "
                f"with {config.init_lora_weights!r} (load it onto the original base model)"
            )
        if problems:
            raise ValueError(
                f"load_adapter: {path} does not fit the model's LoRA layers: "
                + "; ".join(problems[:10])
            )
        head_names = heads.find(model, config.modules_to_save, layers, strict=False)
        _check_adapter_tensors(model, tensors, sorted(layers), head_names, config, where)
    else:
        mode = config.init_lora_weights
        adding = bool(lora_layers(model))  # another named adapter: heads stay the first's
        names = find_target_modules(model, config.target_modules, config.exclude_modules,
                                    allow_lora=adding)
        head_names = [] if adding else heads.find(model, config.modules_to_save, names,
                                                  strict=False)
        _check_adapter_tensors(model, tensors, names, head_names, config, where)
        apply_mode = mode if inits.is_decomposition(mode) else True
        bases.keep_training_layout(model, "load_adapter")  # its warnings name load_adapter
        apply_lora(
            model,
            config.target_modules,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=apply_mode,
            exclude_modules=config.exclude_modules,
            use_dora=config.use_dora,
            modules_to_save=config.modules_to_save if head_names else None,
            adapter_name=adapter_name,
        )
        added = adapter_configs(model)[adapter_name]
        added.init_lora_weights = mode
        if config.base_model_name_or_path:
            added.base_model_name_or_path = config.base_model_name_or_path
        layers = _adapter_views(model, adapter_name)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[_key(name, "lora_A")])
            layer.lora_B.copy_(tensors[_key(name, "lora_B")])
            if config.use_dora:
                layer.lora_magnitude_vector.copy_(tensors[_magnitude_key(name)])
    heads.load(model, head_names, tensors)
    recorded = getattr(model, "fastlora_config", None)
    if head_names and recorded is not None:  # the heads now travel with this adapter too
        ours = recorded.modules_to_save or []
        recorded.modules_to_save = sorted(set(ours) | set(config.modules_to_save))
    return model


def _check_adapter_tensors(model: nn.Module, tensors: dict, names: list[str],
                           head_names: list[str], config: FastLoRAConfig, where: str) -> None:
    """The file holds exactly the factors of ``names`` and the state of ``head_names``."""
    expected = _expected_shapes(model, names, config.r, config.use_dora)
    head_shapes = heads.expected_shapes(model, head_names)
    _check_tensors(tensors, {**expected, **head_shapes}, where, frozenset(head_shapes))
