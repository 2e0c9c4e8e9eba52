"""Shared test helpers: input factories and the per-dtype tolerance rule."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from fastlora.reference import lora_linear_reference

# Absolute slack added to the "twice PyTorch's own error" rule (flash-attention's rule):
# the kernel's error against the float64 reference must be <= 2 * err(torch, same dtype) + ATOL.
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def triton_runs_here() -> bool:
    if torch.cuda.is_available():
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401

        from fastlora import triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    return ["torch"] + (["triton"] if triton_runs_here() else [])


def compute_dtypes(backend: str) -> list[torch.dtype]:
    """dtypes a backend is tested in here; bf16 tl.dot is wrong under Triton 3.9's
    interpreter, so bf16 on the triton backend is left to a GPU."""
    if backend == "torch":
        return [torch.float64, torch.float32, torch.bfloat16]
    if torch.cuda.is_available():
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def make_inputs(M, K, N, r, dtype, device, bias=True, seed=0, lead=None):
    """x: [*lead, M, K] (or [M, K]), weight [N, K], bias [N], A [r, K], B [N, r]; B non-zero."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    shape = (*lead, M, K) if lead else (M, K)
    x = rnd(*shape)
    weight = rnd(N, K, scale=K**-0.5)
    b = rnd(N) if bias else None
    A = rnd(r, K, scale=K**-0.5)
    B = rnd(N, r, scale=r**-0.5)
    return x, weight, b, A, B


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(out, ref64, torch_same_dtype, dtype, what="output"):
    """``out`` within twice the error of plain PyTorch in the same dtype (``torch_same_dtype``),
    measured against the float64 reference ``ref64``, plus ATOL[dtype]."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    bound = 2 * max_err(torch_same_dtype, ref64) + ATOL[dtype]
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def reference_grads(x, weight, bias, A, B, scaling, dy, mask=None, p=0.0):
    """(y, dx, dA, dB) of the unfused reference in the inputs' own dtype."""
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    y = lora_linear_reference(x, weight, bias, A, B, scaling, mask, p)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    return y.detach(), dx, dA, dB


SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
# the smallest (subnormal) spacing of each dtype
SMALLEST_SPACING = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149,
                    torch.float64: 2.0**-1074}


def unit_roundoff(dtype: torch.dtype) -> float:
    return 2.0 ** -SIGNIFICANT_BITS[dtype]


def half_ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` around each value of ``v`` (float64): the largest error
    of rounding ``v`` once to ``dtype`` (round to nearest)."""
    _, e = torch.frexp(v)  # |v| in [2**(e-1), 2**e): spacing 2**(e - bits)
    return torch.maximum(torch.ldexp(torch.ones_like(v), e - SIGNIFICANT_BITS[dtype] - 1),
                         torch.full_like(v, SMALLEST_SPACING[dtype] / 2))


# the repository root: examples/ and their data scripts are loaded from here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str) -> ModuleType:
    """Import a script of the repository (``examples/...``) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def spawn_ranks(worker, out, world: int, timeout_s: float) -> None:
    """Run ``worker(rank, str(out))`` in ``world`` spawned processes (torch.distributed over
    gloo); fail the test with the workers' ``rank*.err`` logs if one raises, or if they do not
    finish within ``timeout_s`` (the workers are killed then)."""
    import time

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    ctx = mp.start_processes(worker, args=(str(out),), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {timeout_s} s")
    except mp.ProcessRaisedException as exc:
        logs = "\n".join(f.read_text() for f in sorted(out.glob("rank*.err")))
        pytest.fail(f"a worker failed:\n{logs or exc}")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@contextlib.contextmanager
def strategy(*args, **kw):
    """``triton_backend.set_strategy(*args, **kw)`` for the block, the previous picks after."""
    from fastlora import triton_backend

    previous = triton_backend.set_strategy(*args, **kw)
    try:
        yield
    finally:
        triton_backend.set_strategy(previous)
