"""How kernels are launched: the lean eager path, the traceable path and the interpreter.

    eager        the first call for a specialisation compiles through ``JITFunction.run``
                 (Triton's own binder, cache and launcher); later calls look the
                 ``CompiledKernel`` up in a dict keyed by what Triton specialises on
                 (argument dtypes, 16-byte alignment, ints equal to 1 or divisible by 16,
                 the constexprs) and call its launcher directly: no Autotuner, no binder,
                 no ``wrap_triton``, no op dispatch.
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

_INT32_MAX = 2**31 - 1
_cache: dict[tuple, Any] = {}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch would (``allow_tf32``), as cuBLAS does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _scratch(size: int, alignment: int, stream: Any) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=_scratch_device())


def _scratch_device() -> torch.device:
    if _configs.interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def ensure_allocator() -> None:
    """Install a torch allocator for Triton's per-launch scratch (TMA descriptors built in
    the kernel) unless the caller set one; ``set_allocator`` is per thread (a ContextVar)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
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


def _spec(a: Any) -> Any:
    """What Triton's binder specialises an argument on."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return a == 1, a % 16 == 0, a > _INT32_MAX or a < -_INT32_MAX
    return type(a)


def launch(
    fn: Any,
    grid: tuple[int, ...],
    args: Sequence[Any],
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int,
    *,
    traceable: bool = False,
) -> None:
    """Launch ``fn[grid](*args, **constexprs)``.  ``args`` are the runtime arguments in
    signature order; the constexprs must be the kernel's trailing parameters."""
    if _configs.interpreting():
        ensure_allocator()
        fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    if traceable:
        _wrapped(fn)[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    device = driver.active.get_current_device()
    key = (fn, device, num_warps, num_stages, *constexprs.values(), *map(_spec, args))
    kernel = _cache.get(key)
    if kernel is None:  # first call: Triton's own path compiles, caches and launches
        ensure_allocator()
        _cache[key] = fn.run(
            *args, grid=grid, warmup=False, num_warps=num_warps, num_stages=num_stages,
            **constexprs,
        )  # fmt: skip
        return
    if kernel.metadata.global_scratch_size:
        ensure_allocator()
    stream = driver.active.get_current_stream(device)
    enter = triton.knobs.runtime.launch_enter_hook
    bound = (*args, *constexprs.values())
    meta = kernel.launch_metadata(grid, stream, *bound) if enter is not None else None
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter,
               triton.knobs.runtime.launch_exit_hook, *bound)  # fmt: skip
