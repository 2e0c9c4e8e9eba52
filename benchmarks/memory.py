"""Memory measurements.

- ``saved_bytes(module, x)``: what autograd keeps for backward after one forward, found with
  ``torch.autograd.graph.saved_tensors_hooks`` and counted by distinct storage, split into
  the storages of ``x`` and the module's parameters/buffers (alive anyway in a model) and
  everything else ("extra": the activations the layer adds). Deterministic, any device;
  importable from the test suite.
- ``cuda_peak_bytes(run)``: ``torch.cuda.max_memory_allocated`` above the memory allocated
  before ``run()`` (a fwd+bwd), i.e. the transient peak a layer adds, outputs and gradients
  included.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_bytes(
    module: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    exclude: Iterable[Tensor] = (),
) -> dict[str, int]:
    """Run ``module(x)`` once (grad enabled, the module's own train/eval mode) and count the
    storages autograd saves for backward.

    Returns ``{"x_params": bytes, "extra": bytes, "total": bytes, "extra_storages": count,
    "saved_tensors": count}``: ``x_params`` are storages shared with ``x``, with the
    parameters and buffers of ``module`` (when it is an ``nn.Module``) or with ``exclude``;
    ``extra`` is everything else. A storage saved several times (views, ``W`` and ``W^T``)
    counts once, at its full size. The output is discarded.
    """
    known = {_storage_key(t) for t in (x, *exclude) if t.numel() > 0}
    if isinstance(module, nn.Module):
        owned = (*module.parameters(), *module.buffers())
        known |= {_storage_key(t) for t in owned if t.numel() > 0}
    storages: dict[tuple[str, int], int] = {}
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        if t.numel() > 0:
            storages[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    x_params = sum(n for key, n in storages.items() if key in known)
    extra = sum(n for key, n in storages.items() if key not in known)
    return {
        "x_params": x_params,
        "extra": extra,
        "total": x_params + extra,
        "extra_storages": sum(1 for key in storages if key not in known),
        "saved_tensors": count,
    }


def cuda_peak_bytes(run: Callable[[], None], device: torch.device | str = "cuda") -> int:
    """Peak bytes allocated above the starting point while ``run()`` executes."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
