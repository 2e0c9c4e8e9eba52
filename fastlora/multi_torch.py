"""The torch backend of mixed-adapter batches (DESIGN.md section 7).

    y[m] = x[m] W^T + b + s_i (D_i(x[m]) A_i^T) B_i^T        i = idx[m] (-1: base alone)

Samples (dim 0 of the input) are contiguous runs of rows, each with one adapter, so the
low-rank work is batched over samples: every sample gathers its adapter's factors, padded to
the largest rank R (a GEMM with a one-hot [S, E]), and one ``bmm`` does the shrink
``[S, T, K] x [S, K, R]``, one the expand ``[S, T, R] x [S, R, N]``; backward sums each
adapter's per-sample gradients with the transposed one-hot. A per-sample, per-rank factor
``[S, R]`` carries ``s_i`` (with ``1/(1-p_i)`` in training) and is 0 on padded rank slots and
base samples: they add nothing and get no gradient. The base is one GEMM over all rows. No
Python loop over adapters: ``pad_factors`` stacks them in a few calls.

Saved for backward: x, u [S, T, R] and the packed dropout bits; never D(x).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastlora import bases
from fastlora.dropout import keep_in_scratch, pack_mask


def draw_row_mask(row_low: Tensor, cols: int) -> Tensor:
    """Keep masks for rows with their own drop rates, packed [M, ceil(cols/8)] uint8.

    row_low: [M] int32, the 16-bit threshold of each row (a lane is kept when >= it; see
    ``fastlora.dropout``): a row's rate is its adapter's. Randomness from torch's generator."""
    padded = -(-cols // 8) * 8
    if row_low.device.type == "cpu":
        seed = torch.randint(0, 2**62, (1,))
        draw = _cpu_row_mask_op if torch.compiler.is_compiling() else _cpu_row_mask
        return draw(seed, row_low, padded)
    rows = row_low.shape[0]
    words = torch.randint(-(2**63), 2**63 - 1, (rows, padded // 4), device=row_low.device,
                          dtype=torch.int64)
    return pack_mask(words.view(torch.int16) >= row_low.unsqueeze(1))


def _cpu_row_mask(seed: Tensor, row_low: Tensor, cols: int) -> Tensor:
    rows = row_low.shape[0]
    words = np.random.PCG64(int(seed.numpy()[0])).random_raw(rows * cols // 4)
    keep = words.view(np.int16).reshape(rows, cols) >= row_low.numpy()[:, None]
    return torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little"))


_cpu_row_mask_op = torch.library.custom_op("fastlora::cpu_row_mask", _cpu_row_mask, mutates_args=())


@_cpu_row_mask_op.register_fake
def _(seed, row_low, cols):
    return seed.new_empty(row_low.shape[0], cols // 8, dtype=torch.uint8)


def _keep(bits: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    """Packed bits [M, ceil(K/8)] -> 0/1 [M, K] in ``dtype``, in the reused scratch buffer
    (``x * mask`` is then formed in it in place)."""
    return keep_in_scratch(bits, cols, dtype)


def pad_factors(As: tuple, Bs: tuple, ranks: tuple, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The adapters' factors zero-padded to the largest rank R, in ``dtype``: A_pad [E, R, K]
    and B_pad [E, R, N] (B transposed); a few calls whatever E (no Python loop)."""
    Bt = torch.cat(Bs, dim=1).t()  # [sum r_i, N]
    if min(ranks) == max(ranks):  # no padding: no zero fill either
        A_pad = torch.stack(As)
        B_pad = Bt.contiguous().view(len(ranks), ranks[0], Bt.shape[1])
    else:
        pad = torch.nn.utils.rnn.pad_sequence
        A_pad = pad(As, batch_first=True)
        B_pad = pad(Bt.split(ranks), batch_first=True)
    return A_pad.to(dtype), B_pad.to(dtype)


def _forward(x3, weight, bias, A_pad, B_pad, onehot, factor, mask_bits) -> tuple[Tensor, Tensor]:
    """y3 [S, T, N] and u [S, T, R] (see the module docstring)."""
    S, T, K = x3.shape
    E, R, N = B_pad.shape
    # each sample's factors, gathered by a GEMM with the one-hot [S, E] (contiguous,
    # threaded; an index_select/index_add pair costs far more on the CPU)
    A_s = torch.mm(onehot, A_pad.view(E, R * K)).view(S, R, K)
    B_s = torch.mm(onehot, B_pad.view(E, R * N)).view(S, R, N)
    xk = x3 if mask_bits is None else _keep(mask_bits, K, x3.dtype).view(S, T, K).mul_(x3)
    u = torch.bmm(xk, A_s.transpose(1, 2)).mul_(factor.unsqueeze(1))  # [S, T, R]
    y3 = torch.bmm(u, B_s) if bias is None else torch.baddbmm(bias, u, B_s)
    y3.view(S * T, N).addmm_(x3.reshape(S * T, K), bases.dense_weight(weight, x3.dtype).t())
    return y3, u


def _backward(ctx, dy3, x3, weight, A_pad, B_pad, onehot, factor, mask_bits, u, need_A, need_B):
    """(dx3, dW, db, dA [E R, K], dB [E R, N]); None where not needed."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    S, T, K = x3.shape
    E, R, N = B_pad.shape
    dy3 = dy3.contiguous()
    dy2d = dy3.view(S * T, N)
    dx3 = dW = db = dA = dB = None
    if need_x or need_A:
        B_s = torch.mm(onehot, B_pad.view(E, R * N)).view(S, R, N)
        g = torch.bmm(dy3, B_s.transpose(1, 2)).mul_(factor.unsqueeze(1))  # [S, T, R]
        keep = None if mask_bits is None else _keep(mask_bits, K, x3.dtype).view(S, T, K)
        if need_x:
            A_s = torch.mm(onehot, A_pad.view(E, R * K)).view(S, R, K)
            dx3 = torch.bmm(g, A_s)
            if keep is not None:
                dx3.mul_(keep)
            dx3.view(S * T, K).addmm_(dy2d, bases.dense_weight(weight, dy3.dtype))
        if need_A:
            xk = x3 if keep is None else keep.mul_(x3)  # the mask's last use
            dA_s = torch.bmm(g.transpose(1, 2), xk).view(S, R * K)
            dA = torch.mm(onehot.t(), dA_s).view(E * R, K)  # padded rows are 0
    if need_B:
        dB_s = torch.bmm(u.transpose(1, 2), dy3).view(S, R * N)
        dB = torch.mm(onehot.t(), dB_s).view(E * R, N)
    if need_w:
        dW = torch.mm(dy2d.t(), x3.reshape(S * T, K)).to(weight.dtype)
    if need_b and ctx.has_bias:
        db = dy2d.sum(0).to(weight.dtype)
    return dx3, dW, db, dA, dB


class _MixedLoRA(torch.autograd.Function):
    """Eager: inputs x3, weight, bias, onehot, factor, valid, mask_bits, ranks, *As, *Bs.
    The padding is done here, outside autograd: a padded copy's own backward (CopySlices)
    copies the whole gradient once per adapter, which costs more than the layer."""

    @staticmethod
    def forward(ctx, x3, weight, bias, onehot, factor, valid, mask_bits, ranks, *factors):
        E = len(ranks)
        A_pad, B_pad = pad_factors(factors[:E], factors[E:], ranks, x3.dtype)
        y3, u = _forward(x3, weight, bias, A_pad, B_pad, onehot, factor, mask_bits)
        ctx.save_for_backward(x3, weight, A_pad, B_pad, onehot, factor, valid, mask_bits, u)
        ctx.ranks, ctx.has_bias = ranks, bias is not None
        ctx.dtypes = (factors[0].dtype, factors[E].dtype)
        ctx.set_materialize_grads(False)
        return y3

    @staticmethod
    def backward(ctx, dy3):
        ranks = ctx.ranks
        E = len(ranks)
        if dy3 is None:
            return (None,) * (8 + 2 * E)
        x3, weight, A_pad, B_pad, onehot, factor, valid, mask_bits, u = ctx.saved_tensors
        need_A, need_B = any(ctx.needs_input_grad[8:8 + E]), any(ctx.needs_input_grad[8 + E:])
        dx3, dW, db, dA, dB = _backward(ctx, dy3, x3, weight, A_pad, B_pad, onehot, factor,
                                        mask_bits, u, need_A, need_B)
        if valid is not None:  # drop the padded rank slots (none when the ranks are equal)
            dA = None if dA is None else dA[valid]
            dB = None if dB is None else dB[valid]
        dAs = (None,) * E if dA is None else dA.to(ctx.dtypes[0]).split(ranks)
        dBs = (None,) * E if dB is None else dB.to(ctx.dtypes[1]).t().split(ranks, dim=1)
        return (dx3, dW, db, None, None, None, None, None, *dAs, *dBs)


class _MixedLoRAPadded(torch.autograd.Function):
    """Under torch.compile (which traces fixed argument lists): the factors arrive padded
    by the differentiable ``pad_factors``; the compiler fuses its backward."""

    @staticmethod
    def forward(ctx, x3, weight, bias, A_pad, B_pad, onehot, factor, mask_bits):
        y3, u = _forward(x3, weight, bias, A_pad, B_pad, onehot, factor, mask_bits)
        ctx.save_for_backward(x3, weight, A_pad, B_pad, onehot, factor, mask_bits, u)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y3

    @staticmethod
    def backward(ctx, dy3):
        if dy3 is None:
            return (None,) * 8
        x3, weight, A_pad, B_pad, onehot, factor, mask_bits, u = ctx.saved_tensors
        need_A, need_B = ctx.needs_input_grad[3:5]
        dx3, dW, db, dA, dB = _backward(ctx, dy3, x3, weight, A_pad, B_pad, onehot, factor,
                                        mask_bits, u, need_A, need_B)
        dA = None if dA is None else dA.view(A_pad.shape)
        dB = None if dB is None else dB.view(B_pad.shape)
        return dx3, dW, db, dA, dB, None, None, None


def apply(x3: Tensor, weight: Tensor, bias: Tensor | None, As: tuple, Bs: tuple, ranks: tuple,
          onehot: Tensor, factor: Tensor, valid: Tensor, row_low: Tensor | None) -> Tensor:
    """x3: [S, T, K], weight: [N, K] (any ``fastlora.bases`` kind), bias: [N] | None,
    As[i]: [r_i, K], Bs[i]: [N, r_i] (``ranks`` the r_i), onehot: [S, E] in x's dtype (row s
    is sample s's adapter; zeros for a base sample), factor: [S, R] in x's dtype (the scale,
    0 on padded slots and base samples), valid: [E * R] bool (rank slot used; None when
    every r_i is R), row_low:
    [S*T] int32 dropout thresholds or None (no dropout). Returns y3: [S, T, N]."""
    mask_bits = None if row_low is None else draw_row_mask(row_low, x3.shape[2])
    if torch.compiler.is_compiling():
        A_pad, B_pad = pad_factors(As, Bs, ranks, x3.dtype)
        return _MixedLoRAPadded.apply(x3, weight, bias, A_pad, B_pad, onehot, factor, mask_bits)
    return _MixedLoRA.apply(x3, weight, bias, onehot, factor, valid, mask_bits, ranks, *As, *Bs)
