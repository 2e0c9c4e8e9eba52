"""Per-thread CPU buffers for the big temporaries that die inside one call: the unpacked
dropout mask (times x), a transiently decoded base, DoRA's column-scaled weight.

On the CPU a fresh tensor of a few MB costs its page faults on top of the write (~2.7 ms
for 8 MB on a 2-core VM, as much as ~15% of a layer's GEMM, and more inside a model whose
other temporaries churn the heap); a reused buffer costs only the write. One flat buffer per
role and dtype, grown to the largest size asked for and kept; a buffer is never handed out
as (part of) an output or a saved tensor. On a GPU the caching allocator already reuses
memory: a new tensor each call. (The launchers' ``kernels/_workspace.py`` does the same per
stream, but ``fastlora.kernels`` imports Triton, which these paths must not need.)"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_WORKSPACE = _Workspace()


def scratch(role: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat tensor of ``numel`` elements with garbage contents, valid until the next call
    for the same ``role`` and ``dtype`` on this thread."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buf = _WORKSPACE.buffers.get((role, dtype))
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE.buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def release() -> None:
    """Drop this thread's buffers (they are rebuilt on the next call that needs one)."""
    _WORKSPACE.buffers.clear()
