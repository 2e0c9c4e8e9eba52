"""Backward candidates' dx GEMM and their tail launch (``backward_candidates.py`` wires them).

    dx_gemm  dx = (g A) m/(1-p) + dy W   [M, K]  a pure GEMM: the low-rank product is the
                                                 tile's first, R_PAD-deep K step (masked
                                                 in registers when p > 0, before the main
                                                 loop starts: the mask depends only on
                                                 (seed, row, column)), then the dy W main
                                                 loop accumulates onto it; one store.  No
                                                 epilogue work beyond the store, so
                                                 cuBLAS-class tiles (128 x 256) fit.
    tail     dA = g^T D(x)               [r, K]  a skinny pass over x: one program per
                                                 BLOCK_K columns walks all rows in a fixed
                                                 order (no fp32 partials for dA)
             dB = sum_p dB partials      [N, r]  the dy pass's partials, p ascending

g arrives as G_PARTS partial sums [G_PARTS, M, r] (the split dy pass, fp32) or as one
[M, r] tensor in x's dtype (the row dy pass): both kernels add the parts in index order
and cast to x's dtype, so every candidate rounds g the same way for a given dy pass.
WARP_SPEC asks Triton for warp specialization of the persistent tile loop, with g and A
loaded through descriptors as it requires; no candidate launches it (see
``backward_candidates``: Triton 3.9's specialized consumer waits with depth 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import dropout_keep, load_rows, load_w, store_rows, tile_coords, w_source


@triton.jit
def load_g(g_ptr, offs_m, offs_r, M, R, stride_gs, stride_gm, stride_gr,
           G_PARTS: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """g [BM, R_PAD] in ``dtype``: the sum of its G_PARTS partials, part 0 first."""
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, G_PARTS):
        g += tl.load(ptrs + s * stride_gs, mask=mask, other=0.0).to(tl.float32)
    return g.to(dtype)


@triton.jit
def _lora_dx_gemm_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gs, stride_gm, stride_gr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    dropout_p, NUM_PROGS,
    G_PARTS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr, WARP_SPEC: tl.constexpr,
):  # fmt: skip
    """dx tiles [BLOCK_M, BLOCK_K]; programs walk tiles pid, pid + NUM_PROGS, ..."""
    dtype = dy_ptr.dtype.element_ty
    BASE: tl.constexpr = "dense_tma" if USE_TMA else "dense"
    if USE_TMA:
        dy_src = tl.make_tensor_descriptor(dy_ptr, [M, N], [stride_dym, 1], [BLOCK_M, BLOCK_N])
        dx_dst = tl.make_tensor_descriptor(
            dx_ptr, [M, K], [stride_dxm, 1], [BLOCK_M, BLOCK_K // EPI_SPLIT]
        )  # fmt: skip
    else:
        dy_src = dy_ptr
        dx_dst = dx_ptr
    w_src = w_source(w_ptr, None, None, None, None, N, K, stride_wn, BASE, BLOCK_N, BLOCK_K)
    if WARP_SPEC:
        # Triton 3.9's warp specialization takes only descriptor loads in the loop: g and
        # A through TMA too (zero outside [M, R] and [R, K]: the padded rank columns)
        g_src = tl.make_tensor_descriptor(g_ptr, [M, R], [stride_gm, 1], [BLOCK_M, R_PAD])
        a_src = tl.make_tensor_descriptor(a_ptr, [R, K], [stride_ar, 1], [R_PAD, BLOCK_K])
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
        inv_keep = 1.0 / (1.0 - p)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_k, NUM_PROGS,
                         warp_specialize=WARP_SPEC):  # fmt: skip
        pid_m, pid_k = tile_coords(tile, num_pid_m, num_pid_k, GROUP_M)
        m0 = pid_m * BLOCK_M
        k0 = pid_k * BLOCK_K
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if WARP_SPEC:
            g = g_src.load([tl.cast(m0, tl.int32), 0]).to(dtype)
            a = a_src.load([0, tl.cast(k0, tl.int32)]).to(dtype)
        else:
            g = load_g(g_ptr, offs_m, offs_r, M, R, stride_gs, stride_gm, stride_gr, G_PARTS,
                       dtype)  # fmt: skip
            a = tl.load(
                a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0,
            ).to(dtype)  # [R_PAD, BLOCK_K], cast in registers
        # the low-rank K step first: the accumulator's start, as u B^T is the forward's
        acc = tl.dot(g, a, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
            acc = tl.where(keep, acc * inv_keep, 0.0)
        for n0 in range(0, N, BLOCK_N):
            dy = load_rows(dy_src, m0, n0, M, N, stride_dym, stride_dyn, USE_TMA, BLOCK_M,
                           BLOCK_N)  # fmt: skip
            w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        store_rows(dx_dst, acc, m0, k0, M, K, stride_dxm, stride_dxk, USE_TMA, BLOCK_M, BLOCK_K,
                   EPI_SPLIT)  # fmt: skip


@triton.jit
def _lora_tail_kernel(
    x_ptr, g_ptr, seed_ptr, da_ptr, wsb_ptr, db_ptr,
    M, K, R, NB, PB, PROGS_A,
    stride_xm, stride_xk, stride_gs, stride_gm, stride_gr, stride_dar,
    dropout_p,
    G_PARTS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Programs < PROGS_A: dA[:, k0 : k0+BLOCK_K] = sum over row blocks (ascending) of
    g^T D(x); the rest: dB[i] = sum_p wsb[p, i] (p ascending), BLOCK elements each."""
    pid = tl.program_id(0)
    if pid < PROGS_A:
        dtype = x_ptr.dtype.element_ty
        k0 = pid.to(tl.int64) * BLOCK_K
        if USE_TMA:
            x_src = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        else:
            x_src = x_ptr
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            p = tl.cast(dropout_p, tl.float32)
            inv_keep = 1.0 / (1.0 - p)
        offs_r = tl.arange(0, R_PAD)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc_a = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M, BLOCK_K)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
            g = load_g(g_ptr, offs_m, offs_r, M, R, stride_gs, stride_gm, stride_gr, G_PARTS,
                       dtype)  # fmt: skip
            acc_a = tl.dot(g.T, x, acc_a, input_precision=DOT_PRECISION)
        tl.store(
            da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :],
            acc_a.to(da_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
        )  # fmt: skip
    else:
        offs = (pid - PROGS_A).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, PB):
            acc_b += tl.load(wsb_ptr + i * NB + offs, mask=offs < NB, other=0.0)
        tl.store(db_ptr + offs, acc_b.to(db_ptr.dtype.element_ty), mask=offs < NB)
