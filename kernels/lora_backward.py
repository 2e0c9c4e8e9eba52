"""LoRA backward in three launches plus two tiny ``torch.sum`` over split partials.

    dx   dx = dy W + (g A) * m/(1-p),  g = s dy B   [M, K]  g accumulated in the same
                                                            loop over N as dy W (same dy
                                                            tiles); low-rank term added
                                                            in the epilogue; one store.
                                                            Also writes g [M, r].
    da   dA = g^T D(x)                              [r, K]  split-M partial sums
    db   dB = dy^T u                                [N, r]  split-M partial sums

The mask m is regenerated from the forward's seed (``dropout_keep``); D(x) is never
stored.  No atomics: partials go to an fp32 workspace [splits, ...] reduced with
``torch.sum``; splits depend on M only and every reduction kernel walks M in the fixed
``REDUCE_BLOCK_M``, so dA and dB are bitwise reproducible whatever autotune picked.  dx
is bitwise reproducible for a given tuned config (its N-loop step is the config's BLOCK_N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._launch import dot_precision, tuned
from .lora_forward import dropout_keep


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, b_ptr, a_ptr, seed_ptr, dx_ptr, g_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
    stride_ar, stride_ak, stride_dxm, stride_dxk, stride_gm, stride_gr,
    scaling, dropout_p,
    M_BUCKET,
    COMPUTE_DX: tl.constexpr, WRITE_G: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx tile [BLOCK_M, BLOCK_K]; with COMPUTE_DX=False only g (grid over M alone)."""
    dtype = dy_ptr.dtype.element_ty
    s = tl.cast(scaling, tl.float32)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    if COMPUTE_DX:
        num_pid_k = tl.cdiv(K, BLOCK_K)
    else:
        num_pid_k = 1
    group = GROUP_M * num_pid_k
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group) % group_size).to(tl.int64)
    pid_k = ((pid % group) // group_size).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        # int64: offs_n * stride_wn passes 2**31 on vocabulary-sized W (N*K > 2**31)
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )  # fmt: skip
        if COMPUTE_DX:
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0,
            )  # fmt: skip
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        ).to(dtype)  # fmt: skip
        g_acc = tl.dot(dy, b, g_acc, input_precision=DOT_PRECISION)

    g = (g_acc * s).to(dtype)
    if WRITE_G:
        if pid_k == 0:  # every K tile computed the same g; the first one stores it
            tl.store(
                g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                g, mask=mask_m[:, None] & mask_r[None, :],
            )  # fmt: skip
    if COMPUTE_DX:
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :], other=0.0,
        ).to(dtype)  # fmt: skip
        low = tl.dot(g, a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            p = tl.cast(dropout_p, tl.float32)
            keep = dropout_keep(tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, p, BLOCK_K)
            low = tl.where(keep, low * (1.0 / (1.0 - p)), 0.0)
        acc += low
        tl.store(
            dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
            acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :],
        )  # fmt: skip


@triton.jit
def _lora_da_kernel(
    g_ptr, x_ptr, seed_ptr, ws_ptr,
    M, K, R, ROWS_PER_SPLIT,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_ws, stride_wr, stride_wk,
    dropout_p,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REDUCE_BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial dA[split] [r, BLOCK_K] = g[rows]^T D(x[rows]) over this split's rows."""
    dtype = x_ptr.dtype.element_ty
    pid_k = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
        inv_keep = 1.0 / (1.0 - p)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, REDUCE_BLOCK_M):
        offs_m = m0 + tl.arange(0, REDUCE_BLOCK_M)
        mask_m = offs_m < m_end
        g_t = tl.load(
            g_ptr + offs_r[:, None] * stride_gr + offs_m[None, :] * stride_gm,
            mask=mask_r[:, None] & mask_m[None, :], other=0.0,
        )  # fmt: skip
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_k * BLOCK_K, p, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
        acc = tl.dot(g_t, x, acc, input_precision=DOT_PRECISION)
    tl.store(
        ws_ptr + pid_s * stride_ws + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk,
        acc, mask=mask_r[:, None] & mask_k[None, :],
    )  # fmt: skip


@triton.jit
def _lora_db_kernel(
    dy_ptr, u_ptr, ws_ptr,
    M, N, R, ROWS_PER_SPLIT,
    stride_dym, stride_dyn, stride_um, stride_ur, stride_ws, stride_wn, stride_wr,
    M_BUCKET,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REDUCE_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Partial dB[split] [BLOCK_N, r] = dy[rows]^T u[rows] over this split's rows."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    mask_r = offs_r < R
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m0 in range(m_start, m_end, REDUCE_BLOCK_M):
        offs_m = m0 + tl.arange(0, REDUCE_BLOCK_M)
        mask_m = offs_m < m_end
        dy_t = tl.load(
            dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
            mask=mask_n[:, None] & mask_m[None, :], other=0.0,
        )  # fmt: skip
        u = tl.load(
            u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(dy_t, u, acc, input_precision=DOT_PRECISION)
    tl.store(
        ws_ptr + pid_s * stride_ws + offs_n[:, None] * stride_wn + offs_r[None, :] * stride_wr,
        acc, mask=mask_n[:, None] & mask_r[None, :],
    )  # fmt: skip


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dy: [M, N], x: [M, K], weight: [N, K], lora_A: [r, K], lora_B: [N, r], u: [M, r]
    (from ``lora_forward``), seed: the forward's int64 [1].  Returns dx [M, K] in x.dtype,
    dA [r, K] in lora_A.dtype, dB [N, r] in lora_B.dtype; None for what is not needed."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    dx = torch.empty((M, K), device=dev, dtype=x.dtype) if need_dx else None
    if M == 0:
        dA = torch.zeros_like(lora_A) if need_dA else None
        dB = torch.zeros_like(lora_B) if need_dB else None
        return dx, dA, dB
    r_pad = _configs.pad_rank(R)
    A_dtype, B_dtype = lora_A.dtype, lora_B.dtype
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # tiny; see lora_forward
    prec = dot_precision(x.dtype)
    mb = _configs.m_bucket(M)
    has_dropout = dropout_p > 0.0
    splits, rows = _configs.num_splits(M)
    reduce_m = _configs.reduce_block_m(_configs.operand_kind(x.dtype.itemsize, prec))
    dA = dB = None

    if need_dx or need_dA:
        g = torch.empty((M, R), device=dev, dtype=x.dtype) if need_dA else u  # u: dummy ptr
        dx_arg = dx if need_dx else x  # dummy pointer, never written when COMPUTE_DX=False

        def grid(meta):
            tiles_k = triton.cdiv(K, meta["BLOCK_K"]) if need_dx else 1
            return (triton.cdiv(M, meta["BLOCK_M"]) * tiles_k,)

        tuned(_lora_dx_kernel, "dx", x.dtype, r_pad)[grid](
            dy, weight, lora_B, lora_A, seed, dx_arg, g,
            M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            lora_B.stride(0), lora_B.stride(1), lora_A.stride(0), lora_A.stride(1),
            dx_arg.stride(0), dx_arg.stride(1), g.stride(0), g.stride(1),
            float(scaling), float(dropout_p),
            mb,
            COMPUTE_DX=need_dx, WRITE_G=need_dA, HAS_DROPOUT=has_dropout,
            R_PAD=r_pad, DOT_PRECISION=prec, GROUP_M=_configs.GROUP_M,
        )  # fmt: skip
        if need_dA:
            ws = torch.empty((splits, R, K), device=dev, dtype=torch.float32)
            tuned(_lora_da_kernel, "da", x.dtype, r_pad)[
                lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)
            ](
                g, x, seed, ws,
                M, K, R, rows,
                g.stride(0), g.stride(1), x.stride(0), x.stride(1),
                ws.stride(0), ws.stride(1), ws.stride(2),
                float(dropout_p),
                mb,
                HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec, REDUCE_BLOCK_M=reduce_m,
            )  # fmt: skip
            dA = ws.sum(0).to(A_dtype)
    if need_dB:
        ws = torch.empty((splits, N, R), device=dev, dtype=torch.float32)
        tuned(_lora_db_kernel, "db", x.dtype, r_pad)[
            lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
        ](
            dy, u, ws,
            M, N, R, rows,
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1),
            ws.stride(0), ws.stride(1), ws.stride(2),
            mb,
            R_PAD=r_pad, DOT_PRECISION=prec, REDUCE_BLOCK_M=reduce_m,
        )  # fmt: skip
        dB = ws.sum(0).to(B_dtype)
    return dx, dA, dB
