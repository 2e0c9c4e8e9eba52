"""The torch backend of mixed-adapter batches (DESIGN.md section 7).

    y[m] = x[m] W^T + b + s_i (D_i(x[m]) A_i^T) B_i^T        i = idx[m] (-1: base alone)

Samples (dim 0 of the input) are contiguous runs of rows, each with one adapter, so the
low-rank work is batched over samples: every sample gathers its adapter's factors, padded to
the largest rank R, and one ``bmm`` does the shrink ``[S, T, K] x [S, K, R]``, one the expand
``[S, T, R] x [S, R, N]``. A per-sample, per-rank factor ``[S, R]`` carries ``s_i`` (with
``1/(1-p_i)`` in training) and is 0 on padded rank slots and base samples: they add nothing and
get no gradient. The base is one GEMM over all rows. No Python loop over adapters: the
adapters' factors arrive concatenated (``A_cat`` [sum r_i, K], ``B_cat`` [N, sum r_i]) and
``rank_index`` [S, R] says which of their rows each sample uses.

Saved for backward: x, u [S, T, R] and the packed dropout bits; never D(x).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastlora import bases
from fastlora.dropout import _byte_table, pack_mask


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
    """Packed bits [M, ceil(K/8)] -> 0/1 [M, K] in ``dtype``."""
    rows = bits.shape[0]
    lanes = torch.nn.functional.embedding(bits.long(), _byte_table(dtype, bits.device))
    return lanes.view(rows, -1)[:, :cols]


class _MixedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, weight, bias, A_cat, B_cat, rank_index, factor, mask_bits):
        S, T, K = x3.shape
        R = rank_index.shape[1]
        flat = rank_index.reshape(-1)
        A_s = A_cat.index_select(0, flat).view(S, R, K)            # [S, R, K]
        B_s = B_cat.t().index_select(0, flat).view(S, R, -1)       # [S, R, N]
        xk = x3 if mask_bits is None else x3 * _keep(mask_bits, K, x3.dtype).view(S, T, K)
        u = torch.bmm(xk, A_s.transpose(1, 2)).mul_(factor.unsqueeze(1))  # [S, T, R]
        y3 = torch.bmm(u, B_s) if bias is None else torch.baddbmm(bias, u, B_s)
        y3.view(S * T, -1).addmm_(x3.reshape(S * T, K), bases.dense_weight(weight, x3.dtype).t())
        ctx.save_for_backward(x3, weight, A_cat, B_cat, rank_index, factor, mask_bits, u)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y3

    @staticmethod
    def backward(ctx, dy3):
        if dy3 is None:
            return (None,) * 8
        x3, weight, A_cat, B_cat, rank_index, factor, mask_bits, u = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        S, T, K = x3.shape
        R = rank_index.shape[1]
        flat = rank_index.reshape(-1)
        dy3 = dy3.contiguous()
        dy2d = dy3.view(S * T, -1)
        dx3 = dW = db = dA = dB = None
        if need_x or need_A:
            B_s = B_cat.t().index_select(0, flat).view(S, R, -1)
            g = torch.bmm(dy3, B_s.transpose(1, 2)).mul_(factor.unsqueeze(1))  # [S, T, R]
            keep = None if mask_bits is None else _keep(mask_bits, K, x3.dtype).view(S, T, K)
            if need_x:
                A_s = A_cat.index_select(0, flat).view(S, R, K)
                dx3 = torch.bmm(g, A_s)
                if keep is not None:
                    dx3.mul_(keep)
                dx3.view(S * T, K).addmm_(dy2d, bases.dense_weight(weight, dy3.dtype))
            if need_A:
                xk = x3 if keep is None else x3 * keep
                dA_s = torch.bmm(g.transpose(1, 2), xk).view(S * R, K)
                dA = torch.zeros_like(A_cat).index_add_(0, flat, dA_s.to(A_cat.dtype))
        if need_B:
            dB_s = torch.bmm(u.transpose(1, 2), dy3).view(S * R, -1)  # [S*R, N]
            dB = torch.zeros_like(B_cat).t().index_add_(0, flat, dB_s.to(B_cat.dtype)).t()
        if need_w:
            dW = torch.mm(dy2d.t(), x3.reshape(S * T, K)).to(weight.dtype)
        if need_b and ctx.has_bias:
            db = dy2d.sum(0).to(weight.dtype)
        return dx3, dW, db, dA, dB, None, None, None


def apply(x3: Tensor, weight: Tensor, bias: Tensor | None, A_cat: Tensor, B_cat: Tensor,
          rank_index: Tensor, factor: Tensor, row_low: Tensor | None) -> Tensor:
    """x3: [S, T, K], weight: [N, K] (any ``fastlora.bases`` kind), bias: [N] | None,
    A_cat: [sum r_i, K], B_cat: [N, sum r_i] (in x's dtype), rank_index: [S, R] int64 rows
    of A_cat / columns of B_cat each sample uses, factor: [S, R] in x's dtype (scale, 0 on
    padding and base samples), row_low: [S*T] int32 dropout thresholds or None (no dropout).
    Returns y3: [S, T, N]."""
    mask_bits = None if row_low is None else draw_row_mask(row_low, x3.shape[2])
    return _MixedLoRA.apply(x3, weight, bias, A_cat, B_cat, rank_index, factor, mask_bits)
