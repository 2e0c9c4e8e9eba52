"""LoRA forward: ``y = x W^T + b + s * D(x) A^T B^T`` in two launches.

    shrink   u = s * D(x) A^T             [M, r]   dropout applied in registers
    forward  y = x W^T + b + u B^T        [M, N]   u B^T and b added in the epilogue,
                                                   one store of y

D(x) = x * m / (1-p) is never stored: the keep mask m comes from Philox keyed by
(seed, row, column), so the backward regenerates exactly the same mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from . import _configs
from ._launch import dot_precision, tuned


# Philox4x32 gives four 32-bit draws per counter: one call serves 4 adjacent columns.
RNG_COLS_PER_DRAW = 4


@triton.jit
def dropout_keep(seed, offs_m, k0, p, BLOCK_K: tl.constexpr):
    """Keep mask [BM, BLOCK_K] for rows offs_m and columns k0 .. k0 + BLOCK_K (k0 a
    multiple of 4): element (row, col) keeps iff Philox4x32-10(seed; col // 4, row, 0, 0)
    [col % 4], as a uniform in [0, 1), is >= p.

    Row and column group are separate 32-bit counters, so the stream never wraps for
    M*K >= 2**31 (it needs M, K < 2**32) and no int64 product is formed; the same
    (seed, row, col) gives the same bit in every kernel, whatever its tiling."""
    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    zero = (offs_m[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    rows = offs_m[:, None].to(tl.uint32) + zero
    cols = groups[None, :].to(tl.uint32) + zero
    r0, r1, r2, r3 = philox(seed, cols, rows, zero, zero)
    # [BM, BK/4, 2, 2] -> [BM, BK]: column 4g + 2i + j takes draw r_(2i+j) of group g
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (offs_m.shape[0], BLOCK_K))
    return uint_to_uniform_float(bits) >= p


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
    scaling, dropout_p,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """u[M, r] = s * D(x) A^T; one program per BLOCK_M rows, loop over K."""
    dtype = x_ptr.dtype.element_ty
    s = tl.cast(scaling, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
        inv_keep = 1.0 / (1.0 - p)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :], other=0.0,
        ).to(dtype)  # [BLOCK_K, R_PAD]: A^T, in x's dtype when the adapter is fp32
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    u = (acc * s).to(u_ptr.dtype.element_ty)
    tl.store(
        u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
        u, mask=mask_m[:, None] & mask_r[None, :],
    )  # fmt: skip


@triton.jit
def _lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
    stride_bn, stride_br, stride_ym, stride_yn,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x W^T + b + u B^T; u B^T is one extra R_PAD-deep step in the epilogue."""
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group) % group_size).to(tl.int64)
    pid_n = ((pid % group) // group_size).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        w_t = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)

    # epilogue: the low-rank expand u B^T, then the bias, then the one store
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    u = tl.load(
        u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
        mask=mask_m[:, None] & mask_r[None, :], other=0.0,
    )  # fmt: skip
    b_t = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=mask_r[:, None] & mask_n[None, :], other=0.0,
    ).to(dtype)  # [R_PAD, BLOCK_N]: B^T
    acc = tl.dot(u, b_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )  # fmt: skip


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r],
    seed: int64 [1] (read only when dropout_p > 0).  Returns y: [M, N] and u: [M, r],
    both in x.dtype; u = s * D(x) A^T is what the backward needs for dB.  Computes in
    x.dtype (adapters cast to it) with fp32 accumulation."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, u
    r_pad = _configs.pad_rank(R)
    # adapters in x's dtype (PEFT keeps them fp32): r*(K+N) elements, so the kernels
    # compile for one operand dtype
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    prec = dot_precision(x.dtype)
    mb = _configs.m_bucket(M)
    has_dropout = dropout_p > 0.0

    tuned(_lora_shrink_kernel, "shrink", x.dtype, r_pad)[
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    ](
        x, lora_A, u, seed,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), u.stride(0), u.stride(1),
        float(scaling), float(dropout_p),
        mb,
        HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec,
    )  # fmt: skip
    tuned(_lora_forward_kernel, "forward", x.dtype, r_pad)[
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    ](
        x, weight, bias if bias is not None else weight, u, lora_B, y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        mb,
        HAS_BIAS=bias is not None, R_PAD=r_pad, DOT_PRECISION=prec, GROUP_M=_configs.GROUP_M,
    )  # fmt: skip
    return y, u

