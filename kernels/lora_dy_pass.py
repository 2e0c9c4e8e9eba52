"""A dy pass that fills the machine: a 2-D grid of (row block, column split) programs.

    dy_split   program (i, j): rows i*BLOCK_M .., columns [j*N_PER, (j+1)*N_PER)
               g partial  [j, M, r] = s dy[:, cols] B[cols]     fp32
               dB partial [i, N, r] = dy[rows, n-tile]^T u[rows] fp32, one per n-tile

Today's row pass (``lora_backward._lora_dy_kernel``) gives one program per 64-128 rows:
at M = 8192 that is 64-128 programs streaming all of N in 4 KB boxes, below one wave on a
132-SM GPU.  Splitting N gives ``cdiv(M, BLOCK_M) * SPLIT`` programs (the plan takes the
smallest split with two programs per SM) with larger boxes and a deeper pipeline, and
128-256-row blocks halve or quarter today's dB partials.  The g partials (SPLIT of them,
M x r fp32 each: a few MB) are summed in index order by their readers (the dx GEMM and the
dA pass, ``lora_dx_gemm.load_g``); the dB partials by the tail launch.  Fixed orders only:
the bits depend on the shape alone.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import load_rows


@triton.jit
def _lora_dy_split_kernel(
    dy_ptr, b_ptr, u_ptr, g_ptr, ws_ptr,
    M, N, R, N_PER,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur,
    stride_gs, stride_gm, stride_wsp, stride_wsn,
    scaling,
    WRITE_G: tl.constexpr, NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """g partial of split j for rows i*BLOCK_M ..; dB partials of those rows for the
    split's column tiles (N_PER a multiple of BLOCK_N)."""
    dtype = dy_ptr.dtype.element_ty
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if USE_TMA:
        dy_src = tl.make_tensor_descriptor(dy_ptr, [M, N], [stride_dym, 1], [BLOCK_M, BLOCK_N])
    else:
        dy_src = dy_ptr
    if NEED_DB:
        u = tl.load(
            u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        ).to(dtype)  # fmt: skip
    g_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n_start = pid_s * N_PER
    n_end = tl.minimum(n_start + N_PER, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        dy = load_rows(dy_src, m0, n0, M, N, stride_dym, stride_dyn, USE_TMA, BLOCK_M, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        if WRITE_G:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0,
            ).to(dtype)  # fmt: skip
            g_acc = tl.dot(dy, b, g_acc, input_precision=DOT_PRECISION)
        if NEED_DB:
            part = tl.dot(dy.T, u, input_precision=DOT_PRECISION)  # [BLOCK_N, R_PAD]
            tl.store(
                ws_ptr + pid_m * stride_wsp + offs_n[:, None] * stride_wsn + offs_r[None, :],
                part, mask=mask_n[:, None] & mask_r[None, :],
            )  # fmt: skip
    if WRITE_G:
        s = tl.cast(scaling, tl.float32)
        tl.store(
            g_ptr + pid_s * stride_gs + offs_m[:, None] * stride_gm + offs_r[None, :],
            g_acc * s, mask=mask_m[:, None] & mask_r[None, :],
        )  # fmt: skip
