"""Many LoRA adapters over one frozen base, each row routed to its own adapter (SGMV).

    y[m] = x[m] W^T + b + s_i (D_i(x[m]) A_i^T) B_i^T        i = idx[m], -1: base only

Adapters are stacked (``stack_adapters``): A [n, R, K] and B [n, N, R], ranks zero-padded
to the largest R (padded rows of A and columns of B are zero, so they add nothing and get
zero gradients).  Per adapter, a float32 table row holds (s_i, p_i).

Segments: the rows are sorted by adapter index once per call on the device (``torch.sort``,
stable; no host sync): ``sidx`` [M] is the sorted index, ``order`` [M] the original row of
each sorted position.  Every kernel works in sorted positions and gathers (x, dy) or
scatters (y, dx) rows through ``order``, so the caller's row order never changes.  A row
tile of sorted positions spans a contiguous range of adapters [a_lo, a_hi] (read from its
own indices); the kernels loop over that range with the rows of other adapters masked.
Samples are contiguous token runs, so most tiles hold one adapter: the loop runs once, the
uniform fast path.  Over all tiles the loop runs at most tiles + n - 1 times.

    forward   y  = x W^T + b             cuBLAS addmm over all rows (one GEMM)
              u  = s_i D_i(x) A_i^T      ``shrink``  [M, R] in sorted order
              y += u B_i^T               ``expand``  in place, rows scattered by order
    backward  dx = dy W                  cuBLAS mm over all rows
              g  = s_i dy B_i            ``shrink`` (no dropout)  [M, R] sorted
              dx += (g A_i) m_i/(1-p_i)  ``expand`` with the mask regenerated
              dA_i = g_i^T D_i(x_i)      ``segment``: one program per (adapter, column
              dB_i = dy_i^T u_i          tile) walks its adapter's rows; dA and dB in one
                                         launch, no atomics, no partials: bitwise
                                         reproducible

Launches: forward sort + stack + 3, backward searchsorted + 4.  Dropout: adapter i's keep
mask is Philox keyed by (seed + i; row, column) with the original row, so it does not
depend on tiling or sorting, adapter 0 draws exactly the single-adapter kernels' mask for
the same seed, and D_i(x) is never stored (the forward's seed regenerates it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._launch import LaunchSpec, current_device_info, dot_precision, launch
from ._tiles import apply_dropout, dropout_keep

__all__ = ["segments", "sgmv_backward", "sgmv_forward", "stack_adapters"]


@triton.jit
def _tile_adapters(sidx_ptr, order_ptr, j0, M, NUM_ADAPTERS, BLOCK_M: tl.constexpr):
    """Sorted positions j0 .. j0+BLOCK_M: positions, in-range mask, original rows, adapter
    of each row (-1 outside), and the adapter range [a_lo, a_hi] the tile spans (empty when
    it holds base rows only).  Indices past the table are clamped: memory-safe, never read."""
    offs_j = j0 + tl.arange(0, BLOCK_M)
    mask_j = offs_j < M
    adp = tl.load(sidx_ptr + offs_j, mask=mask_j, other=-1)
    rows = tl.load(order_ptr + offs_j, mask=mask_j, other=0)
    a_lo = tl.maximum(tl.min(tl.where(adp >= 0, adp, NUM_ADAPTERS), axis=0), 0)
    a_hi = tl.minimum(tl.max(adp, axis=0), NUM_ADAPTERS - 1)
    return offs_j, mask_j, rows, adp, a_lo, a_hi


@triton.jit
def _sgmv_shrink_kernel(
    src_ptr, order_ptr, sidx_ptr, rhs_ptr, table_ptr, seed_ptr, out_ptr,
    M, C, R, NUM_ADAPTERS,
    stride_sm, stride_sc, stride_ra, stride_rr, stride_rc, stride_om,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[j, :R] = s_a D_a(src[order[j]]) rhs_a^T, a = sidx[j] (0 for base rows).
    src [M, C] (x, or dy for g without dropout); rhs_a [R, C] through its strides."""
    dtype = src_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    offs_j, mask_j, rows, adp, a_lo, a_hi = _tile_adapters(
        sidx_ptr, order_ptr, pid * BLOCK_M, M, NUM_ADAPTERS, BLOCK_M)  # fmt: skip
    offs_r = tl.arange(0, R_PAD)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    out = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for a in range(a_lo, a_hi + 1):
        in_a = mask_j & (adp == a)
        s = tl.load(table_ptr + 2 * a)
        if HAS_DROPOUT:
            p = tl.load(table_ptr + 2 * a + 1)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            src = tl.load(
                src_ptr + rows[:, None] * stride_sm + offs_c[None, :] * stride_sc,
                mask=in_a[:, None] & mask_c[None, :], other=0.0,
            )  # fmt: skip
            if HAS_DROPOUT:
                src = apply_dropout(src, seed + a, rows, c0, p, BLOCK_C)
            rhs_t = tl.load(
                rhs_ptr + a * stride_ra + offs_c[:, None] * stride_rc + offs_r[None, :] * stride_rr,
                mask=mask_c[:, None] & (offs_r[None, :] < R), other=0.0,
            ).to(dtype)  # [BLOCK_C, R_PAD]: rhs_a^T in src's dtype, cast in registers
            acc = tl.dot(src, rhs_t, acc, input_precision=DOT_PRECISION)
        out += acc * s  # rows of other adapters loaded as zeros: they add nothing
    tl.store(
        out_ptr + offs_j[:, None] * stride_om + offs_r[None, :],
        out.to(out_ptr.dtype.element_ty), mask=mask_j[:, None] & (offs_r[None, :] < R),
    )  # fmt: skip


@triton.jit
def _sgmv_expand_kernel(
    lhs_ptr, order_ptr, sidx_ptr, rhs_ptr, table_ptr, seed_ptr, out_ptr,
    M, C, R, NUM_ADAPTERS,
    stride_lm, stride_ra, stride_rr, stride_rc, stride_om, stride_oc,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[order[j], c] += lhs[j] rhs_a[:, c], times m_a/(1-p_a) with HAS_DROPOUT; lhs
    [M, R] sorted (u, or g), rhs_a [R, C] (B_a^T, or A_a).  Base-only rows are not touched."""
    pid_m = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    offs_j, mask_j, rows, adp, a_lo, a_hi = _tile_adapters(
        sidx_ptr, order_ptr, pid_m * BLOCK_M, M, NUM_ADAPTERS, BLOCK_M)  # fmt: skip
    if a_lo <= a_hi:  # a tile of base rows only has nothing to add
        dtype = lhs_ptr.dtype.element_ty
        offs_r = tl.arange(0, R_PAD)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        lhs = tl.load(
            lhs_ptr + offs_j[:, None] * stride_lm + offs_r[None, :],
            mask=mask_j[:, None] & (offs_r[None, :] < R), other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for a in range(a_lo, a_hi + 1):
            in_a = mask_j & (adp == a)
            rhs = tl.load(
                rhs_ptr + a * stride_ra + offs_r[:, None] * stride_rr + offs_c[None, :] * stride_rc,
                mask=(offs_r[:, None] < R) & mask_c[None, :], other=0.0,
            ).to(dtype)  # fmt: skip
            part = tl.dot(tl.where(in_a[:, None], lhs, tl.zeros_like(lhs)), rhs,
                          input_precision=DOT_PRECISION)  # fmt: skip
            if HAS_DROPOUT:
                p = tl.load(table_ptr + 2 * a + 1)
                keep = dropout_keep(seed + a, rows, c0, p, BLOCK_C)
                part = tl.where(keep, part * (1.0 / (1.0 - p)), 0.0)
            acc += part
        live = (mask_j & (adp >= 0))[:, None] & mask_c[None, :]
        ptrs = out_ptr + rows[:, None] * stride_om + offs_c[None, :] * stride_oc
        prev = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
        tl.store(ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _segment_tile(
    lhs_ptr, src_ptr, out_ptr, order_ptr, seed, p, start, end, c0, C, R,
    stride_lm, stride_sm, stride_sc, stride_or, stride_oc,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[:R, c0 : c0+BLOCK_C] = lhs[start:end]^T D(src[order[start:end]]) in fixed row order."""
    dtype = src_ptr.dtype.element_ty
    offs_r = tl.arange(0, R_PAD)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_M):
        offs_j = j0 + tl.arange(0, BLOCK_M)
        mask_j = offs_j < end
        rows = tl.load(order_ptr + offs_j, mask=mask_j, other=0)
        lhs = tl.load(
            lhs_ptr + offs_j[:, None] * stride_lm + offs_r[None, :],
            mask=mask_j[:, None] & (offs_r[None, :] < R), other=0.0,
        ).to(dtype)  # fmt: skip
        src = tl.load(
            src_ptr + rows[:, None] * stride_sm + offs_c[None, :] * stride_sc,
            mask=mask_j[:, None] & mask_c[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            src = apply_dropout(src, seed, rows, c0, p, BLOCK_C)
        acc = tl.dot(tl.trans(lhs), src, acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & mask_c[None, :],
    )  # fmt: skip


@triton.jit
def _sgmv_segment_kernel(
    g_ptr, x_ptr, da_ptr, u_ptr, dy_ptr, db_ptr, order_ptr, bounds_ptr, table_ptr, seed_ptr,
    K, N, R, TILES_K,
    stride_gm, stride_xm, stride_xk, stride_daa, stride_dar, stride_dak,
    stride_um, stride_dym, stride_dyn, stride_dba, stride_dbr, stride_dbn,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (a, t): t < TILES_K gives dA_a[:, tile t] = g_a^T D_a(x_a), the rest
    dB_a^T[:, tile t - TILES_K] = u_a^T dy_a, over adapter a's sorted rows
    bounds[a] .. bounds[a+1].  An adapter without rows gets zeros."""
    a = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    start = tl.load(bounds_ptr + a)
    end = tl.load(bounds_ptr + a + 1)
    if t < TILES_K:
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr) + a
            p = tl.load(table_ptr + 2 * a + 1)
        else:
            seed = 0
            p = 0.0
        _segment_tile(g_ptr, x_ptr, da_ptr + a * stride_daa, order_ptr, seed, p, start, end,
                      t * BLOCK_C, K, R, stride_gm, stride_xm, stride_xk, stride_dar,
                      stride_dak, HAS_DROPOUT, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_C)
    else:
        _segment_tile(u_ptr, dy_ptr, db_ptr + a * stride_dba, order_ptr, 0, 0.0, start, end,
                      (t - TILES_K) * BLOCK_C, N, R, stride_um, stride_dym, stride_dyn,
                      stride_dbr, stride_dbn, False, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_C)


# --------------------------------------------------------------------------- launchers


def stack_adapters(lora_As, lora_Bs) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_As: n tensors [r_i, K], lora_Bs: n tensors [N, r_i] -> A [n, R, K], B [n, N, R]
    (R = max r_i, zero-padded; one dtype, the promoted one).  Differentiable torch ops, so
    gradients of the stacks flow back to each adapter in its own dtype.  One adapter is a
    view; equal ranks one copy each; mixed ranks a padded copy."""
    if len(lora_As) == 1:
        return lora_As[0].unsqueeze(0), lora_Bs[0].unsqueeze(0)
    if len({a.shape[0] for a in lora_As}) == 1:
        return torch.stack(tuple(lora_As)), torch.stack(tuple(lora_Bs))
    dtype_a = functools.reduce(torch.promote_types, (a.dtype for a in lora_As))
    dtype_b = functools.reduce(torch.promote_types, (b.dtype for b in lora_Bs))
    pad = torch.nn.utils.rnn.pad_sequence
    A = pad([a.to(dtype_a) for a in lora_As], batch_first=True)  # [n, R, K]
    Bt = pad([b.to(dtype_b).t() for b in lora_Bs], batch_first=True)  # [n, R, N]
    return A, Bt.transpose(1, 2)


def segments(row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """row_index: int64 [M] -> (sidx, order): the indices sorted (stable) and the original
    row of each sorted position, both int64 [M]; on the device, no host sync."""
    return torch.sort(row_index, stable=True)


def _kind(dtype: torch.dtype) -> tuple[str, str]:
    prec = dot_precision(dtype)
    return prec, _configs.operand_kind(dtype.itemsize, prec)


@functools.lru_cache(maxsize=1024)
def _plan(kernel: str, rows: int, cols: int, r_pad: int, kind: str, prec: str, sms: int,
          has_dropout: bool, grid_rows: int | None = None) -> LaunchSpec:  # fmt: skip
    """One launch: the config picked for this shape, its grid and constexprs."""
    c = _configs.sgmv_pick(kernel, kind, r_pad, rows, cols, sms)
    fn = {"sgmv_shrink": _sgmv_shrink_kernel, "sgmv_expand": _sgmv_expand_kernel,
          "sgmv_segment": _sgmv_segment_kernel}[kernel]  # fmt: skip
    if kernel == "sgmv_shrink":
        grid = (_configs.cdiv(rows, c.block_m),)
    elif kernel == "sgmv_expand":
        grid = (_configs.cdiv(rows, c.block_m), _configs.cdiv(cols, c.block_n))
    else:  # rows: adapters; cols: the dA columns (K) plus the dB columns (N), tiled apart
        grid = (rows, grid_rows)
    constexprs = dict(HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec,
                      BLOCK_M=c.block_m, BLOCK_C=c.block_n)  # fmt: skip
    return LaunchSpec(fn, grid, constexprs, c.num_warps, c.num_stages)


def shrink(src, sidx, order, rhs, table, seed, has_dropout: bool, *, traceable=False):
    """out [M, R] (sorted) = s_a D_a(src[order]) rhs_a^T.  src: [M, C]; rhs: [n, R, C]
    through its strides (A, or B.transpose(1, 2)); table: float32 [n, 2] of (s, p)."""
    M, C = src.shape
    n, R = rhs.shape[0], rhs.shape[1]
    out = torch.empty(M, R, device=src.device, dtype=src.dtype)
    if M == 0:
        return out
    prec, kind = _kind(src.dtype)
    spec = _plan("sgmv_shrink", M, C, _configs.pad_rank(R), kind, prec,
                 current_device_info()[1], has_dropout)  # fmt: skip
    launch(spec, (src, order, sidx, rhs, table, seed, out),
           (M, C, R, n, *src.stride(), *rhs.stride(), out.stride(0)), traceable=traceable)
    return out


def expand(out, lhs, sidx, order, rhs, table, seed, has_dropout: bool, *, traceable=False):
    """out[order[j]] += lhs[j] rhs_a (masked by adapter a's dropout when has_dropout), in
    place.  out: [M, C]; lhs: [M, R] sorted; rhs: [n, R, C] through its strides."""
    M, C = out.shape
    n, R = rhs.shape[0], rhs.shape[1]
    if M == 0:
        return out
    prec, kind = _kind(lhs.dtype)
    spec = _plan("sgmv_expand", M, C, _configs.pad_rank(R), kind, prec,
                 current_device_info()[1], has_dropout)  # fmt: skip
    launch(spec, (lhs, order, sidx, rhs, table, seed, out),
           (M, C, R, n, lhs.stride(0), *rhs.stride(), *out.stride()), traceable=traceable)
    return out


def sgmv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    table: torch.Tensor,
    row_index: torch.Tensor,
    seed: torch.Tensor,
    has_dropout: bool,
    *,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, K], weight: [N, K] (x's dtype), bias: [N] | None, A: [n, R, K], B: [n, N, R]
    (``stack_adapters``), table: float32 [n, 2] of (s_i, p_i), row_index: int64 [M] in
    [-1, n), seed: int64 [1] (read with has_dropout).  Returns y [M, N] in x.dtype (rows in
    the caller's order), u [M, R] (sorted order), sidx and order (``segments``)."""
    sidx, order = segments(row_index)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    u = shrink(x, sidx, order, A, table, seed, has_dropout, traceable=traceable)
    expand(y, u, sidx, order, B.transpose(1, 2), table, seed, False, traceable=traceable)
    return y, u, sidx, order


def sgmv_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    table: torch.Tensor,
    u: torch.Tensor,
    sidx: torch.Tensor,
    order: torch.Tensor,
    seed: torch.Tensor,
    has_dropout: bool,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    *,
    traceable: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dy: [M, N]; the rest as ``sgmv_forward`` gave or took them.  Returns dx [M, K]
    (x.dtype), dA [n, R, K] (A.dtype) and dB [n, N, R] (B.dtype, contiguous); None where
    not needed.  Each adapter's dA, dB sum over its own rows only."""
    M, K = x.shape
    N = dy.shape[1]
    n, R = A.shape[0], A.shape[1]
    dev = x.device
    dx = torch.mm(dy, weight) if need_dx else None
    dA = torch.empty(n, R, K, device=dev, dtype=A.dtype) if need_dA else None
    dB = torch.empty(n, N, R, device=dev, dtype=B.dtype) if need_dB else None
    if M == 0:
        return dx, dA.zero_() if need_dA else None, dB.zero_() if need_dB else None
    g = None
    if need_dx or need_dA:
        g = shrink(dy, sidx, order, B.transpose(1, 2), table, seed, False, traceable=traceable)
    if need_dx:
        expand(dx, g, sidx, order, A, table, seed, has_dropout, traceable=traceable)
    if need_dA or need_dB:
        bounds = torch.searchsorted(sidx, torch.arange(n + 1, device=dev, dtype=sidx.dtype))
        prec, kind = _kind(x.dtype)
        c = _configs.sgmv_pick("sgmv_segment", kind, _configs.pad_rank(R), n, K + N,
                               current_device_info()[1])  # fmt: skip
        tiles_k = _configs.cdiv(K, c.block_n) if need_dA else 0
        tiles_n = _configs.cdiv(N, c.block_n) if need_dB else 0
        spec = _plan("sgmv_segment", n, K + N, _configs.pad_rank(R), kind, prec,
                     current_device_info()[1], has_dropout, tiles_k + tiles_n)  # fmt: skip
        da_strides = dA.stride() if need_dA else (0, 0, 0)
        # dB_a^T [R, N] is written: (a, r, n) strides of dB [n, N, R]
        db_strides = (N * R, 1, R) if need_dB else (0, 0, 0)
        launch(spec, (g if need_dA else u, x, dA if need_dA else u, u, dy,
                      dB if need_dB else u, order, bounds, table, seed),
               (K, N, R, tiles_k, R, *x.stride(), *da_strides, u.stride(0), *dy.stride(),
                *db_strides), traceable=traceable)  # fmt: skip
    return dx, dA, dB
