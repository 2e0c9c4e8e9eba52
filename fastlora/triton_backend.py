"""The Triton backend: the fused kernels with autograd, and the per-shape, per-direction
pick between fused candidates and the cuBLAS composition.

    forward   shrink + GEMM launches           -> y [M, N], u [M, r]
    backward  dy pass, dx GEMM, reduce         -> dx, dA, dB   (at most 3 launches)

Forward and backward are picked separately (``set_strategy(forward=..., backward=...)``,
``FASTLORA_STRATEGY=forward=fused,backward=composition``, or measured per shape bucket):
each direction runs one fused candidate (``fastlora.kernels.api.FORWARD_CANDIDATES`` /
``BACKWARD_CANDIDATES``) or the composition (cuBLAS GEMMs plus ``kernels/dropout_mask.py``).
Every candidate regenerates the dropout mask from the same Philox stream keyed by (seed,
row, column), so any forward pairs with any backward and the bits are the same.

Two entry points to the same launchers:
- eager: ``_LoRAFunction`` (an autograd.Function) calls them, and the kernel launchers
  launch cached compiled kernels directly (``fastlora.kernels._launch``): no custom-op
  dispatch, no autotuner, no ``wrap_triton`` per call;
- torch.compile: the ``fastlora::lora_fwd_triton`` / ``lora_bwd_triton`` triton_ops, whose
  bodies launch through ``wrap_triton`` so the graph holds each kernel.

Saved for backward: ``x``, ``u`` [M, r] and the int64 dropout seed; the keep mask is
regenerated from (seed, row, column), never stored.  The seed comes from torch's generator
for x's device (``torch.randint``, no host sync), so ``torch.manual_seed`` reproduces a
run.  Backward has no atomics: dA and dB are partial sums reduced in a fixed order by a
kernel, bitwise reproducible from run to run.

On CPU tensors this backend runs only under ``TRITON_INTERPRET=1`` (the real kernels,
interpreted), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import statistics
import threading
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastlora import _autograd, bases, fp8

log = logging.getLogger("fastlora")

STRATEGIES = ("fused", "composition", "auto")
DIRECTIONS = ("forward", "backward")
# do_bench budget per candidate and round when a shape bucket is first seen (ms)
_BENCH_WARMUP_MS = 5
_BENCH_REP_MS = 20
# do_bench runs per candidate, interleaved; the median decides (one sample can be an outlier)
BENCH_ROUNDS = 3
# a fused candidate must beat the composition by more than this fraction of the
# composition's time: a tie goes to the composition (cuBLAS, no compile, no risk)
TIE_MARGIN = 0.03


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


# --------------------------------------------------------------------------- composition


def composition_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    *,
    traceable: bool = False,
    tma: bool | None = None,
    base4: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``lora_forward`` as cuBLAS GEMMs: the low-rank part (and bias) written by the small
    GEMMs, the base GEMM accumulated onto it in place.  D(x) comes from the kernels' Philox
    (``dropout_apply``, keyed by ``seed``), so a fused backward regenerates the same mask.
    x: [M, K] -> y: [M, N], u: [M, r] in x.dtype.  ``tma``/``base4`` are not used."""
    A = (lora_A * scaling).to(x.dtype)
    xd = x if dropout_p == 0.0 else _kernels.dropout_apply(x, seed, dropout_p,
                                                           traceable=traceable)  # fmt: skip
    u = torch.mm(xd, A.t())
    Bt = lora_B.to(x.dtype).t()
    y = torch.mm(u, Bt) if bias is None else torch.addmm(bias, u, Bt)
    # a 4-bit base is decoded into a transient W (bitsandbytes), never kept
    y.addmm_(x, bases.dense_weight(weight, x.dtype).t())
    return y, u


def composition_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    *,
    traceable: bool = False,
    tma: bool | None = None,
    base4: dict | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``lora_backward`` as cuBLAS GEMMs, the mask regenerated from ``seed`` by
    ``dropout_apply`` (the kernels' Philox).  Returns dx [M, K], dA [r, K], dB [N, r] in
    x's / lora_A's / lora_B's dtype; None for what is not needed."""
    dx = dA = dB = None
    if need_dx or need_dA:
        g = torch.mm(dy, (lora_B * scaling).to(dy.dtype))  # [M, r]
        if need_dx:
            # (g A) m / (1-p) first, in place, then the big GEMM accumulates onto it
            dx = torch.mm(g, lora_A.to(x.dtype))
            if dropout_p > 0.0:
                _kernels.dropout_apply(dx, seed, dropout_p, out=dx, traceable=traceable)
            dx.addmm_(dy, bases.dense_weight(weight, dy.dtype))
        if need_dA:
            xd = x if dropout_p == 0.0 else _kernels.dropout_apply(x, seed, dropout_p,
                                                                   traceable=traceable)
            dA = torch.mm(g.t(), xd).to(lora_A.dtype)
    if need_dB:
        dB = torch.mm(u.t(), dy).t().to(lora_B.dtype).contiguous()
    return dx, dA, dB


def forward_launchers() -> dict[str, Callable]:
    """Forward candidates by name: the fused ones of the kernel layer, and "composition"."""
    return {**_kernels.FORWARD_CANDIDATES, "composition": composition_forward}


def backward_launchers() -> dict[str, Callable]:
    """Backward candidates by name: the fused ones of the kernel layer, and "composition"."""
    return {**_kernels.BACKWARD_CANDIDATES, "composition": composition_backward}


def _launchers(direction: str) -> dict[str, Callable]:
    return forward_launchers() if direction == "forward" else backward_launchers()


# --------------------------------------------------------------------------- the ops


def _base4(weight: Tensor) -> dict | None:
    """The tile loader's arguments for a bitsandbytes 4-bit or an FP8 ``weight``, else None."""
    return bases.base_of(weight).kernel_args() if bases.is_quantized(weight) else None


# --------------------------------------------------------------------------- FP8 base

# The candidates an FP8 base is timed with: "fused" (the codes decoded in the forward and dx
# main loops; on sm_90 through TMA only, else the launchers decode once themselves),
# "decode_once" (W decoded once into a reused workspace, then the dense kernels) and the
# composition (W decoded for cuBLAS).  Another fused candidate forced by name runs on W
# decoded once.
FP8_CANDIDATES = ("fused", "decode_once", "composition")
_fp8_decode = importlib.import_module("fastlora.kernels.dequant_fp8").decoded_weight


def _on_decoded_fp8(fn: Callable, weight_arg: int) -> Callable:
    """``fn`` (a dense-or-4-bit launcher) run on an FP8 base decoded once into the compute
    dtype: positional argument ``weight_arg`` is the weight, and no ``base4`` is passed."""

    def run(*args, traceable: bool = False, tma: bool | None = None, base4: dict | None = None):
        if base4 is not None:
            args = list(args)
            args[weight_arg] = _fp8_decode(base4, args[weight_arg - 1].dtype, traceable)
        return fn(*args, traceable=traceable, tma=tma)

    run.__name__ = run.__qualname__ = f"fp8_decoded_{getattr(fn, '__name__', 'launcher')}"
    return run


def _fp8_launcher(direction: str, name: str) -> Callable:
    """The launcher of candidate ``name`` over an FP8 base."""
    fn = _launchers(direction)[name]
    if name in ("fused", "composition"):  # they read the FP8 base themselves
        return fn
    return _on_decoded_fp8(fn, 1 if direction == "forward" else 2)


def _launcher(direction: str, name: str, base: str) -> Callable:
    """The launcher of candidate ``name`` for a base kind ("dense", a 4-bit kind, "e4m3")."""
    return _fp8_launcher(direction, name) if base == "e4m3" else _launchers(direction)[name]


def _base_kind(weight: Tensor) -> str:
    return "e4m3" if bases.is_fp8(weight) else "dense"


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
    forward: str = "fused",
    backward: str = "fused",
) -> tuple[Tensor, Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r],
    seed: int64 [1]. Returns y: [M, N] and u = s D(x) A^T: [M, r], both in x.dtype.
    ``forward``: the candidate that runs; ``backward``: the one autograd runs later."""
    with _launch_lock:
        return _launcher("forward", forward, _base_kind(weight))(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, traceable=True,
            base4=_base4(weight),
        )


@lora_fwd_triton.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, forward="fused",
      backward="fused"):  # fmt: skip
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
    backward: str = "fused",
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [r, K], dB [N, r]) from the ``backward`` candidate; a
    gradient not asked for comes back empty and its work is skipped."""
    with _launch_lock:
        dx, dA, dB = _launcher("backward", backward, _base_kind(weight))(
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
def _(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
      backward="fused"):  # fmt: skip
    return _autograd.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)


def _traced_setup(ctx, inputs, output) -> None:
    _autograd.setup_context(ctx, inputs[:8], output)
    ctx.backward_name = inputs[9] if len(inputs) > 9 else "fused"
    ctx.extra_inputs = len(inputs) - 8  # the candidate names: no gradient


def _traced_backward(ctx, dy, _du):
    name = ctx.backward_name

    def lora_grads(dy, x, weight, lora_A, lora_B, u, seed, scaling, dropout_p, *needs):
        return lora_bwd_triton(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                               *needs, name)  # fmt: skip

    return (*_autograd.grads(ctx, dy, lora_grads), *(None,) * ctx.extra_inputs)


lora_fwd_triton.register_autograd(_traced_backward, setup_context=_traced_setup)


def _eager_grads(launcher: Callable) -> Callable:
    """``_autograd.grads``'s ``lora_grads`` for a backward launcher, eager."""

    def lora_grads(dy, x, weight, lora_A, lora_B, u, seed, scaling, dropout_p, *needs):
        with _launch_lock:
            return launcher(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, *needs,
                            base4=_base4(weight))  # fmt: skip

    return lora_grads


class _LoRAFunction(torch.autograd.Function):
    """Eager path: the launchers called straight from autograd, without the custom-op
    dispatch the registered ops cost (~100 us a call).  x: [..., K], flattened here (no
    autograd view nodes for the reshape and the output's view); y: [..., N]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call):
        # (scaling, dropout_p, plan) in one argument and the seed drawn here: each argument
        # of apply costs host time
        scaling, dropout_p, plan = call
        seed = _seed(x, dropout_p)
        flat = x.dim() != 2
        x2d = x.reshape(-1, x.shape[-1]) if flat else x
        with _launch_lock:
            y, u = plan.forward_fn(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                   base4=_base4(weight))  # fmt: skip
        _autograd.save(ctx, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, u)
        ctx.x_shape = x.shape if flat else None
        ctx.lora_grads = plan.backward_grads
        return y.view(*x.shape[:-1], y.shape[1]) if flat else y

    @staticmethod
    def backward(ctx, dy):
        shape = ctx.x_shape
        if shape is None or dy is None:
            return _autograd.grads(ctx, dy, ctx.lora_grads)
        dx, *rest = _autograd.grads(ctx, dy.reshape(-1, dy.shape[-1]), ctx.lora_grads)
        return (None if dx is None else dx.view(shape), *rest)


def _seed(x: Tensor, dropout_p: float) -> Tensor:
    """The dropout seed: int64 [1] from torch's generator for x's device (no host sync)."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    return torch.empty(1, device=x.device, dtype=torch.int64)  # never read; launches nothing


class Picks(NamedTuple):
    """The candidate each direction runs for a shape: a name of ``forward_launchers()`` and
    one of ``backward_launchers()`` ("fused", "composition", or another fused candidate)."""

    forward: str
    backward: str

    def spelled(self) -> str:
        """``"fused"`` when both agree, else ``"forward=<a>,backward=<b>"`` (the grammar of
        ``FASTLORA_STRATEGY`` and ``set_strategy``)."""
        if self.forward == self.backward:
            return self.forward
        return f"forward={self.forward},backward={self.backward}"


class _Plan(NamedTuple):
    """What ``apply`` runs for a shape: the picks, their launchers, and whether the whole
    call is the torch backend's (composition both ways without dropout: no mask to share)."""

    picks: Picks
    forward_fn: Callable
    backward_grads: Callable
    torch_path: bool


def _plan_of(picks: Picks, dropout_p: float, base: str = "dense") -> _Plan:
    torch_path = picks == ("composition", "composition") and dropout_p == 0.0
    return _Plan(picks, _launcher("forward", picks.forward, base),
                 _eager_grads(_launcher("backward", picks.backward, base)),
                 torch_path)  # fmt: skip


def _fused(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
           plan: _Plan) -> Tensor:  # fmt: skip
    """x: [..., K] -> y: [..., N] through the plan's launchers."""
    if torch.compiler.is_dynamo_compiling():  # the cheapest check: a constant in eager
        x2d = x.reshape(-1, x.shape[-1])
        y = lora_fwd_triton(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p,
                            _seed(x, dropout_p), *plan.picks)[0]  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[1])
    return _LoRAFunction.apply(x, weight, bias, lora_A, lora_B, (scaling, dropout_p, plan))


def apply(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """x: [..., K] -> y: [..., N] in x.dtype, each direction through the candidate picked
    for this shape bucket (``picks_for``).  ``dropout_p == 0`` means no dropout (eval
    passes 0)."""
    K = x.shape[-1]
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    backward = torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
    )
    if bases.is_4bit(weight):
        base4 = bases.base_of(weight).kernel_args()
        base = base4["BASE"] if _kernels.fused_4bit_ok(K, base4) else "unaligned"
    elif bases.is_fp8(weight):
        # the FP8 loader masks any K (the launchers decode once where it cannot run); the
        # traced ops take tensors alone, and the scales attached to the codes (fp8.attach)
        # are not known to reach them: a torch.compile trace takes the torch path
        base = "unaligned" if torch.compiler.is_compiling() else "e4m3"
    else:
        base = "dense"
    plan = None
    if base != "unaligned":  # quantization blocks straddling rows: no fused loader for it
        plan = _plan_for(M, K, lora_B.shape[0], lora_A.shape[0], x.dtype, lora_A.dtype,
                         bias is not None, dropout_p, x.device, backward, base)  # fmt: skip
    if plan is None or plan.torch_path:
        from fastlora import torch_backend

        y = torch_backend.apply(x.reshape(-1, K), weight, bias, lora_A, lora_B, scaling,
                                dropout_p)  # fmt: skip
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])
    return _fused(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), plan)


# --------------------------------------------------------------------------- strategy

_strategy_lock = threading.Lock()
_strategy_override: Picks | None = None
# FASTLORA_STRATEGY as read on first use, or after set_strategy(None) (None: not read yet)
_strategy_env: Picks | None = None
# measured picks by shape bucket (see _measure)
_strategy_cache: dict[tuple, Picks] = {}
# _plan_for's answers by its full argument list (no bucketing, no checks on a repeat)
_plans = _kernels._launch.CallCache()


def _names(direction: str) -> tuple[str, ...]:
    return (*STRATEGIES, *(n for n in _launchers(direction) if n not in STRATEGIES))


def _check_name(name: object, source: str, directions=DIRECTIONS) -> str:
    for direction in directions:
        names = _names(direction)
        if not isinstance(name, str) or name.strip().lower() not in names:
            which = "" if len(directions) > 1 else f" ({direction} candidates)"
            raise ValueError(f"{source}: expected one of {', '.join(map(repr, names))}"
                             f"{which}, got {name!r}")  # fmt: skip
    return name.strip().lower()


def parse_strategy(spec: object, source: str = "FASTLORA_STRATEGY") -> Picks:
    """``"fused"`` (both directions) or ``"forward=fused,backward=composition"`` (a
    direction left out is ``"auto"``) -> ``Picks``; a bad value raises ``ValueError``
    naming ``source``."""
    if not isinstance(spec, str) or "=" not in spec:
        name = _check_name(spec, source)
        return Picks(name, name)
    given: dict[str, str] = {}
    for item in spec.split(","):
        key, _, value = (part.strip().lower() for part in item.partition("="))
        if key not in DIRECTIONS or key in given or not value:
            raise ValueError(f"{source}: expected 'forward=<name>,backward=<name>' (or one "
                             f"name for both), got {spec!r}")  # fmt: skip
        given[key] = _check_name(value, f"{source} ({key})", (key,))
    return Picks(given.get("forward", "auto"), given.get("backward", "auto"))


def set_strategy(
    strategy: str | None = None, *, forward: str | None = None, backward: str | None = None,
) -> str | None:  # fmt: skip
    """Force the candidate of each direction: ``set_strategy("fused")`` (both),
    ``set_strategy(forward="fused", backward="composition")`` (a direction not given is
    ``"auto"``), or ``"auto"`` to measure per shape bucket; a name of a fused candidate
    works too.  ``set_strategy(None)`` returns to ``FASTLORA_STRATEGY`` (default
    ``"auto"``), read again at the next call.  Returns the previous setting, spelled as
    ``FASTLORA_STRATEGY`` is (``"fused"``, ``"forward=fused,backward=composition"``), or
    None when it came from the environment."""
    global _strategy_override, _strategy_env
    if forward is not None or backward is not None:
        if strategy is not None:
            raise ValueError(f"set_strategy: give strategy ({strategy!r}) or forward=/backward=, "
                             "not both")  # fmt: skip
        picks = Picks(_check_name(forward or "auto", "set_strategy(forward)", ("forward",)),
                      _check_name(backward or "auto", "set_strategy(backward)", ("backward",)))
    elif strategy is not None:
        picks = parse_strategy(strategy, "set_strategy(strategy)")
    else:
        picks = None
    with _strategy_lock:
        previous, _strategy_override = _strategy_override, picks
        if picks is None:
            _strategy_env = None
        _plans.clear()
    return None if previous is None else previous.spelled()


def clear_strategy_cache() -> None:
    """Forget every measured pick (they are re-measured on next use)."""
    with _strategy_lock:
        _strategy_cache.clear()
        _plans.clear()


def _forced_picks() -> Picks:
    """The strategy set (``set_strategy``) or from ``FASTLORA_STRATEGY``: the environment is
    read once (the launch path asks on every call), and again after ``set_strategy(None)``."""
    global _strategy_env
    if _strategy_override is not None:
        return _strategy_override
    if _strategy_env is None:
        _strategy_env = parse_strategy(os.environ.get("FASTLORA_STRATEGY", "auto"))
    return _strategy_env


def _forced() -> str:
    """``_forced_picks`` spelled as one string (``"composition"`` when both directions are)."""
    return _forced_picks().spelled()


def picks_for(
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
    adapter_dtype: torch.dtype | None = None,
    bias: bool = True,
) -> Picks:
    """The candidate each direction runs for this shape (``Picks``).

    A forced direction runs what was forced.  An ``"auto"`` one, on CUDA, is measured the
    first time a shape bucket is seen (M rounded up to a power of two; K, N, r, the
    activation and adapter dtypes, bias or not, dropout on/off, device, forward-only or
    training, base kind): every candidate of the direction is timed with
    ``triton.testing.do_bench`` ``BENCH_ROUNDS`` times, interleaved, and the fastest median
    wins unless it is within ``TIE_MARGIN`` of the composition, which then wins.  Under an
    initialized ``torch.distributed`` process group rank 0 measures and every rank runs its
    picks.  Under the interpreter (CPU) ``"auto"`` is ``"fused"`` so the kernels are what
    is tested.  Ranks above the kernels' limit (128; 64 for fp32 without TF32) always take
    the composition.  While torch.compile traces, an unmeasured bucket takes ``"fused"``
    (nothing can be timed during tracing): run one eager step first, or set the strategy."""
    adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
    return _plan_for(M, K, N, r, dtype, adapter_dtype, bias, dropout_p, device, backward,
                     base).picks  # fmt: skip


def strategy_for(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout_p: float,
                 device: torch.device, **kw) -> str:  # fmt: skip
    """``picks_for`` spelled as one string: ``"fused"``, ``"composition"`` or
    ``"forward=<a>,backward=<b>"``."""
    return picks_for(M, K, N, r, dtype, dropout_p, device, **kw).spelled()


def _plan_for(M, K, N, r, dtype, adapter_dtype, has_bias, dropout_p, device, backward,
              base) -> _Plan:  # fmt: skip
    forced = _strategy_override or _strategy_env or _forced_picks()
    key = (M, K, N, r, dtype, adapter_dtype, has_bias, dropout_p, device, backward, base,
           forced, _kernels.dot_precision(dtype))  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        device = torch.device(device)
        picks = _strategy(M, K, N, r, dtype, adapter_dtype, has_bias, dropout_p, device,
                          backward, base, forced)  # fmt: skip
        plan = _plan_of(picks, dropout_p, base)
        # not remembered: a traced "fused" (not measured), or "cuda" without an index (the
        # pick is per device, and the current one may change)
        unindexed = device.type == "cuda" and device.index is None
        if not torch.compiler.is_compiling() and not unindexed:
            _plans.put(key, plan)
    return plan


def _measurable(device: torch.device) -> bool:
    """Whether "auto" is decided by timing on this device (CUDA; the interpreter is not
    timed: its "auto" is "fused")."""
    return device.type == "cuda"


def _strategy(M, K, N, r, dtype, adapter_dtype, has_bias, dropout_p, device, backward, base,
              forced: Picks) -> Picks:  # fmt: skip
    cfg = _kernels._configs
    if r > cfg.MAX_R:
        return Picks("composition", "composition")
    kind = cfg.operand_kind(dtype.itemsize, _kernels.dot_precision(dtype))
    if device.type == "cuda" and cfg.pad_rank(r) > cfg.max_r_pad(kind):
        return Picks("composition", "composition")  # no kernel config (fp32 without TF32)
    four_bit_only = getattr(_kernels, "CANDIDATES_4BIT_ONLY", frozenset())
    if base == "dense" and four_bit_only.intersection(forced):
        # a 4-bit-only candidate on a dense base is the fused kernels it decodes for
        forced = Picks(*("fused" if n in four_bit_only else n for n in forced))
    dense_only = getattr(_kernels, "CANDIDATES_SM90_DENSE_ONLY", frozenset())
    if base != "dense" and dense_only.intersection(forced):
        forced = Picks(*("fused" if n in dense_only else n for n in forced))  # (it runs them)
    if "auto" not in forced:
        return forced
    if not _measurable(device):
        measured = Picks("fused", "fused")
    else:
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        bucket = (cfg.m_bucket(M), K, N, r, dtype, adapter_dtype, has_bias, dropout_p > 0.0,
                  backward, base)  # fmt: skip
        measured = _strategy_cache.get((*bucket, index))
        if measured is None:
            if torch.compiler.is_compiling():  # nothing can be timed while tracing
                measured = Picks("fused", "fused")
            else:
                with _strategy_lock:
                    measured = _strategy_cache.get((*bucket, index))
                    if measured is None:
                        measured = _agree(bucket, _measure(bucket, index))
                        _strategy_cache[(*bucket, index)] = measured
    fwd = measured.forward if forced.forward == "auto" else forced.forward
    bwd = measured.backward if forced.backward == "auto" else forced.backward
    return Picks(fwd, bwd)


# --------------------------------------------------------------------------- measurement


def choose(times: dict[str, float]) -> str:
    """The pick among one direction's median times (ms by candidate name, "composition"
    among them): the fastest fused candidate if it beats the composition by more than
    ``TIE_MARGIN``, else the composition."""
    comp = times["composition"]
    fused = {n: t for n, t in times.items() if n != "composition"}
    if not fused:
        return "composition"
    best = min(fused, key=fused.__getitem__)
    return best if fused[best] < comp * (1.0 - TIE_MARGIN) else "composition"


def _measure(bucket: tuple, index: int) -> Picks | None:
    """Time every candidate of each direction on random data of the bucket's shape and
    choose; None on a rank other than 0 of a process group (it takes rank 0's picks)."""
    if _rank() > 0:
        return None
    times = _time_candidates(bucket, index)
    fwd = choose(times["forward"])
    bwd = choose(times["backward"]) if times.get("backward") else (
        fwd if fwd in backward_launchers() else "fused")
    M, K, N, r, dtype, adapter_dtype, has_bias, has_dropout, backward, base = bucket
    log.debug(
        "fastlora strategy M<=%d K=%d N=%d r=%d %s adapters %s bias=%s base=%s dropout=%s "
        "backward=%s device %d: forward %s -> %s; backward %s -> %s",
        M, K, N, r, dtype, adapter_dtype, has_bias, base, has_dropout, backward, index,
        _fmt(times["forward"]), fwd, _fmt(times.get("backward", {})), bwd,
    )  # fmt: skip
    return Picks(fwd, bwd)


def _fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{n} {t:.4f} ms" for n, t in times.items()) or "not timed"


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _agree(bucket: tuple, picks: Picks | None) -> Picks:
    """Under an initialized process group of several ranks, rank 0's picks for ``bucket``,
    broadcast (a collective: every rank meets a new bucket in the same step, as data-parallel
    ranks with equal batch shapes do); the bucket is checked to be the same on every rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return picks
    box = [bucket, None if picks is None else tuple(picks)]
    dist.broadcast_object_list(box, src=0)
    if tuple(box[0]) != bucket:
        raise RuntimeError(
            f"fastlora strategy: rank {dist.get_rank()} measures shape bucket {bucket} while "
            f"rank 0 measured {box[0]}: ranks must meet new shapes together; set the strategy "
            "(set_strategy or FASTLORA_STRATEGY) to skip the measurement")  # fmt: skip
    return Picks(*box[1])


def _do_bench(run: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(run, warmup=_BENCH_WARMUP_MS, rep=_BENCH_REP_MS,
                                   return_mode="median")  # fmt: skip


def _time_candidates(
    bucket: tuple, index: int, *, device: torch.device | None = None,
    bench: Callable[[Callable[[], object]], float] = _do_bench, p: float = 0.1,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median ms of ``BENCH_ROUNDS`` interleaved ``bench`` runs (``do_bench``), by
    direction and candidate, on random data of the bucket's shape (a 4-bit ``base`` is
    quantized by bitsandbytes for it, an FP8 one by ``fastlora.fp8``, timing
    ``FP8_CANDIDATES``; the adapters in their own dtype; a bias only if the
    layer has one; dropout rate ``p`` if the bucket has dropout).  "backward" is absent for
    a forward-only bucket.  ``device``: default ``cuda:<index>``."""
    M, K, N, r, dtype, adapter_dtype, has_bias, has_dropout, backward, base = bucket
    device = torch.device("cuda", index) if device is None else device
    p = p if has_dropout else 0.0
    # fork_rng: the timing draws random data and seeds, which must not shift the caller's
    # random stream (a seeded run gives the same masks with or without a measurement)
    devices = [index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        x = torch.randn(M, K, device=device, dtype=dtype)
        weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        if base == "e4m3":
            weight = fp8.attach(*fp8.quantize(weight))
        elif base != "dense":
            weight = bases.quantize_4bit(weight, base)
        base4 = _base4(weight)
        bias = torch.zeros(N, device=device, dtype=dtype) if has_bias else None
        lora_A = torch.randn(r, K, device=device, dtype=adapter_dtype) / K**0.5
        lora_B = torch.randn(N, r, device=device, dtype=adapter_dtype)
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        _, u = composition_forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed)
        runs = {("forward", name): (lambda fn=fn: fn(x, weight, bias, lora_A, lora_B, 1.0, p,
                                                      seed, base4=base4))
                for name, fn in _timed("forward", base, device).items()}  # fmt: skip
        if backward:
            runs.update({("backward", name): (
                lambda fn=fn: fn(dy, x, weight, lora_A, lora_B, u, 1.0, p, seed, True, True,
                                 True, base4=base4))
                for name, fn in _timed("backward", base, device).items()})
        samples: dict[tuple, list[float]] = {k: [] for k in runs}
        for _ in range(BENCH_ROUNDS):
            for k, run in runs.items():
                samples[k].append(bench(run))
    times: dict[str, dict[str, float]] = {}
    for (direction, name), ms in samples.items():
        times.setdefault(direction, {})[name] = statistics.median(ms)
    return times


def _timed(direction: str, base: str, device: torch.device) -> dict[str, Callable]:
    """The candidates timed for a base kind: ``FP8_CANDIDATES`` for an FP8 base; every
    launcher of the direction otherwise, less the 4-bit-only ones on a dense base and the
    sm_90 dense-only ones (``fused`` itself elsewhere) on a 4-bit base or below sm_90."""
    if base == "e4m3":
        return {name: _fp8_launcher(direction, name) for name in FP8_CANDIDATES}
    skip = getattr(_kernels, "CANDIDATES_4BIT_ONLY", frozenset()) if base == "dense" \
        else frozenset()
    if base != "dense" or (device.type == "cuda"
                           and torch.cuda.get_device_capability(device)[0] < 9):
        skip = skip | getattr(_kernels, "CANDIDATES_SM90_DENSE_ONLY", frozenset())
    return {name: fn for name, fn in _launchers(direction).items() if name not in skip}
