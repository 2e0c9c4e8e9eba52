"""The torch backend of DoRA (``fastlora.dora`` states the math): the LoRA composition plus
column scales, with ``c = m / norm`` (and the dropout scale ``ks = 1/(1-p)``) folded onto
[N], [N, r] and [N, K] factors rather than a pass over an [M, N] or [M, K] tensor wherever the
algebra allows, and every big fresh output first written by a GEMM.

Forward: ``S = (x * mask) W^T`` (``x W^T`` at p = 0) is the saved [M, N] tensor; at p = 0
``y = c * S + b + u (c B)^T``, with dropout ``y = x W^T + (c - 1) ks S + u (c B)^T + b`` (a
second GEMM). Backward: ``dm = (ks colsum(dy * S) + B . (u^T dy)) / norm`` (``u^T dy`` is
dB's product too); ``dx = dy (c W) + g A``, with dropout ``dy W + ks mask * (dy ((c - 1) W) +
g A)`` (two GEMMs over W), the unpacked mask reused in place for ``x * mask`` of ``dA``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import _autograd, bases
from fastlora._scratch import scratch
from fastlora.dropout import draw_packed_mask, keep_scale, unpack_mask
from fastlora.dropout import keep_in_scratch as _keep


def _scaled_rows(weight: Tensor, col: Tensor) -> Tensor:
    """``col * W`` [N, K] (col [N]) in the workspace."""
    out = scratch("weight", weight.numel(), weight.dtype, weight.device).view(weight.shape)
    return torch.mul(weight, col.unsqueeze(1), out=out)


# rows of dy * S accumulated at a time by _column_dot: a [256, N] fp32 block (1 MiB at
# N = 1024) stays in cache, and the column sum runs once over it, not once per block
_DOT_ROWS = 256


def _column_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``sum_m a[m, n] * b[m, n]`` for a, b [M, N] -> [N] in ``acc``: on the CPU, row blocks
    multiplied and summed into one [rows, N] block in ``acc`` (workspace; every product in
    ``acc``), then one column sum; on a GPU (where each block would be a launch) one call."""
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b, dim=0).to(acc)
    M, N = a.shape
    if M == 0:
        return a.new_zeros(N, dtype=acc)
    rows = min(M, _DOT_ROWS)
    block = scratch("dot", rows * N, acc, a.device).view(rows, N)
    torch.mul(a[:rows].to(acc), b[:rows], out=block)
    for i in range(rows, M, rows):
        n = min(rows, M - i)
        block[:n].addcmul_(a[i : i + n], b[i : i + n])
    return block.sum(0)


def _minus_one(c_acc: Tensor, dtype: torch.dtype, factor: float = 1.0) -> Tensor:
    """``factor * (c - 1)`` formed before the cast: in bf16 the spacing near 1 is 2**-7, which
    would be a large relative error on a small ``c - 1``."""
    return ((c_acc - 1) * factor).to(dtype)


def _dx_part(dy: Tensor, col: Tensor, weight: Tensor, g: Tensor, A: Tensor, alpha: float,
             Bs: Tensor) -> Tensor:
    """``dy (col * W) + alpha * g A`` [M, K] (dy [M, N], col [N], weight [N, K], g = dy Bs
    [M, r], A [r, K]) in a fresh tensor written by the GEMM itself. With W the smaller
    operand, the low-rank term goes into the weight's rows (``col * W + alpha Bs A``, [N, K])
    so no [M, K] pass adds it; otherwise ``col`` scales dy's columns."""
    if weight.shape[0] * weight.shape[1] <= dy.shape[0] * dy.shape[1]:
        return torch.mm(dy, _scaled_rows(weight, col).addmm_(Bs, A, alpha=alpha))
    return torch.mm(dy * col, weight).addmm_(g, A, alpha=alpha)


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    dropout_p: float,
    mask_bits: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r],
    magnitude, norm: [N], mask_bits: [M, ceil(K/8)] uint8 | None.
    Returns y [M, N], u = s D(x) A^T [M, r] and S = (x * mask) W^T [M, N] (``x W^T`` at p = 0;
    the mask unscaled), all x.dtype."""
    weight = bases.dense_weight(weight, x.dtype)  # a 4-bit base: transient, decoded again in bwd
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    c_acc = magnitude.detach().to(norm.dtype) / norm
    Bc = B * c_acc.to(x.dtype).unsqueeze(1)  # c on B's rows: c * (u B^T) = u (c B)^T
    if mask_bits is None:
        u = torch.mm(x, A.t()).mul_(scaling)
        S = torch.mm(x, weight.t())  # the GEMM writes the fresh output (its page faults hide)
        # the skinny GEMM writes y fresh, then one pass adds c * S into it
        y = torch.mm(u, Bc.t()) if bias is None else torch.addmm(bias, u, Bc.t())
        return y.addcmul_(S, c_acc.to(x.dtype)), u, S
    ks = keep_scale(dropout_p)
    xm = _keep(mask_bits, x.shape[1], x.dtype).mul_(x)  # D(x) = ks * xm; ks goes on the
    # [N] and [M, r] factors, never on an [M, K] pass
    u = torch.mm(xm, A.t()).mul_(scaling * ks)
    S = torch.mm(xm, weight.t())
    del xm
    # y = x W^T + b + (c - 1) ks S + u (c B)^T
    y = torch.mm(x, weight.t()).addcmul_(S, _minus_one(c_acc, x.dtype, ks)).addmm_(u, Bc.t())
    return (y if bias is None else y.add_(bias)), u, S


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    u: Tensor,
    S: Tensor | None,
    mask_bits: Tensor | None,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [r, K], dB [N, r], dm [N]); one not asked for comes back empty.
    ``S`` as ``forward`` returns it (needed for dm only)."""
    if need_dx:
        weight = bases.dense_weight(weight, x.dtype)
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    acc = norm.dtype
    c_acc = magnitude.detach().to(acc) / norm
    c = c_acc.to(x.dtype)
    ks = 1.0 if mask_bits is None else keep_scale(dropout_p)
    dx, dA, dB, dm = x.new_empty(0), x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dB or need_dm:
        t = torch.mm(u.t(), dy)  # [r, N]; the reduction over M is faster with dy untransposed
        if need_dm:
            # z = ks S + u B^T: colsum(dy * u B^T)_n = B_n . (u^T dy)_n, no [M, N] pass
            low = torch.linalg.vecdot(B.to(acc), t.t().to(acc))
            dm = ((ks * _column_dot(dy, S, acc) + low) / norm).to(magnitude.dtype)
        if need_dB:
            dB = t.mul_(c).t().to(lora_B.dtype).contiguous()
    if not (need_dx or need_dA):
        return dx, dA, dB, dm
    Bs = B * (c_acc * scaling).to(x.dtype).unsqueeze(1)  # s c B: g = dy Bs
    g = torch.mm(dy, Bs)  # [M, r]
    if mask_bits is None:
        if need_dx:
            dx = _dx_part(dy, c, weight, g, A, 1.0, Bs)
        if need_dA:
            dA = torch.mm(g.t(), x).to(lora_A.dtype)
        return dx, dA, dB, dm
    # dx = dy W + ks * mask * (dy ((c - 1) W) + g A);  dA = ks * g^T (x * mask)
    if need_dx:
        dx = _dx_part(dy, _minus_one(c_acc, x.dtype, ks), weight, g, A, ks, Bs)
    keep = _keep(mask_bits, x.shape[1], x.dtype)
    if need_dx:
        dx.mul_(keep).addmm_(dy, weight)
    if need_dA:  # ks on the [r, K] result, in fp32, not on an [M, K] pass
        dA = (torch.mm(g.t(), keep.mul_(x)).to(acc) * ks).to(lora_A.dtype)
    return dx, dA, dB, dm


def base_grads(dy, x, weight, magnitude, norm, mask_bits, dropout_p, need_w, need_b, has_bias):
    """Gradients of a base a user unfroze: dW = dy^T x + (dy (c - 1))^T D(x) (c * dy^T x at
    p = 0), db = colsum(dy). The norm stays a constant, as in PEFT."""
    c_acc = magnitude.detach().to(norm.dtype) / norm
    c = c_acc.to(dy.dtype)
    dW = db = None
    if need_w:
        if mask_bits is None:
            dW = torch.mm((dy * c).t(), x)
        else:
            xd = x * unpack_mask(mask_bits, x.shape[1], x.dtype) * keep_scale(dropout_p)
            dW = torch.mm(dy.t(), x).addmm_((dy * _minus_one(c_acc, dy.dtype)).t(), xd)
        dW = dW.to(weight.dtype)
    if need_b and has_bias:
        db = dy.sum(0).to(weight.dtype)
    return dW, db


def _grads(ctx, dy, bwd) -> tuple:
    """Gradients for (x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, bits)."""
    x, weight, lora_A, lora_B, magnitude, norm, u, S, bits = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    dx, dA, dB, dm = bwd(dy, x, weight, lora_A, lora_B, magnitude, norm, u, S, bits,
                         ctx.scaling, ctx.dropout_p, need_x, need_A, need_B, need_m)
    dW, db = base_grads(dy, x, weight, magnitude, norm, bits, ctx.dropout_p, need_w, need_b,
                        ctx.has_bias)
    return (dx if need_x else None, dW, db, dA if need_A else None, dB if need_B else None,
            dm if need_m else None, None, None, None, None)


def _save(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits, u, S):
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, u, S, bits)


# Registered ops: what torch.compile, export and opcheck see.
dora_fwd = torch.library.custom_op("fastlora::dora_fwd", forward, mutates_args=())
dora_bwd = torch.library.custom_op("fastlora::dora_bwd", backward, mutates_args=())


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, mask_bits):
    M, N = x.shape[0], lora_B.shape[0]
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0]), x.new_empty(M, N)


@dora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, norm, u, S, mask_bits, scaling, dropout_p,
      need_dx, need_dA, need_dB, need_dm):
    dx, dA, dB = _autograd.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)
    dm = magnitude.new_empty(magnitude.shape) if need_dm else x.new_empty(0)
    return dx, dA, dB, dm


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1], output[2])
    _save(ctx, *inputs, output[1], output[2])


dora_fwd.register_autograd(lambda ctx, dy, _du, _dS: _grads(ctx, dy, dora_bwd),
                           setup_context=_setup_context)


class _DoRAFunction(torch.autograd.Function):
    """Eager path: the same two functions without custom-op dispatch; ``S`` is kept only
    when ``m`` needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits):
        y, u, S = forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
                          bits)
        keep_S = S if ctx.needs_input_grad[5] else None
        _save(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits,
              u, keep_S)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, backward)


def apply_dora(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """x: [M, K] -> y: [M, N] on the torch backend; ``norm`` [N] from ``weight_norm``."""
    bits = draw_packed_mask(x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
    if torch.compiler.is_compiling():
        return dora_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
                        bits)[0]
    return _DoRAFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling,
                               dropout_p, bits)
