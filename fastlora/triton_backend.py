"""The Triton backend: the fused kernels with autograd, and the per-shape pick between
them and the cuBLAS composition (``fastlora.torch_backend``).

    forward   shrink + GEMM launches           -> y [M, N], u [M, r]
    backward  dy pass, dx GEMM, reduce         -> dx, dA, dB   (at most 3 launches)

Two entry points to the same kernels:
- eager: ``_LoRAFunction`` (an autograd.Function) calls the launchers, which launch cached
  compiled kernels directly (``fastlora.kernels._launch``): no custom-op dispatch, no
  autotuner, no ``wrap_triton`` per call;
- torch.compile: the ``fastlora::lora_fwd_triton`` / ``lora_bwd_triton`` triton_ops, whose
  bodies launch through ``wrap_triton`` so the graph holds each kernel.

Saved for backward: ``x``, ``u`` [M, r] and the int64 dropout seed; the keep mask is
regenerated in the kernels from (seed, row, column), never stored.  The seed comes from
torch's generator for x's device (``torch.randint``, no host sync), so ``torch.manual_seed``
reproduces a run.  Backward has no atomics: dA and dB are partial sums reduced in a fixed
order by a kernel, bitwise reproducible from run to run.

On CPU tensors this backend runs only under ``TRITON_INTERPRET=1`` (the real kernels,
interpreted), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading

import torch
from torch import Tensor

from fastlora import _autograd, bases

log = logging.getLogger("fastlora")

STRATEGIES = ("fused", "composition", "auto")
# do_bench budget per candidate when a shape bucket is first seen (ms)
_BENCH_WARMUP_MS = 5
_BENCH_REP_MS = 20


_kernels = importlib.import_module("fastlora.kernels.api")
# Triton's interpreter patches triton.language globally and a first launch compiles into
# shared caches: launches from several threads are serialized on the host (an uncontended
# lock is ~0.1 us; the GPU work itself stays asynchronous).
_launch_lock = threading.RLock()
_interpreting = _kernels._configs.interpreting


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the fused kernels can run on ``device``, and why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreting():
            return False, "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
        if not torch.cuda.is_available():
            return False, "no CUDA driver or device is available to torch"
        try:
            from triton.runtime import driver

            driver.active.get_current_device()
        except Exception as exc:  # no GPU driver triton can use
            return False, f"triton has no active GPU driver ({exc})"
        return True, ""
    if device.type == "cpu":
        if _interpreting():
            return True, ""
        return False, "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
    return False, f"Triton kernels are built for CUDA devices, not {device.type!r}"


# --------------------------------------------------------------------------- the ops


def _base4(weight: Tensor) -> dict | None:
    """The 4-bit tile loader's arguments for a bitsandbytes 4-bit ``weight``, else None."""
    return bases.base_of(weight).kernel_args() if bases.is_4bit(weight) else None


# triton_op lets torch.compile trace into the op body and see each wrap_triton launch.  Under
# the interpreter the kernels are launched raw (wrap_triton is bypassed) and cannot run on
# fake tensors, so the ops are registered as opaque custom_ops there: AOTAutograd and
# opcheck then use the fake implementations below instead of tracing the body.
_register_op = torch.library.custom_op if _interpreting() else torch.library.triton_op


@_register_op("fastlora::lora_fwd_triton", mutates_args=())
def lora_fwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r],
    seed: int64 [1]. Returns y: [M, N] and u = s D(x) A^T: [M, r], both in x.dtype."""
    with _launch_lock:
        return _kernels.lora_forward(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, traceable=True,
            base4=_base4(weight),
        )


@lora_fwd_triton.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@_register_op("fastlora::lora_bwd_triton", mutates_args=())
def lora_bwd_triton(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [r, K], dB [N, r]); a gradient not asked for comes back
    empty and its work is skipped."""
    with _launch_lock:
        dx, dA, dB = _kernels.lora_backward(
            dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dA,
            need_dB, traceable=True, base4=_base4(weight),
        )  # fmt: skip
    # one fresh empty per missing gradient: outputs of an op may not alias each other
    return (
        dx if dx is not None else x.new_empty(0),
        dA if dA is not None else x.new_empty(0),
        dB if dB is not None else x.new_empty(0),
    )


@lora_bwd_triton.register_fake
def _(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return _autograd.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)


def _lora_grads(dy, x, weight, lora_A, lora_B, u, seed, scaling, dropout_p, *needs):
    return lora_bwd_triton(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, *needs)


lora_fwd_triton.register_autograd(
    lambda ctx, dy, _du: _autograd.grads(ctx, dy, _lora_grads), setup_context=_autograd.setup_context
)


def _eager_grads(dy, x, weight, lora_A, lora_B, u, seed, scaling, dropout_p, *needs):
    with _launch_lock:
        return _kernels.lora_backward(
            dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, *needs,
            base4=_base4(weight),
        )


class _LoRAFunction(torch.autograd.Function):
    """Eager path: the launchers called straight from autograd, without the custom-op
    dispatch the registered ops cost (~100 us a call).  x: [..., K], flattened here (no
    autograd view nodes for the reshape and the output's view); y: [..., N]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, hparams):
        # (scaling, dropout_p) in one argument and the seed drawn here: each argument of
        # apply costs host time
        scaling, dropout_p = hparams
        seed = _seed(x, dropout_p)
        flat = x.dim() != 2
        x2d = x.reshape(-1, x.shape[-1]) if flat else x
        with _launch_lock:
            y, u = _kernels.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                         seed, base4=_base4(weight))  # fmt: skip
        _autograd.save(ctx, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, u)
        ctx.x_shape = x.shape if flat else None
        return y.view(*x.shape[:-1], y.shape[1]) if flat else y

    @staticmethod
    def backward(ctx, dy):
        shape = ctx.x_shape
        if shape is None or dy is None:
            return _autograd.grads(ctx, dy, _eager_grads)
        dx, *rest = _autograd.grads(ctx, dy.reshape(-1, dy.shape[-1]), _eager_grads)
        return (None if dx is None else dx.view(shape), *rest)


def _seed(x: Tensor, dropout_p: float) -> Tensor:
    """The dropout seed: int64 [1] from torch's generator for x's device (no host sync)."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    return torch.empty(1, device=x.device, dtype=torch.int64)  # never read; launches nothing


def _fused(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> Tensor:
    """x: [..., K] -> y: [..., N] through the fused kernels."""
    if torch.compiler.is_dynamo_compiling():  # the cheapest check: a constant in eager
        x2d = x.reshape(-1, x.shape[-1])
        y = lora_fwd_triton(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p,
                            _seed(x, dropout_p))[0]  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[1])
    return _LoRAFunction.apply(x, weight, bias, lora_A, lora_B, (scaling, dropout_p))


def apply(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """x: [..., K] -> y: [..., N] in x.dtype, through the fused kernels or, where it was
    measured faster for this shape bucket, the cuBLAS composition.  ``dropout_p == 0``
    means no dropout (eval passes 0)."""
    K = x.shape[-1]
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    backward = torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
    )
    if bases.is_4bit(weight):
        base4 = bases.base_of(weight).kernel_args()
        base = base4["BASE"] if _kernels.fused_4bit_ok(K, base4) else "unaligned"
    else:
        base = "dense"
    if base == "unaligned":
        pick = "composition"  # quantization blocks straddle rows: no fused loader for it
    else:
        pick = strategy_for(M, K, lora_B.shape[0], lora_A.shape[0], x.dtype, dropout_p, x.device,
                            backward=backward, base=base)  # fmt: skip
    if pick == "composition":
        from fastlora import torch_backend

        y = torch_backend.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, scaling,
                                dropout_p)  # fmt: skip
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])
    return _fused(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p))


# --------------------------------------------------------------------------- strategy

_strategy_lock = threading.Lock()
_strategy_override: str | None = None
# FASTLORA_STRATEGY as read on first use, or after set_strategy(None) (None: not read yet)
_strategy_env: str | None = None
_strategy_cache: dict[tuple, str] = {}
# strategy_for's answers by its full argument list (no bucketing, no checks on a repeat)
_picks = _kernels._launch.CallCache()


def _check_strategy(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in STRATEGIES:
        raise ValueError(
            f"{source}: expected one of {', '.join(map(repr, STRATEGIES))}, got {name!r}"
        )
    return name.lower()


def set_strategy(strategy: str | None) -> str | None:
    """Force ``"fused"`` or ``"composition"`` for every shape, or ``"auto"`` to measure per
    shape bucket; ``None`` returns to ``FASTLORA_STRATEGY`` (default ``"auto"``), read
    again at the next call.  Returns the previous setting."""
    global _strategy_override, _strategy_env
    if strategy is not None:
        strategy = _check_strategy(strategy, "set_strategy(strategy)")
    with _strategy_lock:
        previous, _strategy_override = _strategy_override, strategy
        if strategy is None:
            _strategy_env = None
        _picks.clear()
    return previous


def clear_strategy_cache() -> None:
    """Forget every measured pick (they are re-measured on next use)."""
    with _strategy_lock:
        _strategy_cache.clear()
        _picks.clear()


def _forced() -> str:
    """The strategy set (``set_strategy``) or from ``FASTLORA_STRATEGY``: the environment is
    read once (the launch path asks on every call), and again after ``set_strategy(None)``."""
    global _strategy_env
    if _strategy_override is not None:
        return _strategy_override
    if _strategy_env is None:
        _strategy_env = _check_strategy(os.environ.get("FASTLORA_STRATEGY", "auto"),
                                        "FASTLORA_STRATEGY")  # fmt: skip
    return _strategy_env


def strategy_for(
    M: int,
    K: int,
    N: int,
    r: int,
    dtype: torch.dtype,
    dropout_p: float,
    device: torch.device,
    *,
    backward: bool = True,
    base: str = "dense",
) -> str:
    """``"fused"`` or ``"composition"`` for this shape.

    On CUDA with strategy ``"auto"``, the first call for a shape bucket (M rounded up to a
    power of two; K, N, r, dtype, dropout on/off, device index, forward-only or training)
    times both with ``triton.testing.do_bench`` and caches the faster.  Under the
    interpreter (CPU) the answer is ``"fused"`` so the kernels are what is tested.  Ranks
    above the kernels' limit (128; 64 for fp32 without TF32) always take the composition.
    While torch.compile traces, an unmeasured bucket takes ``"fused"`` (nothing can be
    timed during tracing): run one eager step first, or set the strategy, to have the
    measured pick compiled in."""
    forced = _strategy_override or _strategy_env or _forced()
    key = (M, K, N, r, dtype, dropout_p > 0.0, device, backward, base, forced,
           _kernels.dot_precision(dtype))  # fmt: skip
    pick = _picks.get(key)
    if pick is None:
        pick = _strategy(M, K, N, r, dtype, dropout_p, torch.device(device), backward, base,
                         forced)  # fmt: skip
        # not remembered: a traced "fused" (not measured), or "cuda" without an index (the
        # pick is per device, and the current one may change)
        unindexed = torch.device(device).type == "cuda" and torch.device(device).index is None
        if not torch.compiler.is_compiling() and not unindexed:
            _picks.put(key, pick)
    return pick


def _strategy(M, K, N, r, dtype, dropout_p, device, backward, base, forced) -> str:
    cfg = _kernels._configs
    if r > cfg.MAX_R:
        return "composition"
    kind = cfg.operand_kind(dtype.itemsize, _kernels.dot_precision(dtype))
    if device.type == "cuda" and cfg.pad_rank(r) > cfg.max_r_pad(kind):
        return "composition"  # no kernel config for it (fp32 without TF32, r > 64)
    if forced != "auto":
        return forced
    if device.type != "cuda":
        return "fused"
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (_kernels._configs.m_bucket(M), K, N, r, dtype, dropout_p > 0.0, index, backward, base)
    pick = _strategy_cache.get(key)
    if pick is not None:
        return pick
    if torch.compiler.is_compiling():
        return "fused"
    with _strategy_lock:
        pick = _strategy_cache.get(key)
        if pick is None:
            pick = _measure(*key)
            _strategy_cache[key] = pick
    return pick


def _measure(M, K, N, r, dtype, has_dropout, index, backward, base="dense") -> str:
    """Time the fused op and the composition on random data of this bucket's shape; a 4-bit
    ``base`` ("nf4", "fp4", "_dq" when nested) is quantized by bitsandbytes for it (the
    composition is then bitsandbytes' dequantize + cuBLAS + the low-rank path)."""
    import triton.testing

    from fastlora import torch_backend

    device = torch.device("cuda", index)
    p = 0.1 if has_dropout else 0.0
    # fork_rng: the timing runs draw random data and dropout seeds, which must not shift the
    # caller's random stream (a seeded run gives the same masks with or without a measurement)
    with torch.random.fork_rng(devices=[index]), torch.enable_grad():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=backward)
        weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        if base != "dense":
            weight = bases.quantize_4bit(weight, base)
        bias = torch.zeros(N, device=device, dtype=dtype)
        lora_A = torch.randn(r, K, device=device, dtype=dtype, requires_grad=backward)
        lora_B = torch.randn(N, r, device=device, dtype=dtype, requires_grad=backward)
        dy = torch.randn(M, N, device=device, dtype=dtype)

        def step(fn):
            def run():
                y = fn(x, weight, bias, lora_A, lora_B, 1.0, p)
                if backward:
                    torch.autograd.grad(y, (x, lora_A, lora_B), dy)

            return run

        ms = {
            name: triton.testing.do_bench(step(fn), warmup=_BENCH_WARMUP_MS, rep=_BENCH_REP_MS)
            for name, fn in (("fused", _fused), ("composition", torch_backend.apply))
        }
    pick = "fused" if ms["fused"] <= ms["composition"] else "composition"
    log.debug(
        "fastlora strategy M<=%d K=%d N=%d r=%d %s base=%s dropout=%s backward=%s cuda:%d: "
        "fused %.4f ms, composition %.4f ms -> %s",
        M, K, N, r, dtype, base, has_dropout, backward, index, ms["fused"], ms["composition"],
        pick,
    )  # fmt: skip
    return pick
