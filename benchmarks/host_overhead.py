"""Host overhead of the Triton path, measured without a GPU: ``python -m benchmarks.host_overhead``.

Triton's driver is replaced by a stub (``stub_driver``) whose target is sm_90, so the
whole Python side of a call runs for real: fastlora's checks and dispatch, the op and
autograd machinery, and whatever launch path fastlora takes into Triton (``JITFunction.run``
or ``Autotuner.run``: binding, specialization, cache lookup, compilation to a real sm_90
cubin on first use; or a cached ``CompiledKernel``'s launcher, with the scratch allocation
tensor descriptors need).  Only the final launch is skipped: the stub's launcher records
the kernel and returns.
The torch ops in between run on tiny CPU tensors, where their cost is host cost too.

It times one fwd+bwd (``torch.autograd.grad``) of ``FastLoRALinear`` on the Triton
backend and one of a frozen float32 ``nn.Linear`` on the same tiny shape, interleaved,
and counts the GPU launches per forward and per backward: every Triton launch the stub
receives plus every torch op that would launch a kernel on a GPU (``LaunchCounter``).
The case is the worst common one: dropout 0.1, float32 adapters on a bf16 base (PEFT's
default with a bf16 model).

Not included: the driver's own ``cuLaunchKernel`` (a few microseconds per launch on a
real GPU), which this machine cannot run.  The last line printed is

    host fwd+bwd: fastlora <us> us, nn.Linear <us> us, ratio <x>; launches fwd <n> bwd <n>
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Hopper (H100/H200) as the stub presents it: the target the kernels compile for, and the
# device properties Triton and a persistent grid read (132 SMs, 227 KiB opt-in shared memory)
STUB_TARGET = ("cuda", 90, 32)
STUB_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                   "mem_bus_width": 5120}

# the goals (issue 11): launches per forward (+1 RNG draw with dropout), per backward
GOAL_FWD_LAUNCHES = 2
GOAL_BWD_LAUNCHES = 3
GOAL_RATIO = 3.0
# DoRA and a 4-bit base (issue 20): at most 4 launches each way, dropout's draw included
GOAL_VARIANT_LAUNCHES = 4
ADAPTERS = ("lora", "dora")
BASES = ("dense", "nf4")


# --------------------------------------------------------------------------- Triton stub


@dataclass
class Launch:
    """One kernel launch the stub received (or one torch op counted as a launch)."""

    name: str
    grid: tuple[int, int, int] = (1, 1, 1)


@dataclass
class LaunchLog:
    launches: list[Launch] = field(default_factory=list)

    def clear(self) -> None:
        self.launches.clear()


class _StubUtils:
    """``driver.active.utils``: module loading is faked, nothing reaches a GPU."""

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block)
        return 1, 1, 0, 0, 1024

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return dict(STUB_PROPERTIES)

    def get_current_device(self) -> int:
        return 0

    def is_stream_capturing(self, stream) -> bool:
        return False


def _make_launcher_cls(log: LaunchLog) -> type:
    class StubLauncher:
        """Stands where ``CudaLauncher`` stands: does the same host-side scratch allocation
        (device-side tensor descriptors need it), records the launch, launches nothing."""

        def __init__(self, src, metadata) -> None:
            fn = getattr(src, "fn", None)
            self.name = getattr(fn, "__name__", None) or getattr(metadata, "name", "kernel")
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.scratch = (getattr(metadata, "global_scratch_size", 0) or 0,
                            getattr(metadata, "global_scratch_align", 1) or 1)

        def __call__(self, grid_x, grid_y, grid_z, stream, function, *rest) -> None:
            size, align = self.scratch
            if size > 0:
                from triton.runtime import _allocation

                _allocation._allocator.get()(grid_x * grid_y * grid_z * self.num_ctas * size,
                                             align, stream)
            log.launches.append(Launch(self.name, (grid_x, grid_y, grid_z)))

    return StubLauncher


def _stub_benchmarker(kernel_call: Callable, quantiles=None, **kwargs) -> list[float]:
    # Autotuner benchmarking on first use of a shape: every config "takes" the same time,
    # so the first config is kept and only it is compiled (steady-state dispatch is what
    # is measured, not tuning)
    return [1.0, 1.0, 1.0]


class StubDriver:
    """A Triton driver for a machine without a GPU: target sm_90, faked module loading,
    a launcher that records instead of launching (see the module docstring)."""

    def __init__(self, log: LaunchLog) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(*STUB_TARGET)
        self.utils = _StubUtils()
        self.launcher_cls = _make_launcher_cls(log)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cpu

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        return _stub_benchmarker

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache) -> None:
        pass

    def assemble_tensormap_to_arg(self, tensormaps_info, args):
        return args


@contextlib.contextmanager
def stub_driver(log: LaunchLog) -> Iterator[StubDriver]:
    """``triton.runtime.driver.active`` is a ``StubDriver`` recording into ``log`` inside."""
    from triton.runtime import driver

    previous = driver._active  # None when no driver was created yet (no GPU here)
    stub = StubDriver(log)
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver._active = previous


@contextlib.contextmanager
def triton_backend_on_cpu() -> Iterator[None]:
    """fastlora's ``"triton"`` backend for CPU tensors outside the interpreter (it refuses
    them normally: only the stub makes them launchable)."""
    import fastlora
    from fastlora import backend, triton_backend

    original = triton_backend.available

    def available(device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type == "cpu":
            return True, ""
        return original(device)

    triton_backend.available = available
    backend._triton_status_of.cache_clear()
    previous = fastlora.set_backend("triton")
    try:
        yield
    finally:
        fastlora.set_backend(previous)
        triton_backend.available = original
        backend._triton_status_of.cache_clear()


# --------------------------------------------------------------------------- torch launches

_aten = torch.ops.aten
# ops that allocate or change metadata only: no kernel on a GPU (the caching allocator
# serves empty* from the host; _unsafe_view is a view whose schema does not say so)
NO_KERNEL = {
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
    _aten.new_empty.default, _aten.new_empty_strided.default, _aten._unsafe_view.default,
    _aten.set_.source_Storage_storage_offset, _aten.resize_.default,
    _aten.record_stream.default, _aten.is_same_size.default,
}  # fmt: skip


def is_view(func: torch._ops.OpOverload) -> bool:
    """An op whose outputs alias an input without writing it (view, t, expand, detach...)."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


class LaunchCounter(TorchDispatchMode):
    """Counts the torch ops that would launch a GPU kernel, into a ``LaunchLog``.

    Sees ops below autograd (what actually runs; composite ops are decomposed); views and
    allocations are not counted.
    A custom op (``torch.library.custom_op``/``triton_op``) is not one launch: its body is
    run under the counter, so the torch ops inside count and its Triton launches reach the
    stub driver."""

    def __init__(self, log: LaunchLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_composite(func):
            # called below autograd, a composite op (``to``, ``reshape``) reaches the mode
            # whole; what it runs is what launches (``to`` may be a no-op or a _to_copy)
            with self:
                return func.decompose(*args, **kwargs)
        if func.namespace not in ("aten", "prims"):
            opdef = _custom_op_def(func)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func not in NO_KERNEL and not is_view(func):
            self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        """One launch of ``func``; subclasses record more (benchmarks/roofline.py)."""
        self.log.launches.append(Launch(f"torch:{func.name()}"))


def _is_composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _custom_op_def(func):
    from torch._library.custom_ops import OPDEFS

    return OPDEFS.get(func._schema.name)


@contextlib.contextmanager
def counting(log: LaunchLog) -> Iterator[LaunchLog]:
    """Records torch launches (``LaunchCounter``) into ``log``; the stub driver, if active
    with the same log, adds the Triton ones in call order."""
    with LaunchCounter(log):
        yield log


# --------------------------------------------------------------------------- the measurement


@dataclass
class Case:
    """The timed shape: tiny, so every microsecond is host time."""

    M: int = 8
    K: int = 16
    N: int = 16
    r: int = 8
    dropout: float = 0.1
    base_dtype: torch.dtype = torch.bfloat16
    adapter_dtype: torch.dtype = torch.float32
    adapter: str = "lora"  # or "dora" (PEFT's use_dora)
    base: str = "dense"  # or "nf4": a bitsandbytes Linear4bit (double quantization, 64)

    def goals(self) -> tuple[int, int]:
        """(forward, backward) launch goals of this case."""
        if self.adapter == "lora" and self.base == "dense":
            return GOAL_FWD_LAUNCHES + (1 if self.dropout > 0 else 0), GOAL_BWD_LAUNCHES
        return GOAL_VARIANT_LAUNCHES, GOAL_VARIANT_LAUNCHES

    def describe(self) -> str:
        base = f"{str(self.base_dtype)[6:]} base" if self.base == "dense" else (
            f"nf4 base ({str(self.base_dtype)[6:]} compute)")
        return (f"x [{self.M}, {self.K}] {base}, {self.adapter} r={self.r} "
                f"{str(self.adapter_dtype)[6:]} adapters, dropout {self.dropout:g}")


@dataclass
class Result:
    fastlora_us: float
    linear_us: float
    fwd: list[Launch]
    bwd: list[Launch]
    linear_fwd: list[Launch]
    linear_bwd: list[Launch]
    reps: int
    profile: str = ""

    @property
    def ratio(self) -> float:
        return self.fastlora_us / self.linear_us

    def line(self) -> str:
        return format_line(self.fastlora_us, self.linear_us, len(self.fwd), len(self.bwd))


def format_line(fastlora_us: float, linear_us: float, fwd: int, bwd: int) -> str:
    """The benchmark's last line (issue 11's format)."""
    return (f"host fwd+bwd: fastlora {fastlora_us:.0f} us, nn.Linear {linear_us:.0f} us, "
            f"ratio {fastlora_us / linear_us:.2f}; launches fwd {fwd} bwd {bwd}")


def _fastlora_step(case: Case) -> tuple[Callable, Callable]:
    """(forward, backward) closures of one FastLoRALinear training step."""
    import fastlora

    torch.manual_seed(0)
    base = torch.nn.Linear(case.K, case.N, dtype=case.base_dtype)
    if case.base == "nf4":
        base = _linear4bit(base, case.base_dtype)
    layer = fastlora.FastLoRALinear.from_linear(base, r=case.r, lora_alpha=2 * case.r,
                                                lora_dropout=case.dropout,
                                                use_dora=case.adapter == "dora")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.data = layer.lora_A.data.to(case.adapter_dtype)
    layer.lora_B.data = layer.lora_B.data.to(case.adapter_dtype)
    layer.train()
    x = torch.randn(case.M, case.K, dtype=case.base_dtype, requires_grad=True)
    dy = torch.randn(case.M, case.N, dtype=case.base_dtype)
    inputs = (x, layer.lora_A, layer.lora_B)
    return (lambda: layer(x)), (lambda y: torch.autograd.grad(y, inputs, dy))


def _linear4bit(dense: torch.nn.Linear, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``dense`` quantized by bitsandbytes to NF4 (QLoRA's default: double quantization,
    blocksize 64), on the CPU."""
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True,
                            compute_dtype=compute_dtype, compress_statistics=True,
                            quant_type="nf4")  # fmt: skip
    lin.weight = bnb.nn.Params4bit(dense.weight.data.float(), requires_grad=False,
                                   blocksize=64, compress_statistics=True, quant_type="nf4",
                                   module=lin)  # fmt: skip
    lin.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return lin.to("cpu")  # bitsandbytes quantizes on the move to a device


def _linear_step(case: Case) -> tuple[Callable, Callable]:
    """The frozen float32 nn.Linear on the same shape: all of its time is host time."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(case.K, case.N).requires_grad_(False)
    x = torch.randn(case.M, case.K, requires_grad=True)
    dy = torch.randn(case.M, case.N)
    return (lambda: linear(x)), (lambda y: torch.autograd.grad(y, (x,), dy))


def _count(step: tuple[Callable, Callable], log: LaunchLog) -> tuple[list[Launch], list[Launch]]:
    fwd, bwd = step
    log.clear()
    with counting(log):
        y = fwd()
    forward = list(log.launches)
    log.clear()
    with counting(log):
        bwd(y)
    backward = list(log.launches)
    log.clear()
    return forward, backward


def measure(case: Case | None = None, reps: int = 300, warmup: int = 20,
            profile: int = 0) -> Result:
    """Median host microseconds of one fwd+bwd, fastlora (Triton path, stubbed driver)
    and nn.Linear interleaved in the same run; launches of one fwd and one bwd.
    ``profile`` > 0: afterwards, that many fastlora steps under cProfile (``Result.profile``,
    the functions with the most own time; not part of the timing)."""
    from fastlora.kernels import _configs

    if _configs.interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set: host_overhead measures the compiled launch path; "
            "run it without TRITON_INTERPRET"
        )
    case = case or Case()
    log = LaunchLog()
    with stub_driver(log), triton_backend_on_cpu():
        fl, lin = _fastlora_step(case), _linear_step(case)
        steps = {"fastlora": fl, "linear": lin}
        for _ in range(max(warmup, 1)):  # first call compiles (sm_90) and tunes
            for fwd, bwd in steps.values():
                bwd(fwd())
        fwd_l, bwd_l = _count(fl, log)
        lin_fwd, lin_bwd = _count(lin, log)
        times: dict[str, list[int]] = {name: [] for name in steps}
        order = list(steps)
        gc.collect()
        for i in range(reps):
            for name in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                fwd, bwd = steps[name]
                t0 = time.perf_counter_ns()
                bwd(fwd())
                times[name].append(time.perf_counter_ns() - t0)
            log.clear()
        report = _profile(fl, profile) if profile > 0 else ""
    return Result(
        fastlora_us=statistics.median(times["fastlora"]) / 1e3,
        linear_us=statistics.median(times["linear"]) / 1e3,
        fwd=fwd_l, bwd=bwd_l, linear_fwd=lin_fwd, linear_bwd=lin_bwd, reps=reps,
        profile=report,
    )


def _profile(step: tuple[Callable, Callable], n: int, top: int = 15) -> str:
    """Where the host time of ``n`` steps goes: cProfile's functions by own time."""
    import cProfile
    import io
    import pstats

    fwd, bwd = step
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        bwd(fwd())
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _names(launches: list[Launch]) -> str:
    return ", ".join(launch.name for launch in launches) or "none"


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300, help="timed fwd+bwd per provider")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--adapter", choices=ADAPTERS, default="lora")
    ap.add_argument("--base", choices=BASES, default="dense",
                    help="nf4: a bitsandbytes Linear4bit base (K raised to its blocksize, 64)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print where the host time of N fastlora steps goes (cProfile)")
    ap.add_argument("--check-launches", action="store_true",
                    help=f"exit 1 unless launches fwd <= {GOAL_FWD_LAUNCHES} (+1 with dropout) "
                         f"and bwd <= {GOAL_BWD_LAUNCHES} for LoRA (issue 11's goal), <= "
                         f"{GOAL_VARIANT_LAUNCHES} each way for DoRA or nf4 (deterministic)")
    ap.add_argument("--max-ratio", type=float,
                    help="exit 1 if the host time ratio exceeds this (timing: noisy when shared)")
    args = ap.parse_args(argv)
    case = Case(dropout=args.dropout, adapter=args.adapter, base=args.base,
                K=64 if args.base == "nf4" else Case.K)
    res = measure(case, reps=args.reps, warmup=args.warmup, profile=args.profile)
    if res.profile:
        print(res.profile)
    print(f"case: {case.describe()}; Triton driver "
          f"stubbed (target sm_{STUB_TARGET[1]}); median of {res.reps} interleaved fwd+bwd; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"fastlora fwd launches ({len(res.fwd)}): {_names(res.fwd)}")
    print(f"fastlora bwd launches ({len(res.bwd)}): {_names(res.bwd)}")
    print(f"nn.Linear launches: fwd {len(res.linear_fwd)} ({_names(res.linear_fwd)}), "
          f"bwd {len(res.linear_bwd)} ({_names(res.linear_bwd)})")
    failed = []
    fwd_goal, bwd_goal = case.goals()
    if args.check_launches and (len(res.fwd) > fwd_goal or len(res.bwd) > bwd_goal):
        failed.append(f"launches fwd {len(res.fwd)} bwd {len(res.bwd)} exceed the goal "
                      f"fwd <= {fwd_goal} bwd <= {bwd_goal}")
    if args.max_ratio is not None and res.ratio > args.max_ratio:
        failed.append(f"ratio {res.ratio:.2f} > {args.max_ratio:g}")
    if failed:  # before the result line, which stays the last line of the output
        print("host_overhead: FAILED: " + "; ".join(failed), file=sys.stderr, flush=True)
    print(res.line(), flush=True)
    if failed:
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
