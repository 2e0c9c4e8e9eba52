"""Reusable device buffers for what a launch sequence needs only while it runs: Triton's
per-launch scratch (tensor descriptors built in the kernel) and the backward's g and
dA/dB partial sums.

Kernels launched on one stream run in launch order, so a buffer handed to one call's
launches may be handed to the next call on the same stream: the next call's kernels
start after the previous ones finished with it.  Buffers are kept per thread (two
threads interleaving launches on one stream must not share one) and per (device,
stream, dtype); a request larger than the kept buffer replaces it (the old one is freed
through torch's allocator, which orders its reuse on that stream).  Not for CUDA graph
capture: a graph replays the addresses it captured, so callers allocate privately there.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_local = threading.local()


def buffer(name: str, device: torch.device, stream: Any, dtype: torch.dtype,
           numel: int) -> torch.Tensor:  # fmt: skip
    """A 1-D ``dtype`` tensor of at least ``numel`` elements on ``device``, reused by later
    calls with the same (``name``, device, stream, dtype) on this thread.  Its contents
    are undefined; only kernels on ``stream`` may use it."""
    cache = _local.__dict__
    key = (name, device, stream, dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        cache[key] = buf
    return buf


def clear() -> None:
    """Release this thread's kept buffers (to torch's allocator)."""
    _local.__dict__.clear()


def kept_bytes() -> int:
    """Bytes this thread keeps in reusable buffers."""
    return sum(b.numel() * b.element_size() for b in _local.__dict__.values())
