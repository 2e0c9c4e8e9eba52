"""How kernels are launched: the lean eager path, the traceable path and the interpreter.

    eager        the first call for a specialisation compiles through ``JITFunction.run``
                 (Triton's own binder, cache and launcher); later calls look the
                 ``CompiledKernel`` up in the ``LaunchSpec``'s dict, keyed by a superset
                 of what Triton specialises on (device, pointer dtypes and 16-byte
                 alignment, scalar values; the spec fixes the constexprs), and call its
                 launcher directly: no Autotuner, no binder, no ``wrap_triton``, no op
                 dispatch.
    traceable    under torch.compile (``triton_op`` bodies) through ``wrap_triton``, so the
                 graph holds each launch.
    interpreter  ``TRITON_INTERPRET=1``: the raw kernel (wrap_triton raises there, pytorch
                 issue 152868).

Kernels that build tensor descriptors in the kernel (TMA) need a scratch buffer per
launch; ``ensure_allocator`` gives Triton a torch-backed allocator when none is set.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import triton
from triton.runtime import driver
from triton.runtime import _allocation

from . import _configs


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch would (``allow_tf32``), as cuBLAS does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _scratch(size: int, alignment: int, stream: Any) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=_scratch_device())


@functools.cache
def _scratch_device() -> torch.device:
    if _configs.interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")  # the current device at allocation time


def ensure_allocator() -> None:
    """Install a torch allocator for Triton's per-launch scratch (TMA descriptors built in
    the kernel) unless the caller set one; ``set_allocator`` is per thread (a ContextVar)."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


@functools.cache
def device_info(device_index: int) -> tuple[int, int]:
    """(compute capability as 80/90/..., SM count) of a device, through Triton's driver."""
    target = driver.active.get_current_target()
    props = driver.active.utils.get_device_properties(device_index)
    return int(target.arch), int(props["multiprocessor_count"])


# Stand-in (arch, SMs) where there is no device: the interpreter (4 SMs, so persistent grids
# still walk several tiles per program) and torch.compile tracing on a machine without a GPU.
NO_DEVICE_INFO = (80, 4)


def current_device_info() -> tuple[int, int]:
    """``device_info`` of the current device, or ``NO_DEVICE_INFO`` without one."""
    if _configs.interpreting():
        return NO_DEVICE_INFO
    try:
        index = driver.active.get_current_device()
    except RuntimeError:  # no GPU driver: only a trace without a GPU gets here
        return NO_DEVICE_INFO
    return device_info(index)


@functools.cache
def _wrapped(fn: Any) -> Any:
    return torch.library.wrap_triton(fn)


class LaunchSpec:
    """One kernel launch of a call plan: the kernel, its grid and compile-time choices.
    Plans are cached per shape (``functools.lru_cache`` in the launchers), and each spec
    keeps the compiled kernels it has launched, so a repeated call does one dict lookup."""

    __slots__ = ("fn", "grid", "constexprs", "cvals", "num_warps", "num_stages", "kernels")

    def __init__(self, fn: Any, grid: tuple[int, ...], constexprs: dict[str, Any],
                 num_warps: int, num_stages: int) -> None:  # fmt: skip
        self.fn, self.grid, self.constexprs = fn, (*grid, 1, 1)[:3], constexprs
        self.cvals = tuple(constexprs.values())
        self.num_warps, self.num_stages = num_warps, num_stages
        self.kernels: dict[tuple, Any] = {}


def launch(
    spec: LaunchSpec, tensors: Sequence[torch.Tensor], scalars: tuple, *, traceable: bool = False
) -> None:
    """Launch ``spec.fn[spec.grid](*tensors, *scalars, **spec.constexprs)``: the kernel's
    parameters are its pointers, then its runtime scalars, then its constexprs.  A None
    pointer (an argument a variant does not read) is a constexpr to Triton."""
    args = (*tensors, *scalars)
    grid = spec.grid
    if _configs.interpreting():
        ensure_allocator()
        spec.fn[grid](*args, **spec.constexprs, num_warps=spec.num_warps,
                      num_stages=spec.num_stages)  # fmt: skip
        return
    if traceable:
        _wrapped(spec.fn)[grid](*args, **spec.constexprs, num_warps=spec.num_warps,
                                num_stages=spec.num_stages)  # fmt: skip
        return
    device = driver.active.get_current_device()
    # what Triton specialises on is a function of this key (with the spec's constexprs):
    # pointer dtypes and 16-byte alignment, scalar values (a superset of "== 1" and
    # "% 16 == 0")
    key = (device, scalars,
           *[None if t is None else (t.dtype, not t.data_ptr() & 15) for t in tensors])
    kernel = spec.kernels.get(key)
    if kernel is None:  # first call: Triton's own path compiles, caches and launches
        ensure_allocator()
        spec.kernels[key] = spec.fn.run(
            *args, grid=grid, warmup=False, num_warps=spec.num_warps,
            num_stages=spec.num_stages, **spec.constexprs,
        )  # fmt: skip
        return
    if kernel.metadata.global_scratch_size:
        ensure_allocator()
    stream = driver.active.get_current_stream(device)
    hooks = triton.knobs.runtime
    enter = hooks.launch_enter_hook
    bound = (*args, *spec.cvals)
    meta = kernel.launch_metadata(grid, stream, *bound) if enter.calls else None
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
               meta, enter, hooks.launch_exit_hook, *bound)  # fmt: skip
