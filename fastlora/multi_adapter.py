"""Many adapters over one frozen base: ``set_adapter``, ``delete_adapter`` and mixed batches.

Inside ``with adapter_batch(model, names):`` each sample (dim 0 of every adapted layer's
input) uses its own adapter, ``"__base__"`` meaning none: PEFT's ``adapter_names``, in eval
and in training (a row's output uses only its adapter, each adapter gets gradients from its
rows only, each adapter's dropout is its own). A layer that lacks a sample's adapter gives
that sample the base output, as PEFT does.

Routing is decided once, on entry: every ``FastLoRALinear`` gets a ``_BatchRoute`` holding the
index tensors of its own adapters, so a forward call does no per-adapter Python work. The
compute is ``fastlora.multi_torch`` (or ``fastlora.multi_triton`` on the Triton backend).
With activation checkpointing, run ``backward()`` inside the ``with`` block: the recomputed
forward must see the same routing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from fastlora import backend as _backend
from fastlora import bases, functional, multi_torch
from fastlora.dropout import _LEVELS, _threshold, keep_scale
from fastlora.layer import FastLoRALinear
from fastlora.model import active_adapter, adapter_configs, lora_layers, set_active

BASE = "__base__"


def _check_names(model: nn.Module, names: object) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(
        isinstance(n, str) for n in names
    ):
        raise TypeError(
            f"names: expected a list with one adapter name (or {BASE!r}) per sample, got {names!r}"
        )
    known = set(adapter_configs(model)) | {n for layer in lora_layers(model).values()
                                           for n in layer.adapter_names()}
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"names: unknown adapter(s) {unknown}; the model has {sorted(known)} (and {BASE!r} "
            "for the base alone)"
        )
    return list(names)


class _AdapterRoute:
    """Ordinary calls with an adapter other than the layer's first (None: the base)."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter

    def __call__(self, layer: FastLoRALinear, x: Tensor) -> Tensor:
        if layer.merged:  # the weight holds the first adapter's update
            raise RuntimeError(
                "a merged layer can only run its first adapter; unmerge() it or set_adapter back"
            )
        return layer._forward_adapter(x, self.adapter)


class _Plan:
    """The tensors of one routing: each sample's adapter as a one-hot row (zeros: base), its
    scale per rank slot (0 on padded slots and base samples) and its dropout threshold.
    Shared by every layer whose adapters in the batch have the same ranks, scales and rates."""

    def __init__(self, index: list[int], hparams: tuple, device: torch.device) -> None:
        ranks = [r for r, _, _ in hparams]
        R = max(ranks)
        S = len(index)
        onehot = torch.zeros(S, len(hparams), dtype=torch.float64)
        scale = torch.zeros(S, R, dtype=torch.float64)
        scale_train = torch.zeros(S, R, dtype=torch.float64)
        low = torch.full((S,), -(_LEVELS // 2), dtype=torch.int32)
        for s, i in enumerate(index):  # once per routing, not per call
            if i < 0:
                continue
            r, scaling, p = hparams[i]
            onehot[s, i] = 1.0
            scale[s, :r] = scaling
            scale_train[s, :r] = scaling * (keep_scale(p) if p > 0 else 1.0)
            low[s] = _threshold(p) - _LEVELS // 2
        self.sample_index = torch.tensor(index, dtype=torch.int64, device=device)
        self.scale = {False: scale.to(device), True: scale_train.to(device)}
        self.onehot = onehot.to(device)
        self.ranks = tuple(ranks)
        self.valid = None if min(ranks) == R else (
            torch.arange(R) < torch.tensor(ranks).unsqueeze(1)).reshape(-1).to(device)
        self.low = low.to(device)
        self.factors: dict = {}

    def factor(self, dtype: torch.dtype, training: bool) -> Tensor:
        key = (dtype, training)
        f = self.factors.get(key)
        if f is None:
            f = self.factors[key] = self.scale[training].to(dtype)
        return f

    def onehot_as(self, dtype: torch.dtype) -> Tensor:
        f = self.factors.get(dtype)
        if f is None:
            f = self.factors[dtype] = self.onehot.to(dtype)
        return f


# plans by (sample indices, adapter hyperparameters, device); bounded like a cache
_plans: dict = {}
_PLAN_LIMIT = 256


def _plan(index: list[int], hparams: tuple, device: torch.device) -> _Plan:
    key = (tuple(index), hparams, device)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLAN_LIMIT:
            _plans.clear()
        plan = _plans[key] = _Plan(index, hparams, device)
    return plan


class _BatchRoute:
    """One layer's routing for one mixed batch of S samples."""

    def __init__(self, layer: FastLoRALinear, names: list[str]) -> None:
        self.samples = len(names)
        present = [n for n in dict.fromkeys(names) if n != BASE and layer.adapter(n) is not None]
        ads = [layer.adapter(n) for n in present]
        has_base = any(n == BASE or layer.adapter(n) is None for n in names)
        self.single = None
        self.uniform = not has_base and len(ads) == 1 or not ads
        if self.uniform:
            self.single = ads[0] if ads else None
            return
        for n, ad in zip(present, ads):
            if ad.use_dora:
                raise ValueError(
                    f"adapter_batch: adapter {n!r} is a DoRA adapter; DoRA adapters cannot share "
                    "a mixed batch (run its samples in a batch of their own)"
                )
        local = {n: i for i, n in enumerate(present)}
        hparams = tuple((ad.r, float(ad.scaling), float(ad.lora_dropout)) for ad in ads)
        self.plan = _plan([local.get(n, -1) for n in names], hparams, layer.weight.device)
        self.names = present
        self.As = tuple(ad.lora_A for ad in ads)
        self.Bs = tuple(ad.lora_B for ad in ads)
        self.scalings = tuple(s for _, s, _ in hparams)
        self.dropouts = tuple(p for _, _, p in hparams)
        self.has_dropout = any(p > 0 for p in self.dropouts)
        self.sample_index = self.plan.sample_index
        self._low = self.plan.low

    def factor(self, dtype: torch.dtype, training: bool) -> Tensor:
        return self.plan.factor(dtype, training)

    def __call__(self, layer: FastLoRALinear, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] != self.samples:
            raise ValueError(
                f"adapter_batch: names has {self.samples} entries, one per sample, but a layer's "
                f"input x has shape {tuple(x.shape)} (dim 0 is the batch)"
            )
        if layer.merged:
            raise RuntimeError("adapter_batch: a layer is merged; unmerge() it first")
        if self.uniform:
            return layer._forward_adapter(x, self.single)
        weight, bias = layer.weight, layer.bias
        out_dtype = x.dtype
        four_bit = bases.is_4bit(weight)
        if four_bit:
            compute = getattr(layer, "compute_dtype", None) or x.dtype
            x = x.to(compute)
            bias = None if bias is None else bias.to(compute)
        functional._check_tensor("x", x)
        if functional._autocast_on(x):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = (functional._autocast_cast(t, dtype) for t in (x, weight, bias))
        functional._check_once(x, weight, bias, self.As[0], self.Bs[0], self.scalings[0],
                               self.dropouts[0])
        training = layer.training and self.has_dropout
        S, K = x.shape[0], x.shape[-1]
        lead = x.shape[:-1]
        if _backend.resolve(x) == "triton" and bases.base_of(weight).kind == "dense":
            y2d = _triton_apply(x.reshape(-1, K), weight, bias, self, training)
        else:
            y2d = _torch_apply(x.reshape(S, -1, K), weight, bias, self, training)
        y = y2d.reshape(*lead, -1)
        return y.to(out_dtype) if four_bit else y


def _torch_apply(x3: Tensor, weight, bias, route: "_BatchRoute", training: bool) -> Tensor:
    plan = route.plan
    row_low = plan.low.repeat_interleave(x3.shape[1]) if training else None
    return multi_torch.apply(x3, weight, bias, route.As, route.Bs, plan.ranks,
                             plan.onehot_as(x3.dtype), plan.factor(x3.dtype, training),
                             plan.valid, row_low)


def _triton_apply(x2d: Tensor, weight, bias, route: _BatchRoute, training: bool) -> Tensor:
    from fastlora import multi_triton  # imported on first use, as the single-adapter backend

    row_index = route.sample_index.repeat_interleave(x2d.shape[0] // route.samples)
    ps = route.dropouts if training else (0.0,) * len(route.dropouts)
    return multi_triton.apply(x2d, weight, bias, route.As, route.Bs, route.scalings, ps, row_index)


def _layers_with_routes(model: nn.Module) -> dict[str, FastLoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no FastLoRALinear layers (call fastlora.apply_lora first)")
    return layers


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, sample ``s`` of every call uses adapter ``names[s]`` (``"__base__"``:
    the base alone). ``names`` has one entry per sample (dim 0 of the inputs)."""
    layers = _layers_with_routes(model)
    names = _check_names(model, names)
    if not names:
        raise ValueError("names: expected one entry per sample, got an empty list")
    routes = {name: _BatchRoute(layer, names) for name, layer in layers.items()}
    previous = {name: layer.__dict__.get("_route") for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer._route = routes[name]
        yield model
    finally:
        for name, layer in layers.items():
            if previous[name] is None:
                layer.__dict__.pop("_route", None)
            else:
                layer._route = previous[name]


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter of ordinary calls (``model.fastlora_config`` becomes its
    config). Layers that lack it compute the base alone. Every adapter stays trainable."""
    layers = _layers_with_routes(model)
    configs = adapter_configs(model)
    known = set(configs) | {n for layer in layers.values() for n in layer.adapter_names()}
    if name not in known:
        raise ValueError(f"set_adapter: unknown adapter {name!r}; the model has {sorted(known)}")
    merged = sorted(n for n, layer in layers.items() if layer.merged)
    if merged:
        raise RuntimeError(f"set_adapter: layers {merged[:5]} are merged; unmerge() them first")
    for layer in layers.values():
        if layer.adapter_name == name:
            layer.__dict__.pop("_route", None)
        else:
            layer._route = _AdapterRoute(layer.adapter(name))
    if name in configs:
        set_active(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer and from the model's configs; a layer left
    with no adapter becomes a plain ``nn.Linear`` again. Deleting the active adapter makes the
    first remaining one active."""
    from fastlora.model import _set_submodule, forget_adapter

    layers = _layers_with_routes(model)
    configs = adapter_configs(model)
    known = set(configs) | {n for layer in layers.values() for n in layer.adapter_names()}
    if name not in known:
        raise ValueError(f"delete_adapter: unknown adapter {name!r}; the model has {sorted(known)}")
    if known == {name}:
        raise ValueError(
            f"delete_adapter: {name!r} is the model's only adapter; fastlora.merge_lora(model) "
            "or the base model itself gives the model without it"
        )
    for lname, layer in layers.items():
        if layer.adapter(name) is None:
            continue
        if layer.adapter_names() == [name]:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            linear.train(layer.training)
            _set_submodule(model, lname, linear)
        else:
            layer.delete_adapter(name)
    forget_adapter(model, name)
    set_adapter(model, active_adapter(model))
