"""Mixed-adapter batches on the Triton backend: each row of x goes through its own adapter
(``fastlora.kernels.lora_sgmv``), wired into autograd.

    forward   sort rows by adapter, stack adapters, addmm (base), shrink, expand -> y
    backward  mm (dy W), shrink (g), expand (dx low-rank), segment (dA, dB)     -> grads

The adapters are stacked with differentiable torch ops (``stack_adapters``), so the kernels
see one A [n, R, K] and one B [n, N, R], and autograd hands each adapter the slice of the
stack's gradient in its own dtype.  Saved for backward: x, u [M, r_max] (sorted order), the
sort (index and order), the stacks and the int64 dropout seed; never D(x).

Two entry points to the same launchers, as in ``fastlora.triton_backend``: eager calls go
through ``_SGMVFunction`` (no op dispatch); under torch.compile the ``fastlora::sgmv_fwd`` /
``sgmv_bwd`` ops (triton_ops on a GPU, whose launches go through ``wrap_triton``; opaque
custom_ops under the interpreter, where wrap_triton cannot run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import bases, triton_backend

_kernels = triton_backend._kernels
_register_op = triton_backend._register_op
_lock = triton_backend._launch_lock


def supported(dtype: torch.dtype, max_rank: int, device: torch.device) -> bool:
    """Whether the kernels have tiles for this activation dtype and largest rank on
    ``device`` (IEEE fp32 on a GPU stops at rank block 64, like the single-adapter path)."""
    cfg = _kernels._configs
    if max_rank > cfg.MAX_R:
        return False
    if torch.device(device).type != "cuda":
        return True
    kind = cfg.operand_kind(dtype.itemsize, _kernels.dot_precision(dtype))
    return cfg.pad_rank(max_rank) <= cfg.max_r_pad(kind)


# --------------------------------------------------------------------------- checks


def _check(x2d, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_index) -> None:
    """Clear errors for bad input, naming the argument (shapes only: no host sync)."""
    if not isinstance(x2d, Tensor) or x2d.dim() != 2:
        raise ValueError(f"x2d: expected a 2-D tensor [M, K], got "
                         f"{tuple(x2d.shape) if isinstance(x2d, Tensor) else type(x2d)}")
    M, K = x2d.shape
    if bases.is_4bit(weight):
        raise NotImplementedError("weight: a 4-bit base is not supported by the multi-adapter "
                                  "Triton kernels yet; use the torch backend")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight: expected [N, {K}] (x2d is [{M}, {K}]), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x2d.dtype:
        raise ValueError(f"weight: expected x2d's dtype {x2d.dtype}, got {weight.dtype}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected [{N}], got {tuple(bias.shape)}")
    n = len(lora_As)
    if n == 0:
        raise ValueError("lora_As: expected at least one adapter, got none")
    for name, seq in (("lora_Bs", lora_Bs), ("scalings", scalings), ("dropout_ps", dropout_ps)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected {n} entries (one per adapter in lora_As), "
                             f"got {len(seq)}")
    for i, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or A.shape[1] != K:
            raise ValueError(f"lora_As[{i}]: expected [r, {K}], got {tuple(A.shape)}")
        r = A.shape[0]
        if not 1 <= r <= _kernels.MAX_R:
            raise ValueError(f"lora_As[{i}]: rank must be in 1..{_kernels.MAX_R}, got {r}")
        if tuple(B.shape) != (N, r):
            raise ValueError(f"lora_Bs[{i}]: expected [{N}, {r}], got {tuple(B.shape)}")
        if not 0.0 <= dropout_ps[i] < 1.0:
            raise ValueError(f"dropout_ps[{i}]: expected 0 <= p < 1, got {dropout_ps[i]}")
    if (not isinstance(row_index, Tensor) or row_index.dim() != 1 or row_index.shape[0] != M
            or row_index.dtype.is_floating_point or row_index.dtype.is_complex
            or row_index.dtype == torch.bool):
        got = (f"{row_index.dtype} {tuple(row_index.shape)}" if isinstance(row_index, Tensor)
               else type(row_index).__name__)
        raise ValueError(f"row_index: expected an integer tensor [{M}] (one adapter index per "
                         f"row of x2d, -1 for the base), got {got}")
    if row_index.device != x2d.device:
        raise ValueError(f"row_index: expected it on {x2d.device}, got {row_index.device}")
    if row_index.device.type == "cpu" and M and not torch.compiler.is_compiling():
        lo, hi = int(row_index.min()), int(row_index.max())  # no device to sync on the CPU
        if lo < -1 or hi >= n:
            raise ValueError(f"row_index: expected values in [-1, {n - 1}] ({n} adapters), "
                             f"got values in [{lo}, {hi}]")


# per-adapter (scaling, p) tables on the device, by value: made once, not per call (a fresh
# host-to-device copy would synchronize)
_tables: dict[tuple, Tensor] = {}
_TABLES_MAX = 256


def _table(scalings: tuple, dropout_ps: tuple, device: torch.device) -> Tensor:
    """float32 [n, 2] rows (s_i, p_i) on ``device``."""
    values = [[float(s), float(p)] for s, p in zip(scalings, dropout_ps)]
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (tuple(map(tuple, values)), device)
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= _TABLES_MAX:
            _tables.clear()
        table = _tables[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return table


# --------------------------------------------------------------------------- the ops


@_register_op("fastlora::sgmv_fwd", mutates_args=())
def sgmv_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    table: Tensor,
    row_index: Tensor,
    seed: Tensor,
    has_dropout: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, A: [n, R, K], B: [n, N, R], table:
    float32 [n, 2], row_index: int64 [M], seed: int64 [1].  Returns y [M, N], u [M, R]
    (sorted rows), the sorted index and the order (int64 [M])."""
    with _lock:
        y, u, sidx, order = _kernels.sgmv_forward(x, weight, bias, A, B, table, row_index, seed,
                                                  has_dropout, traceable=True)  # fmt: skip
    return y, u, sidx, order


@sgmv_fwd.register_fake
def _(x, weight, bias, A, B, table, row_index, seed, has_dropout):
    M = x.shape[0]
    return (x.new_empty(M, weight.shape[0]), x.new_empty(M, A.shape[1]),
            row_index.new_empty(M), row_index.new_empty(M))  # fmt: skip


@_register_op("fastlora::sgmv_bwd", mutates_args=())
def sgmv_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    table: Tensor,
    u: Tensor,
    sidx: Tensor,
    order: Tensor,
    seed: Tensor,
    has_dropout: bool,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [n, R, K], dB [n, N, R]); one not asked for comes back empty."""
    with _lock:
        dx, dA, dB = _kernels.sgmv_backward(dy, x, weight, A, B, table, u, sidx, order, seed,
                                            has_dropout, need_dx, need_dA, need_dB,
                                            traceable=True)  # fmt: skip
    return (dx if dx is not None else x.new_empty(0), dA if dA is not None else x.new_empty(0),
            dB if dB is not None else x.new_empty(0))  # fmt: skip


@sgmv_bwd.register_fake
def _(dy, x, weight, A, B, table, u, sidx, order, seed, has_dropout, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            A.new_empty(A.shape) if need_dA else x.new_empty(0),
            B.new_empty(B.shape) if need_dB
            else x.new_empty(0))  # fmt: skip


def _save(ctx, x, weight, bias, A, B, table, seed, has_dropout, u, sidx, order) -> None:
    ctx.has_dropout, ctx.has_bias = has_dropout, bias is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, A, B, table, u, sidx, order, seed)


def _grads(ctx, dy, lora_grads) -> tuple:
    """(dx, dW, db, dA, dB); ``lora_grads`` has ``sgmv_bwd``'s signature."""
    if dy is None:
        return (None,) * 5
    x, weight, A, B, table, u, sidx, order, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx, dA, dB = lora_grads(dy, x, weight, A, B, table, u, sidx, order, seed, ctx.has_dropout,
                            need_x, need_A, need_B)  # fmt: skip
    # the base is frozen; if a user unfroze it, its gradients are still exact
    dW = torch.mm(dy.t(), x).to(weight.dtype) if need_w else None
    db = dy.sum(0).to(weight.dtype) if (need_b and ctx.has_bias) else None
    return (dx if need_x else None, dW, db, dA if need_A else None, dB if need_B else None)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, A, B, table, row_index, seed, has_dropout = inputs
    _, u, sidx, order = output
    ctx.mark_non_differentiable(u, sidx, order)
    _save(ctx, x, weight, bias, A, B, table, seed, has_dropout, u, sidx, order)


sgmv_fwd.register_autograd(
    lambda ctx, dy, *_: (*_grads(ctx, dy, sgmv_bwd), None, None, None, None),
    setup_context=_setup_context,
)


def _eager_grads(*args):
    with _lock:
        return _kernels.sgmv_backward(*args)


class _SGMVFunction(torch.autograd.Function):
    """Eager path: the launchers straight from autograd (no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, table, row_index, has_dropout):
        seed = triton_backend._seed(x, 1.0 if has_dropout else 0.0)
        with _lock:
            y, u, sidx, order = _kernels.sgmv_forward(x, weight, bias, A, B, table, row_index,
                                                      seed, has_dropout)  # fmt: skip
        _save(ctx, x, weight, bias, A, B, table, seed, has_dropout, u, sidx, order)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_grads(ctx, dy, _eager_grads), None, None, None)


def apply(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: tuple,
    lora_Bs: tuple,
    scalings: tuple,
    dropout_ps: tuple,
    row_index: Tensor,
) -> Tensor:
    """y[m] = x[m] W^T + b + s_i (D_i(x[m]) A_i^T) B_i^T with i = row_index[m] (-1: the base
    alone).  x2d: [M, K], weight: [N, K] (dense, x's dtype), bias: [N] | None, lora_As[i]:
    [r_i, K], lora_Bs[i]: [N, r_i], scalings/dropout_ps: one float per adapter (p 0 in
    eval), row_index: integer [M] in [-1, n).  Returns y [M, N] in x's dtype; each adapter's
    gradients come from its own rows only, in its own dtype; dropout is each adapter's own
    (Philox keyed by a per-call seed + the adapter's index)."""
    _check(x2d, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_index)
    if row_index.dtype != torch.int64:
        row_index = row_index.long()
    A, B = _kernels.stack_adapters(tuple(lora_As), tuple(lora_Bs))
    has_dropout = any(p > 0.0 for p in dropout_ps)
    table = _table(tuple(scalings), tuple(dropout_ps), x2d.device)
    if torch.compiler.is_dynamo_compiling():
        seed = triton_backend._seed(x2d, 1.0 if has_dropout else 0.0)
        return sgmv_fwd(x2d, weight, bias, A, B, table, row_index, seed, has_dropout)[0]
    return _SGMVFunction.apply(x2d, weight, bias, A, B, table, row_index, has_dropout)
