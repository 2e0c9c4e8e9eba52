"""The torch backend of DoRA (``fastlora.dora`` states the math): the LoRA composition plus
column scales, with ``c = m / norm`` folded onto the smaller operand (``B``'s and ``W``'s rows)
rather than a pass over an [M, N] tensor wherever the algebra allows.

Forward: ``u`` (skinny), ``z = u B^T + x W^T`` (the base GEMM accumulates in place), then
``y = c * z + b`` in one pass; with dropout a second GEMM adds ``(x - D(x)) W^T``. Backward:
``dm`` is one column reduction of ``dy * z``; ``dx = dy (c W) + g A`` (two GEMMs over W with
dropout), ``dA``, ``dB`` as LoRA's with ``c`` on ``B``'s rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import _autograd, bases
from fastlora.dropout import draw_packed_mask, keep_scale, unpack_mask




# elements of dy * z formed at a time by _column_dot: ~1 MiB of fp32, so the product stays in
# cache (one [M, N] temporary costs a fresh allocation, page faults included, and a re-read)
_DOT_CHUNK = 1 << 18


def _column_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``sum_m a[m, n] * b[m, n]`` for a, b [M, N] -> [N] in ``acc``: on the CPU a block of
    rows at a time; on a GPU (where each block would be a launch) one call."""
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b, dim=0).to(acc)
    M, N = a.shape
    rows = max(1, _DOT_CHUNK // max(N, 1))
    out = torch.zeros(N, dtype=acc, device=a.device)
    for i in range(0, M, rows):
        out += torch.linalg.vecdot(a[i : i + rows], b[i : i + rows], dim=0)
    return out


def _minus_one(c_acc: Tensor, dtype: torch.dtype) -> Tensor:
    """``c - 1`` formed before the cast: in bf16 the spacing near 1 is 2**-7, which would be a
    large relative error on a small ``c - 1``."""
    return (c_acc - 1).to(dtype)


def _addmm_scaled_(out: Tensor, left: Tensor, col: Tensor, right: Tensor, alpha: float = 1.0):
    """``out += alpha * (left * col) @ right`` in place for left [M, N], col [N], right [N, K]:
    the scale goes on whichever operand is smaller (right's rows, or left's columns)."""
    if right.shape[0] * right.shape[1] <= left.shape[0] * left.shape[1]:
        return out.addmm_(left, right * col.unsqueeze(1), alpha=alpha)
    return out.addmm_(left * col, right, alpha=alpha)


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
    Returns y [M, N], u [M, r] and the pre-scale output z [M, N] (x.dtype)."""
    weight = bases.dense_weight(weight, x.dtype)  # a 4-bit base: transient, decoded again in bwd
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    c_acc = magnitude.detach().to(norm.dtype) / norm
    c = c_acc.to(x.dtype)
    if mask_bits is None:
        u = torch.mm(x, A.t()).mul_(scaling)
        z = torch.mm(u, B.t()).addmm_(x, weight.t())
        y = z * c if bias is None else torch.addcmul(bias, z, c)
        return y, u, z
    ks = keep_scale(dropout_p)
    xk = x * unpack_mask(mask_bits, x.shape[1], x.dtype)  # D(x) = ks * xk
    u = torch.mm(xk, A.t()).mul_(scaling * ks)
    z = torch.mm(u, B.t()).addmm_(xk, weight.t(), alpha=ks)
    # y = x W^T + b + (c - 1) z + u B^T: (c-1)(D(x) W^T) + c (u B^T) regrouped around z, so
    # the second GEMM reads x itself and no (x - D(x)) is formed
    y = torch.mm(u, B.t()) if bias is None else torch.addmm(bias, u, B.t())
    return y.addmm_(x, weight.t()).addcmul_(z, _minus_one(c_acc, x.dtype)), u, z


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    u: Tensor,
    z: Tensor | None,
    mask_bits: Tensor | None,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [r, K], dB [N, r], dm [N]); one not asked for comes back empty."""
    if need_dx:
        weight = bases.dense_weight(weight, x.dtype)
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    c_acc = magnitude.detach().to(norm.dtype) / norm
    c = c_acc.to(x.dtype)
    dx, dA, dB, dm = x.new_empty(0), x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dm:
        dm = (_column_dot(dy, z, norm.dtype) / norm).to(magnitude.dtype)
    if need_dx or need_dA:
        ks = 1.0 if mask_bits is None else keep_scale(dropout_p)
        g = torch.mm(dy, B * c.unsqueeze(1)).mul_(scaling * ks)
        keep = None if mask_bits is None else unpack_mask(mask_bits, x.shape[1], x.dtype)
        if need_dx:
            # low-rank term first, then the big GEMMs accumulate onto it (beta = 1)
            dx = torch.mm(g, A)
            if keep is None:
                _addmm_scaled_(dx, dy, c, weight)
            else:
                _addmm_scaled_(dx, dy, _minus_one(c_acc, x.dtype), weight, alpha=ks)
                dx.mul_(keep).addmm_(dy, weight)
        if need_dA:
            dA = torch.mm(g.t(), x if keep is None else x * keep).to(lora_A.dtype)
    if need_dB:
        # (u^T dy)^T as LoRA's (the reduction over M is faster with dy untransposed), c in place
        dB = torch.mm(u.t(), dy).mul_(c).t().to(lora_B.dtype).contiguous()
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
    x, weight, lora_A, lora_B, magnitude, norm, u, z, bits = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    dx, dA, dB, dm = bwd(dy, x, weight, lora_A, lora_B, magnitude, norm, u, z, bits,
                         ctx.scaling, ctx.dropout_p, need_x, need_A, need_B, need_m)
    dW, db = base_grads(dy, x, weight, magnitude, norm, bits, ctx.dropout_p, need_w, need_b,
                        ctx.has_bias)
    return (dx if need_x else None, dW, db, dA if need_A else None, dB if need_B else None,
            dm if need_m else None, None, None, None, None)


def _save(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits, u, z):
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, u, z, bits)


# Registered ops: what torch.compile, export and opcheck see.
dora_fwd = torch.library.custom_op("fastlora::dora_fwd", forward, mutates_args=())
dora_bwd = torch.library.custom_op("fastlora::dora_bwd", backward, mutates_args=())


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, mask_bits):
    M, N = x.shape[0], lora_B.shape[0]
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0]), x.new_empty(M, N)


@dora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, norm, u, z, mask_bits, scaling, dropout_p,
      need_dx, need_dA, need_dB, need_dm):
    dx, dA, dB = _autograd.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)
    dm = magnitude.new_empty(magnitude.shape) if need_dm else x.new_empty(0)
    return dx, dA, dB, dm


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1], output[2])
    _save(ctx, *inputs, output[1], output[2])


dora_fwd.register_autograd(lambda ctx, dy, _du, _dz: _grads(ctx, dy, dora_bwd),
                           setup_context=_setup_context)


class _DoRAFunction(torch.autograd.Function):
    """Eager path: the same two functions without custom-op dispatch; ``z`` is kept only
    when ``m`` needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits):
        y, u, z = forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
                          bits)
        keep_z = z if ctx.needs_input_grad[5] else None
        _save(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, bits,
              u, keep_z)
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
