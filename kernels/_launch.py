"""How kernels are launched: the lean eager path, the traceable path and the interpreter.

    eager        the first call for a specialisation compiles through ``JITFunction.run``
                 (Triton's own binder, cache and launcher); later calls look the
                 ``CompiledKernel`` up in the ``LaunchSpec``'s dict, keyed by a superset
                 of what Triton specialises on (device, pointer dtypes and 16-byte
                 alignment, scalar values; the spec fixes the constexprs), and call its
                 launcher directly: no Autotuner, no binder, no ``wrap_triton``, no op
                 dispatch.  The launchers cache a per-call plan (``CallCache``: specs,
                 scalars, TMA decision) under one key of the operands' shapes, dtypes,
                 strides and alignment, and hand ``launch`` that plan's serial as the
                 specialisation key and one ``Context`` (device, stream) for all launches.
    traceable    under torch.compile (``triton_op`` bodies) through ``wrap_triton``, so the
                 graph holds each launch.
    interpreter  ``TRITON_INTERPRET=1``: the raw kernel (wrap_triton raises there, pytorch
                 issue 152868).

Kernels that build tensor descriptors in the kernel (TMA) need a scratch buffer per
launch; ``ensure_allocator`` gives Triton a torch-backed allocator when none is set, which
reuses one buffer per stream (``_workspace``) outside CUDA graph capture.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Hashable, NamedTuple, Sequence

import torch
import triton
from triton.runtime import driver
from triton.runtime import _allocation

from . import _configs, _workspace


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch would (``allow_tf32``), as cuBLAS does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _scratch(size: int, alignment: int, stream: Any) -> torch.Tensor:
    # Triton asks for this right before each launch of a kernel that builds tensor
    # descriptors in the kernel: one buffer per (thread, device, stream) is reused
    # (``_workspace``), except while a CUDA graph is captured
    if _configs._INTERPRETING:
        return _workspace.buffer("tma-scratch", _CPU, stream, torch.int8, size)
    active = driver.active
    device = _torch_device(active.get_current_device())
    if active.utils.is_stream_capturing(stream):
        return torch.empty(size, dtype=torch.int8, device=device)
    return _workspace.buffer("tma-scratch", device, stream, torch.int8, size)


_CPU = torch.device("cpu")


@functools.cache
def _torch_device(index: int) -> torch.device:
    """The torch device of the driver's device ``index`` (CPU where torch has no CUDA: the
    host-overhead benchmark's stub driver)."""
    return torch.device("cuda", index) if torch.cuda.is_available() else _CPU


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


def operand_key(t: torch.Tensor | None) -> tuple | None:
    """What a launch depends on of a tensor operand besides its shape: dtype, strides and
    16-byte alignment (Triton specialises on it; TMA needs it)."""
    if t is None:
        return None
    return t.dtype, t.stride(), t.data_ptr() & 15


def base4_key(base4: dict | None) -> tuple | None:
    """``operand_key`` for a 4-bit base's loader arguments (``bases.Packed4bit.kernel_args``)."""
    if base4 is None:
        return None
    return tuple(operand_key(v) if isinstance(v, torch.Tensor) else v
                 for v in base4.values())


_serials = itertools.count()


def next_serial() -> int:
    """A number no other call plan gets: the ``key`` a launcher passes to ``launch`` for
    the plan's launches (cheaper to hash than the plan's own key)."""
    return next(_serials)


class CallCache(dict):
    """Per-call plans of a launcher by key (shapes, dtypes, strides, alignment, flags). A
    model has few distinct keys; a stream of new ones clears it past ``limit`` entries."""

    def __init__(self, limit: int = 4096) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Hashable, value: Any) -> Any:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


class Context(NamedTuple):
    """What every launch of one call shares: the driver's current device and stream, and
    whether transient buffers may be reused (``_workspace``: eager launches outside CUDA
    graph capture; the interpreter too, so the tests exercise reuse)."""

    device: Any
    stream: Any
    reuse: bool


_INTERPRETER_CONTEXT = Context(None, None, True)
_TRACING_CONTEXT = Context(None, None, False)


def context(traceable: bool = False) -> Context:
    """The ``Context`` of a call's launches (asked once per call, not per launch)."""
    if traceable:
        return _TRACING_CONTEXT
    if _configs._INTERPRETING:  # (interpreting(), without a call)
        return _INTERPRETER_CONTEXT
    active = driver.active
    device = active.get_current_device()
    stream = active.get_current_stream(device)
    return Context(device, stream, not active.utils.is_stream_capturing(stream))


def transient(ctx: Context, name: str, device: torch.device, dtype: torch.dtype,
              numel: int) -> torch.Tensor:  # fmt: skip
    """A 1-D buffer of >= ``numel`` elements used only by this call's launches."""
    if ctx.reuse:
        return _workspace.buffer(name, device, ctx.stream, dtype, numel)
    return torch.empty(numel, dtype=dtype, device=device)


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
        # (device, specialization key) -> (run, function, packed metadata, CompiledKernel)
        self.kernels: dict[tuple, tuple] = {}


def launch(
    spec: LaunchSpec, tensors: Sequence[torch.Tensor | None], scalars: tuple, *,
    traceable: bool = False, ctx: Context | None = None, key: Hashable | None = None,
) -> None:
    """Launch ``spec.fn[spec.grid](*tensors, *scalars, **spec.constexprs)``: the kernel's
    parameters are its pointers, then its runtime scalars, then its constexprs.  A None
    pointer (an argument a variant does not read) is a constexpr to Triton.

    ``ctx``: the call's ``context()`` (asked here when None).  ``key``: a hashable that
    determines everything Triton specialises on besides the spec (pointer dtypes and
    16-byte alignment, scalar values); by default one is built from ``tensors`` and
    ``scalars``.  A launcher that passes its own vouches that the tensors it does not
    describe are fresh allocations (always aligned) whose dtypes follow from the key."""
    if key is not None and ctx is not None and ctx.device is not None:
        # a launcher's eager call (only those have a driver device): the cached kernel
        entry = spec.kernels.get((ctx.device, key))
        if entry is not None:
            _run(spec, entry, tensors, ctx.stream)
            return
    if _configs._INTERPRETING:  # (interpreting(), without a call)
        ensure_allocator()
        spec.fn[spec.grid](*tensors, *scalars, **spec.constexprs, num_warps=spec.num_warps,
                           num_stages=spec.num_stages)  # fmt: skip
        return
    if traceable:
        _wrapped(spec.fn)[spec.grid](*tensors, *scalars, **spec.constexprs,
                                     num_warps=spec.num_warps, num_stages=spec.num_stages)
        return
    if ctx is None:
        ctx = context()
    if key is None:
        # what Triton specialises on is a function of this (with the spec's constexprs):
        # pointer dtypes and 16-byte alignment, scalar values (a superset of "== 1" and
        # "% 16 == 0")
        key = (scalars, *[None if t is None else (t.dtype, not t.data_ptr() & 15)
                          for t in tensors])
    entry = spec.kernels.get((ctx.device, key))
    if entry is None:  # first call: Triton's own path compiles, caches and launches
        ensure_allocator()
        kernel = spec.fn.run(
            *tensors, *scalars, grid=spec.grid, warmup=False, num_warps=spec.num_warps,
            num_stages=spec.num_stages, **spec.constexprs,
        )  # fmt: skip
        # the key fixes the scalars: they are bound with the constexprs once
        spec.kernels[(ctx.device, key)] = (
            kernel.run, kernel.function, kernel.packed_metadata, kernel,
            (*scalars, *spec.cvals), bool(kernel.metadata.global_scratch_size),
        )  # fmt: skip
        return
    _run(spec, entry, tensors, ctx.stream)


def _run(spec: LaunchSpec, entry: tuple, tensors: Sequence, stream: Any) -> None:
    """Launch a cached compiled kernel (``LaunchSpec.kernels`` entry) on ``stream``."""
    run, function, packed, kernel, tail, scratch = entry
    if scratch and _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)  # (ensure_allocator, inlined)
    hooks = triton.knobs.runtime
    enter = hooks.launch_enter_hook
    grid = spec.grid
    bound = (*tensors, *tail)
    meta = kernel.launch_metadata(grid, stream, *bound) if enter.calls else None
    run(grid[0], grid[1], grid[2], stream, function, packed, meta, enter,
        hooks.launch_exit_hook, *bound)
