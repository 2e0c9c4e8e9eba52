"""Model-level helpers with PEFT's face: ``apply_lora``, ``merge_lora``, ``from_peft``,
``trainable_parameters``/``print_trainable_parameters``.

Target matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists``):
a string is a regex that must match the whole qualified module name; a list matches a name
equal to an entry or ending with ``"." + entry``; ``"all-linear"`` (any case) takes every
``nn.Linear`` but the output head; ``exclude_modules`` (same two forms) wins over targets.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from fastlora import bases, heads, inits
from fastlora.layer import FastLoRALinear, _check_hparams, _check_use_dora

TargetModules = Union[str, Iterable[str]]

ALL_LINEAR = "all-linear"
# PEFT's SEQ_CLS_HEAD_NAMES: classifier heads "all-linear" leaves alone when a model has no
# output embeddings
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
DEFAULT_ADAPTER = "default"
# the name that means "no adapter" in a mixed batch (PEFT's)
BASE_NAME = "__base__"
# how many module names an error message lists before it says "... (N in all)"
MAX_LISTED_NAMES = 30


@dataclass
class FastLoRAConfig:
    """What ``apply_lora`` did, recorded on the model as ``model.fastlora_config``.

    ``target_modules`` is kept as given (a regex string, or a sorted list of names/suffixes),
    except ``"all-linear"``, which is stored resolved to the sorted list of adapted names so a
    saved adapter targets exactly the same layers wherever it is loaded.
    ``modules_to_save`` (PEFT's): modules trained whole and saved with the adapter, as
    given (see ``fastlora.heads``).
    ``initial_factors`` holds the ``(lora_A, lora_B)`` of a PiSSA/OLoRA start, per module
    name, for ``save_adapter(..., convert_to_lora=True)``; it is not part of any state dict.
    """

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: inits.InitMode = True
    target_modules: str | list = field(default_factory=list)
    exclude_modules: str | list | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    modules_to_save: list | None = None
    initial_factors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# ---------------------------------------------------------------------------------------------
# target matching


def _normalise_names(value: object, arg: str, allow_none: bool) -> str | list | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{arg}: expected a regex string or a list of names, got ''")
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(v, str) and v for v in value
    ):
        if not value and not allow_none:
            raise ValueError(
                f"{arg}: expected at least one name, got an empty {type(value).__name__}"
            )
        return sorted(set(value))
    raise TypeError(
        f"{arg}: expected a regex string, a list of module names or suffixes"
        f"{', or None' if allow_none else ''}, got {value!r}"
    )


def _matches(spec: str | list, name: str) -> bool:
    """PEFT's rule: a string full-matches as a regex; a list entry equals the name or is a
    suffix after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + entry) for entry in spec)


def _entry_matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2-style ``Conv1D``: a linear map stored transposed ([in, out])."""
    return type(module).__name__ == "Conv1D"


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def _listing(names: list[str]) -> str:
    shown = names[:MAX_LISTED_NAMES]
    more = f", ... ({len(names)} in all)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def _describe_linears(model: nn.Module) -> str:
    """The distinct leaf names of the model's linear layers: what a target list can name
    (full names are ``[n for n, _ in model.named_modules()]`` away)."""
    names = _linear_names(model)
    if not names:
        return f"{type(model).__name__} has no nn.Linear layers"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (
        f"its {len(names)} nn.Linear layers are named (last part): {', '.join(suffixes)}"
    )


def output_head_names(model: nn.Module) -> set[str]:
    """The layers ``"all-linear"`` leaves out: ``get_output_embeddings()`` (an LM head) or,
    when there is none, a top-level ``score``/``classifier`` (PEFT's rule with SEQ_CLS)."""
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        heads.append(out)
    else:
        for attr in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                heads.append(head)
                break
    names = set()
    for name, module in model.named_modules():
        if any(module is head for head in heads):
            names.add(name)
    return names


def find_target_modules(
    model: nn.Module, target_modules: TargetModules, exclude_modules: TargetModules | None = None,
    allow_lora: bool = False,
) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that ``target_modules`` selects (PEFT's rules).

    Raises ``ValueError`` when a target matches nothing (listing the model's linear layers),
    ``TypeError`` when it matches a module that is not an ``nn.Linear`` (GPT-2-style
    ``Conv1D`` included: fastlora refuses fan_in_fan_out layers) or one that already has LoRA.
    """
    targets = _normalise_names(target_modules, "target_modules", allow_none=False)
    exclude = _normalise_names(exclude_modules, "exclude_modules", allow_none=True)
    modules = [(n, m) for n, m in model.named_modules() if n]
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        heads = output_head_names(model)
        matched = [
            (n, m)
            for n, m in modules
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and n not in heads
        ]
    else:
        matched = [(n, m) for n, m in modules if _matches(targets, n)]
        if isinstance(targets, str):
            if not matched:
                raise ValueError(
                    f"target_modules: the regex {targets!r} matches no module name "
                    f"(it must match the whole name); {_describe_linears(model)}"
                )
        else:
            unknown = [e for e in targets if not any(_entry_matches(e, n) for n, _ in modules)]
            if unknown:
                raise ValueError(
                    f"target_modules: {unknown} match no module of "
                    f"{type(model).__name__}; {_describe_linears(model)}"
                )
    if exclude is not None:
        matched = [(n, m) for n, m in matched if not _matches(exclude, n)]
    if not matched:
        raise ValueError(
            f"target_modules: every module matched by {targets!r} is excluded by "
            f"exclude_modules={exclude!r}; {_describe_linears(model)}"
        )
    bad = []
    for name, module in matched:
        if isinstance(module, FastLoRALinear):
            if not allow_lora:
                bad.append(f"{name} (already a FastLoRALinear)")
        elif _is_conv1d(module):
            bad.append(
                f"{name} (a transposed Conv1D, PEFT's fan_in_fan_out=True: fastlora supports "
                "nn.Linear only; convert the model to nn.Linear first)"
            )
        elif not isinstance(module, nn.Linear):
            bad.append(f"{name} ({type(module).__name__}, not an nn.Linear)")
    if bad:
        raise TypeError(
            f"target_modules={targets!r} selects layers fastlora cannot adapt: "
            f"{_listing(bad)}. Narrow target_modules or use exclude_modules; "
            f"{_describe_linears(model)}"
        )
    return [n for n, _ in matched]


# ---------------------------------------------------------------------------------------------
# apply / merge


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, FastLoRALinear]:
    """Every ``FastLoRALinear`` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FastLoRALinear)}


# The model's adapters: ``model.fastlora_configs`` maps each name to its FastLoRAConfig (in the
# order added), ``model.fastlora_active_adapter`` names the adapter of ordinary calls and
# ``model.fastlora_config`` is that adapter's config (the single-adapter attribute, unchanged).


def adapter_configs(model: nn.Module) -> dict[str, FastLoRAConfig]:
    """Every adapter's config by name (a model from an older fastlora: its one config)."""
    configs = getattr(model, "fastlora_configs", None)
    if configs is not None:
        return configs
    config = getattr(model, "fastlora_config", None)
    return {} if config is None else {active_adapter(model): config}


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter ordinary calls use."""
    name = getattr(model, "fastlora_active_adapter", None)
    if name is None:
        configs = getattr(model, "fastlora_configs", None)
        name = next(iter(configs)) if configs else DEFAULT_ADAPTER
    return name


def set_active(model: nn.Module, name: str) -> None:
    model.fastlora_active_adapter = name
    model.fastlora_config = adapter_configs(model)[name]


def register_adapter(model: nn.Module, name: str, config: FastLoRAConfig) -> None:
    """Record ``config`` under ``name``; the first adapter becomes the active one."""
    configs = dict(adapter_configs(model))
    first = not configs
    configs[name] = config
    model.fastlora_configs = configs
    if first:
        set_active(model, name)


def forget_adapter(model: nn.Module, name: str) -> None:
    """Drop ``name``'s config; the active adapter moves to the first remaining one."""
    configs = {n: c for n, c in adapter_configs(model).items() if n != name}
    for attr in ("fastlora_configs", "fastlora_active_adapter", "fastlora_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    if configs:
        model.fastlora_configs = configs
        set_active(model, next(iter(configs)))


def check_adapter_name(name: object, arg: str = "adapter_name") -> str:
    if not isinstance(name, str) or not name or name == BASE_NAME or any(c in name for c in "./\\"):
        raise ValueError(
            f"{arg}: expected a non-empty name without '.', '/' or '\\' other than "
            f"{BASE_NAME!r}, got {name!r}"
        )
    return name


def _check_untouched(model: nn.Module, fn: str) -> None:
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        raise TypeError(f"{fn}: got a PEFT model; use fastlora.from_peft(model) to convert it")
    if getattr(model, "fastlora_config", None) is not None or lora_layers(model):
        raise ValueError(
            f"{fn}: the model already has FastLoRALinear layers; start from the "
            "base model, or fastlora.merge_lora(model) first"
        )


def _check_decomposable(model: nn.Module, names: list[str], mode: str, r: int) -> None:
    """PiSSA/OLoRA overwrite the base weight: refuse weights shared with another parameter
    (tied embeddings), integer/quantised weights and r beyond the weight's rank."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    problems = []
    for name in names:
        w = model.get_submodule(name).weight
        shared = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if shared:
            problems.append(
                f"{name}.weight is shared with {shared} (tied weights would change there too)"
            )
        if not w.dtype.is_floating_point or bases.is_fp8(w):
            problems.append(f"{name}.weight has dtype {w.dtype} (needs a float weight)")
        if r > min(w.shape):
            problems.append(f"{name}: r={r} exceeds min(out, in)={min(w.shape)}")
    if problems:
        raise ValueError(f"init_lora_weights={mode!r} cannot decompose: {'; '.join(problems)}")


def apply_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: inits.InitMode = True,
    exclude_modules: TargetModules | None = None,
    autocast_adapter_dtype: bool = True,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` selected by ``target_modules`` with a
    ``FastLoRALinear`` sharing its weight and bias, freeze every other parameter, record the
    config as ``model.fastlora_config`` and return ``model``.

    ``target_modules``: a list of names/suffixes, a regex matched against the full name, or
    ``"all-linear"`` (the output head is left out). ``init_lora_weights``: ``True``,
    ``"gaussian"``, ``False``, or ``"pissa"``/``"olora"``, which overwrite each adapted base
    weight with its residual (output unchanged at step 0). ``autocast_adapter_dtype``
    (PEFT's default): the LoRA factors of float16/bfloat16 layers are kept in float32, so
    the optimizer updates them in full precision; the matmuls still run in the input's dtype.
    ``use_dora`` (PEFT's DoRA): each layer also learns a magnitude ``lora_magnitude_vector``.
    ``modules_to_save`` (PEFT's): modules trained whole beside the adapter and saved in the
    adapter file, e.g. ``["classifier"]`` (a name ending with an entry; see ``fastlora.heads``).
    ``adapter_name``: called again with a new name on an adapted model, adds another adapter
    (its own hyperparameters and targets; plain inits only), trainable, the active one
    unchanged (``fastlora.set_adapter``). Everything is checked before the model is touched.
    """
    _check_hparams(r, lora_alpha, lora_dropout)
    _check_use_dora(use_dora)
    mode = inits.check_mode(init_lora_weights)
    check_adapter_name(adapter_name)
    adding = bool(adapter_configs(model)) or bool(lora_layers(model))
    if adding:
        _check_new_adapter(model, adapter_name, mode)
    else:
        _check_untouched(model, "apply_lora")
    names = find_target_modules(model, target_modules, exclude_modules, allow_lora=adding)
    modules_to_save = heads.normalise(modules_to_save)
    if adding and modules_to_save:
        raise ValueError(
            f"modules_to_save: only a model's first adapter carries heads, got {modules_to_save} "
            f"for adapter {adapter_name!r}"
        )
    head_names = heads.find(model, modules_to_save, names)
    if inits.is_decomposition(mode):
        _check_decomposable(model, names, mode, r)

    targets = _normalise_names(target_modules, "target_modules", allow_none=False)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = sorted(names)
    config = FastLoRAConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        use_rslora=bool(use_rslora),
        init_lora_weights=mode,
        target_modules=targets,
        exclude_modules=_normalise_names(exclude_modules, "exclude_modules", allow_none=True),
        base_model_name_or_path=_name_or_path(model),
        use_dora=use_dora,
        modules_to_save=modules_to_save,
    )
    if not adding:
        for p in model.parameters():
            p.requires_grad_(False)
        heads.mark_trainable(model, head_names)
        bases.keep_training_layout(model)  # a 4-bit model's other Linear4bit layers stay trainable
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, FastLoRALinear):
            dtype = linear.lora_A.dtype if bases.is_4bit(linear.weight) else linear.weight.dtype
            if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            linear.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               use_rslora=use_rslora, init_lora_weights=mode, use_dora=use_dora,
                               dtype=dtype)
            continue
        layer = FastLoRALinear.from_linear(
            linear,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            init_lora_weights=mode,
            use_dora=use_dora,
        )
        if adapter_name != DEFAULT_ADAPTER:
            layer.adapter_name = adapter_name
        layer.train(linear.training)
        if autocast_adapter_dtype and layer.lora_A.dtype in (torch.float16, torch.bfloat16):
            for pname in _adapter_param_names(layer):
                setattr(layer, pname, nn.Parameter(getattr(layer, pname).detach().float()))
        if inits.is_decomposition(mode):
            config.initial_factors[name] = (
                layer.lora_A.detach().clone(),
                layer.lora_B.detach().clone(),
            )
        _set_submodule(model, name, layer)
        if adding:  # a layer new to the model follows the active adapter like the others
            _follow_active(model, layer)
    register_adapter(model, adapter_name, config)
    return model


def _check_new_adapter(model: nn.Module, adapter_name: str, mode: inits.InitMode) -> None:
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        raise TypeError("apply_lora: got a PEFT model; use fastlora.from_peft(model) to convert it")
    known = set(adapter_configs(model)) | {
        n for layer in lora_layers(model).values() for n in layer.adapter_names()
    }
    if adapter_name in known:
        raise ValueError(
            f"adapter_name: the model already has FastLoRALinear layers with an adapter named "
            f"{adapter_name!r} "
            f"(its adapters: {sorted(known)}); pick a new name, or fastlora.delete_adapter first"
        )
    if inits.is_decomposition(mode):
        raise ValueError(
            f"init_lora_weights={mode!r}: PiSSA/OLoRA overwrite the base weights, which the "
            f"model's adapters {sorted(known)} share; only a model's first adapter may use it"
        )
    merged = sorted(n for n, layer in lora_layers(model).items() if layer.merged)
    if merged:
        raise RuntimeError(f"apply_lora: layers {merged[:5]} are merged; unmerge() them first")


def _follow_active(model: nn.Module, layer: FastLoRALinear) -> None:
    """A layer added for a second adapter computes the base while another adapter is active."""
    active = active_adapter(model)
    if layer.adapter_name != active:
        from fastlora.multi_adapter import _AdapterRoute

        layer._route = _AdapterRoute(layer.adapter(active))


def _adapter_param_names(layer: FastLoRALinear) -> tuple[str, ...]:
    return ("lora_A", "lora_B") + (("lora_magnitude_vector",) if layer.use_dora else ())


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Turn every ``FastLoRALinear`` into a plain ``nn.Linear`` holding ``W + scaling * B A``
    (float32 arithmetic at least, float64 for float64 weights; in place in the existing weight
    tensor; the bias is the same
    parameter), drop ``model.fastlora_config`` and return ``model``. The merged weights keep
    ``requires_grad=False``. A PiSSA/OLoRA layer merges to ``W_res + s * B A``, the trained
    weight in the original basis. A layer over a 4-bit or FP8 base becomes a dense ``nn.Linear`` in
    its compute dtype holding ``dequant(W) + s * B A`` (4-bit cannot hold the sum; quantizing
    it again is lossy, as PEFT warns).

    With several adapters, ``adapter_name`` (default: the active one) is merged and the others
    are dropped, as PEFT's ``merge_and_unload(adapter_names=[name])`` does; layers without that
    adapter become their plain base ``nn.Linear``."""
    layers = lora_layers(model)
    if not layers and getattr(model, "fastlora_merged", False):
        warnings.warn("merge_lora: the model is already merged (its adapter is in the base "
                      "weights); returned as it is", UserWarning, stacklevel=2)
        return model
    if not layers:
        raise ValueError("merge_lora: the model has no FastLoRALinear layers")
    name = active_adapter(model) if adapter_name is None else adapter_name
    known = {n for layer in layers.values() for n in layer.adapter_names()}
    if name not in known:
        raise ValueError(f"merge_lora: unknown adapter {name!r}; the model has {sorted(known)}")
    for layer in layers.values():
        if layer.adapter(name) is not None and layer.adapter_name != name:
            layer.unmerge()
            layer.promote(name)
    for name_, layer in layers.items():
        if layer.adapter(name) is None:
            linear = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            linear.weight, linear.bias = layer.weight, layer.bias
            linear.train(layer.training)
            _set_submodule(model, name_, linear)
    layers = {n: layer for n, layer in layers.items() if layer.adapter(name) is not None}
    for name, layer in layers.items():
        if bases.is_quantized(layer.weight):
            linear = _merged_4bit(layer)
        else:
            if not layer.merged:  # layer.merge() called before: its weight holds the sum
                layer.merge()
            linear = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            linear.weight = layer.weight
            linear.bias = layer.bias
        linear.train(layer.training)
        _set_submodule(model, name, linear)
    for attr in ("fastlora_config", "fastlora_configs", "fastlora_active_adapter"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.fastlora_merged = True
    return model


@torch.no_grad()
def _merged_4bit(layer: FastLoRALinear) -> nn.Linear:
    """A dense ``nn.Linear`` holding ``dequant(W) + s B A`` (summed in float32) in the dtype
    the weight was quantized from (4-bit or FP8), the model's own dtype: the dtype its
    activations arrive in, whatever compute dtype the quantized layer computed in (a bf16
    weight in an fp32 model would fail on fp32 inputs). Bias cast to it."""
    dtype = getattr(layer, "fp8_dtype", None) or bases.quantized_from_dtype(layer.weight)
    merged = bases.base_of(layer.weight).dense(torch.float32) + layer.delta_weight().float()
    if layer.use_dora:  # PEFT's merge: (m / ||W + s B A||) * (W + s B A), row by row
        merged.mul_((layer.lora_magnitude_vector.detach().float() / merged.norm(dim=1)).unsqueeze(1))
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
    )
    linear.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


# ---------------------------------------------------------------------------------------------
# parameter counts


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts, each shared parameter counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7324``."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")


# ---------------------------------------------------------------------------------------------
# PEFT -> fastlora

# LoraConfig fields whose non-default values change what the adapter computes in ways
# fastlora does not represent
_PEFT_UNSUPPORTED_FIELDS = {
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


def _peft_config_problems(config: Any) -> list[str]:
    """Reasons a PEFT LoRA config (a LoraConfig or its JSON dict) is not representable."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    problems = []
    peft_type = get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}, fastlora holds LoRA adapters only ('LORA')")
    for key, what in _PEFT_UNSUPPORTED_FIELDS.items():
        if get(key):
            problems.append(f"{what} is not supported ({key}={get(key)!r})")
    if get("bias", "none") != "none":
        problems.append(f"bias={get('bias')!r} trains base biases; only 'none' is supported")
    if get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True (GPT-2-style Conv1D layers) is not supported")
    if get("rank_pattern") or get("alpha_pattern"):
        problems.append(
            "per-layer rank_pattern/alpha_pattern are not supported "
            "(one r and lora_alpha for all layers)"
        )
    if get("layers_to_transform") is not None or get("layers_pattern"):
        problems.append("layers_to_transform/layers_pattern are not supported")
    init = get("init_lora_weights", True)
    lowered = init.lower() if isinstance(init, str) else init
    if lowered not in inits.PEFT_BASE_PRESERVING_INITS + inits.DECOMPOSITION_INITS:
        problems.append(
            f"init_lora_weights={init!r} is not supported: fastlora reloads adapters whose base is "
            f"untouched {inits.PEFT_BASE_PRESERVING_INITS} or split by 'pissa'/'olora'"
        )
    return problems


def config_from_peft(config: Any, base_model_name_or_path: str | None = None) -> FastLoRAConfig:
    """A ``FastLoRAConfig`` from a PEFT ``LoraConfig`` or its ``adapter_config.json`` dict;
    ``ValueError`` listing every field fastlora cannot represent."""
    problems = _peft_config_problems(config)
    if problems:
        raise ValueError("PEFT adapter not supported by fastlora: " + "; ".join(problems))
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    init = get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else init
    target = get("target_modules")
    exclude = get("exclude_modules")
    return FastLoRAConfig(
        r=get("r", 8),
        lora_alpha=get("lora_alpha", 8),
        lora_dropout=float(get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(get("use_rslora", False)),
        init_lora_weights=init,
        target_modules=target if isinstance(target, str) else sorted(target or []),
        exclude_modules=exclude if isinstance(exclude, str) or exclude is None else sorted(exclude),
        base_model_name_or_path=get("base_model_name_or_path") or base_model_name_or_path,
        use_dora=bool(get("use_dora", False)),
        modules_to_save=heads.with_task_defaults(get("modules_to_save"), get("task_type")),
    )


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap PEFT's LoRA ``Linear`` layers for ``FastLoRALinear`` layers holding the very same
    parameter objects (base weight and bias, ``lora_A``, ``lora_B``), so an optimizer built on
    them carries over and outputs and gradients equal PEFT's up to float rounding (fastlora
    adds the low-rank term in another order: about 1e-6 relative in float32); return the
    underlying model with
    ``model.fastlora_config`` set. Accepts a ``PeftModel``, a ``LoraModel`` or a model with
    injected LoRA layers; the PEFT wrapper is consumed (its modules are replaced).

    Several LoRA adapters become fastlora named adapters (PEFT's active one active, every
    one trainable when the active one is). Refused with a ``ValueError``/``TypeError`` that
    names the layer and the feature: LoRA variants other than DoRA, lora_bias, merged or
    disabled adapters, Conv1D (fan_in_fan_out) and non-Linear LoRA layers, trainable-token
    wrappers (a modules_to_save head converts: its trained copy for the active adapter replaces
    the wrapper, see ``fastlora.heads``),
    per-layer rank/alpha patterns, base-mutating inits other than PiSSA/OLoRA. A ``UserWarning``
    when the LoRA factors are frozen (an adapter loaded for inference: ``PeftModel.from_pretrained``
    without ``is_trainable=True``), since the converted model would then train nothing.
    """
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except ImportError as err:  # pragma: no cover - peft is a test dependency
        raise ImportError(
            "fastlora.from_peft needs peft installed: pip install -e \".[peft]\" in a fastlora "
            "checkout (pip install \"fastlora[peft]\" from a package index)"
        ) from err
    lora_linear_types: tuple = (PeftLoraLinear,)
    try:  # PEFT's LoRA over a bitsandbytes Linear4bit (QLoRA)
        from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

        lora_linear_types += (PeftLoraLinear4bit,)
    except ImportError:  # bitsandbytes not installed
        pass
    from peft.utils.other import ModulesToSaveWrapper

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as _Wrapper
    except ImportError:  # older PEFT
        _Wrapper = ModulesToSaveWrapper

    configs: dict = {}
    model = peft_model
    if hasattr(peft_model, "base_model") and isinstance(peft_model.base_model, BaseTuner):
        configs = dict(peft_model.peft_config)
        model = peft_model.base_model.model
    elif isinstance(peft_model, BaseTuner):
        configs = dict(peft_model.peft_config)
        model = peft_model.model
    problems: list[str] = []
    found: dict[str, Any] = {}
    head_names = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):  # a head: its trained copy is kept
            head_names.append(name)
            problems += heads.peft_wrapper_problems(name, module, None)
        elif isinstance(module, _Wrapper):
            problems.append(f"{name}: {type(module).__name__} (trainable tokens)")
        elif isinstance(module, BaseTunerLayer) and type(module) not in lora_linear_types:
            problems.append(
                f"{name}: {type(module).__name__} "
                "(fastlora adapts nn.Linear and bitsandbytes Linear4bit layers with plain LoRA)"
            )
        elif isinstance(module, lora_linear_types):
            found[name] = module
    if not found and not problems:
        raise ValueError("from_peft: found no PEFT LoRA Linear layers in the model")

    adapter_names = {a for m in found.values() for a in m.lora_A}
    # the active adapter first (it becomes fastlora's active one), then PEFT's order
    active = getattr(peft_model, "active_adapter", None)
    active = active if isinstance(active, str) else None
    order = [a for a in [active, *configs, *sorted(adapter_names)] if a in adapter_names]
    order = list(dict.fromkeys(order))
    for adapter in order:
        if adapter == BASE_NAME or "." in adapter or "/" in adapter:
            problems.append(f"adapter name {adapter!r} cannot be a fastlora adapter name")
    hparams_of: dict[str, tuple] = {}
    for adapter in order:
        tag = f"adapter {adapter!r}: " if len(order) > 1 else ""
        if len(order) == 1:
            inactive = sorted(n for n, m in found.items() if adapter not in m.active_adapters)
            problems += [f"{n}: adapter {adapter!r} is not active" for n in inactive]
        hparams = _peft_adapter_problems(
            {n: m for n, m in found.items() if adapter in m.lora_A}, adapter, tag, problems
        )
        if len(hparams) > 1:
            problems.append(
                f"{tag}layers differ in (r, lora_alpha, lora_dropout, use_rslora, use_dora): "
                f"{sorted(hparams)}; "
                "fastlora records one setting for all layers"
            )
        if configs.get(adapter) is not None:
            problems += [tag + p for p in _peft_config_problems(configs[adapter])]
        hparams_of[adapter] = next(iter(hparams)) if hparams else None
    if problems:
        raise ValueError(
            "from_peft: cannot convert without changing the adapter: " + "; ".join(problems)
        )

    fl_configs: dict[str, FastLoRAConfig] = {}
    for adapter in order:
        r, alpha, p, rslora, use_dora = hparams_of[adapter]
        if configs:
            fl_configs[adapter] = config_from_peft(configs[adapter], _name_or_path(model))
        else:
            fl_configs[adapter] = FastLoRAConfig(
                r=r,
                lora_alpha=alpha,
                lora_dropout=p,
                use_rslora=rslora,
                target_modules=sorted(n for n, m in found.items() if adapter in m.lora_A),
                base_model_name_or_path=_name_or_path(model),
                use_dora=use_dora,
                modules_to_save=(sorted(head_names) or None) if adapter == order[0] else None,
            )
    first = order[0]
    frozen = sorted(
        n for n, m in found.items() if first in m.lora_A
        and not (m.lora_A[first].weight.requires_grad and m.lora_B[first].weight.requires_grad)
    )
    if frozen:
        inference = configs and getattr(configs.get(first), "inference_mode", False)
        warnings.warn(
            f"from_peft: the LoRA factors of {len(frozen)} of {len(found)} layers are frozen"
            + (" (the adapter was loaded with inference_mode=True, PeftModel.from_pretrained's "
               "default)" if inference else "")
            + ", so the converted model has nothing to train. To train it, load with "
            "PeftModel.from_pretrained(base, path, is_trainable=True), or call "
            "requires_grad_(True) on each FastLoRALinear's lora_A and lora_B",
            UserWarning,
            stacklevel=2,
        )
    bases.keep_training_layout(model, "from_peft")
    for name, m in found.items():
        base = m.get_base_layer()
        here = [a for a in order if a in m.lora_A]
        layer = None
        for adapter in here:
            r, alpha, p, rslora, use_dora = hparams_of[adapter]
            if layer is None:
                # init False: random factors that are replaced at once by PEFT's parameters
                layer = FastLoRALinear.from_linear(
                    base, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora,
                    init_lora_weights=False
                )
                if adapter != DEFAULT_ADAPTER:
                    layer.adapter_name = adapter
                ad = layer
            else:
                ad = layer.add_adapter(adapter, r=r, lora_alpha=alpha, lora_dropout=p,
                                       use_rslora=rslora, init_lora_weights=False)
            ad.init_lora_weights = fl_configs[adapter].init_lora_weights
            ad.lora_A = m.lora_A[adapter].weight
            ad.lora_B = m.lora_B[adapter].weight
            if use_dora:
                ad.use_dora = True
                ad.lora_magnitude_vector = m.lora_magnitude_vector[adapter].weight
        layer.train(m.training)
        _set_submodule(model, name, layer)
    heads.unwrap_peft(model, ModulesToSaveWrapper, first)
    if not frozen and len(order) > 1:  # PEFT froze its inactive adapters; fastlora trains all
        for layer in lora_layers(model).values():
            for a in layer.adapter_names():
                layer.adapter(a).lora_A.requires_grad_(True)
                layer.adapter(a).lora_B.requires_grad_(True)
    for adapter in order:
        register_adapter(model, adapter, fl_configs[adapter])
    from fastlora.multi_adapter import set_adapter

    set_adapter(model, order[0])
    return model


def _peft_adapter_problems(found: dict, adapter: str, tag: str, problems: list) -> set:
    """Append to ``problems`` what of ``adapter`` on the PEFT layers ``found`` fastlora cannot
    represent; return the set of its (r, lora_alpha, lora_dropout, use_rslora, use_dora)."""
    hparams = set()
    for name, m in found.items():
        base = m.get_base_layer()
        variants = {type(v).__name__ for k, v in m.lora_variant.items() if k == adapter}
        variants -= {"DoraLinearVariant"}
        if variants:
            problems.append(
                f"{tag}{name}: LoRA variant {sorted(variants)} is not supported "
                "(only plain LoRA and DoRA)"
            )
        dora_here = bool(m.use_dora.get(adapter))
        if dora_here != (adapter in m.lora_magnitude_vector):
            problems.append(f"{tag}{name}: use_dora={dora_here} but the magnitude vector is "
                            f"{'missing' if dora_here else 'present'}")
        if m.lora_bias.get(adapter):
            problems.append(f"{tag}{name}: lora_bias=True is not supported")
        if m.merged:
            problems.append(
                f"{tag}{name}: the adapter is merged into the base weight; unmerge() it first"
            )
        if m.disable_adapters:
            problems.append(f"{tag}{name}: adapters are disabled; enable them first")
        if getattr(m, "fan_in_fan_out", False) or not isinstance(base, nn.Linear):
            problems.append(
                f"{tag}{name}: base layer {type(base).__name__} (fan_in_fan_out/Conv1D or "
                "8-bit layers are not supported; fastlora needs nn.Linear or Linear4bit)"
            )
        drop = m.lora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        r, alpha, scaling = m.r[adapter], m.lora_alpha[adapter], m.scaling[adapter]
        rslora = bool(m.use_rslora.get(adapter, False))
        expected = alpha / (math.sqrt(r) if rslora else r)
        if not math.isclose(scaling, expected, rel_tol=1e-12):
            problems.append(
                f"{tag}{name}: scaling {scaling} differs from lora_alpha/r ({expected}); "
                "set_scale/scale_layer changes are not supported"
            )
        hparams.add((r, alpha, p, rslora, dora_here))
    return hparams
