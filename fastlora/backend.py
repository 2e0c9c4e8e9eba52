"""Backend selection: the one place that decides which implementation runs a call.

Names: ``"auto"`` (Triton for CUDA tensors when it can run, torch otherwise), ``"torch"``
(the lean PyTorch path, any device) and ``"triton"`` (the fused kernels; CUDA, or CPU tensors
under ``TRITON_INTERPRET=1``). The environment variable ``FASTLORA_BACKEND`` sets the default.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
# dtypes the Triton kernels are written for; float64 always runs on the torch path
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name.lower()


_lock = threading.Lock()
# read once at import: get_backend() runs inside torch.compile traces, where a lock or an
# environment lookup would break the graph
_current: str = _check_name(os.environ.get("FASTLORA_BACKEND", "auto"), "FASTLORA_BACKEND")


def get_backend() -> str:
    """The backend name in force (``FASTLORA_BACKEND`` until ``set_backend`` is called)."""
    return _current


def set_backend(name: str) -> str:
    """Select the backend for every later call; returns the previous name. ``"triton"`` on a
    machine where Triton cannot run (no usable GPU, and no ``TRITON_INTERPRET=1`` for CPU
    tensors) raises ``RuntimeError`` here, naming the reason."""
    global _current
    name = _check_name(name, "set_backend(name)")
    if name == "triton":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ok, reason = _triton_status(device)
        if not ok:
            raise RuntimeError(
                f"set_backend('triton'): the Triton kernels cannot run here ({device.type}): "
                f"{reason}; use 'auto' or 'torch'"
            )
    with _lock:
        previous, _current = _current, name
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of ``set_backend``."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.lru_cache(maxsize=None)
def _triton_status_of(device_type: str, index: int) -> tuple[bool, str]:
    try:
        from fastlora import triton_backend
    except ImportError as exc:  # triton missing or broken
        return False, f"triton cannot be imported ({exc})"
    device = torch.device(device_type) if index < 0 else torch.device(device_type, index)
    return triton_backend.available(device)


def _triton_status_value(device_type: str, index: int) -> tuple[bool, str]:
    return _triton_status_of(device_type, index)


# Asked once per device and, while torch.compile traces, taken as a constant: the probe
# (an import, a driver query in try/except) would otherwise break the graph. The constant is
# a plain function around the cached one: handed the lru_cache wrapper itself, Dynamo warns
# that it ignores the cache ("silent incorrectness is a potential risk").
_triton_status_constant = torch.compiler.assume_constant_result(_triton_status_value)


def _triton_status(device: torch.device) -> tuple[bool, str]:
    return _triton_status_constant(device.type, -1 if device.index is None else device.index)


def resolve(x: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call on ``x``; an explicit ``"triton"`` that
    cannot run raises instead of falling back silently."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        if x.device.type != "cuda" or x.dtype not in TRITON_DTYPES:
            return "torch"
        return "triton" if _triton_status(x.device)[0] else "torch"
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend 'triton': x.dtype must be one of float16, bfloat16, float32, got {x.dtype} "
            "(use set_backend('torch') or 'auto' for float64)"
        )
    ok, reason = _triton_status(x.device)
    if not ok:
        raise RuntimeError(f"backend 'triton' cannot run on device {x.device}: {reason}")
    return "triton"
