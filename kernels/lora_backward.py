"""LoRA backward in at most three launches, one pass over dy and a pure GEMM for dx.

    dy      g = s dy B               [M, r]   the one pass over dy: per BLOCK_M rows, the
            dB partials dy^T u       [P, N, r] loop over N gives g (in registers) and, per
                                               N tile, that row block's dB partial
    dx      dx = dy W + (g A) m/(1-p) [M, K]  a pure GEMM main loop over N; the epilogue adds
            dA partials g^T D(x)     [P, r, K] the low-rank term and, from the x tile it
                                               loads there, the row block's dA partial
    reduce  dA = sum_p, dB = sum_p             fixed-order sums of the partials, cast to
                                               each adapter's dtype in the kernel

The mask m is regenerated from the forward's seed (``dropout_keep``); D(x) is never stored.
No atomics: the partials are summed in one fixed order, and how many there are follows
from the shape alone (``_configs.pick``), so dA, dB and dx are bitwise reproducible for a
shape.  Adapters are read in their own dtype and cast in registers.

Builds as in ``lora_forward``: pointer loads (sm_80, unaligned strides) or, on sm_90,
persistent dx programs with TMA loads of dy, W and x and a subtiled TMA store of dx.  A
new base kind is a ``BASE`` branch of ``_tiles.load_w``; a new adapter's dy-pass
reduction (DoRA's dm) goes beside the dB partials in ``_lora_dy_kernel``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._launch import CallCache, LaunchSpec, base4_key, context, current_device_info
from ._launch import dot_precision, launch, next_serial, operand_key, transient
from ._tiles import dropout_keep, load_rows, load_w, store_rows, tile_coords, w_source
from .lora_forward import _NO_Q, fp8_codes, fp8_route, q_pointers, use_tma, w_arguments

# per-call plans (``_backward``): launches, TMA decision, scalars and workspace sizes by key
_calls = CallCache()


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, u_ptr, g_ptr, ws_ptr, z_ptr, mag_ptr, norm_ptr, wsm_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur,
    stride_gm, stride_gr, stride_wsp, stride_wsn, stride_zm,
    scaling,
    WRITE_G: tl.constexpr, NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ADAPTER: tl.constexpr = "lora", NEED_DM: tl.constexpr = False,
):  # fmt: skip
    """Rows m0 .. m0+BLOCK_M: g = s dy B, and dB partial [pid, N, r] = dy^T u.

    ADAPTER "dora": c = m / norm scales B's rows (g = s (dy c) B) and the dB partial's rows,
    and NEED_DM adds the dm partial [pid, N] = colsum(dy * z) from the same dy tiles (z [M, N]
    contiguous, the forward's pre-scale output; the division by norm is the reduce's)."""
    dtype = dy_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    m0 = pid * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if USE_TMA:
        dy_src = tl.make_tensor_descriptor(dy_ptr, [M, N], [stride_dym, 1], [BLOCK_M, BLOCK_N])
        if NEED_DM:
            z_src = tl.make_tensor_descriptor(z_ptr, [M, N], [stride_zm, 1], [BLOCK_M, BLOCK_N])
    else:
        dy_src = dy_ptr
        z_src = z_ptr
    if NEED_DB:
        u = tl.load(
            u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
    g_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dy = load_rows(dy_src, m0, n0, M, N, stride_dym, stride_dyn, USE_TMA, BLOCK_M, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        if ADAPTER == "dora":
            c = tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) / tl.load(
                norm_ptr + offs_n, mask=mask_n, other=1.0)  # fmt: skip
        if WRITE_G:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0,
            )  # fmt: skip
            if ADAPTER == "dora":
                b = b.to(tl.float32) * c[:, None]
            g_acc = tl.dot(dy, b.to(dtype), g_acc, input_precision=DOT_PRECISION)
        if NEED_DM:
            z = load_rows(z_src, m0, n0, M, N, stride_zm, 1, USE_TMA, BLOCK_M, BLOCK_N)
            tl.store(wsm_ptr + pid * N + offs_n,
                     tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0), mask=mask_n)
        if NEED_DB:
            part = tl.dot(dy.T, u, input_precision=DOT_PRECISION)  # [BLOCK_N, R_PAD]
            if ADAPTER == "dora":
                part = part * c[:, None]
            tl.store(
                ws_ptr + pid * stride_wsp + offs_n[:, None] * stride_wsn + offs_r[None, :],
                part, mask=mask_n[:, None] & mask_r[None, :],
            )  # fmt: skip
    if WRITE_G:
        s = tl.cast(scaling, tl.float32)
        tl.store(
            g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            (g_acc * s).to(g_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :],
        )  # fmt: skip


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, seed_ptr, dx_ptr, ws_ptr,
    q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, mag_ptr, norm_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr,
    stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, stride_wsp, stride_wsr,
    dropout_p, NUM_PROGS,
    COMPUTE_DX: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr, Q_NESTED_BLOCKSIZE: tl.constexpr,
    ADAPTER: tl.constexpr = "lora",
):  # fmt: skip
    """dx tile [BLOCK_M, BLOCK_K] and (NEED_DA) the dA partial [pid_m, r, BLOCK_K];
    COMPUTE_DX=False skips the GEMM (dA alone).

    ADAPTER "dora" (dense base; c = m / norm, g already holds c): dx = (dy c) W + g A, the
    column scale applied to the dy tile in registers; with dropout dx = dy W + m/(1-p)
    (dy (c - 1) W + g A), the second product a second accumulator on the same tiles."""
    dtype = dy_ptr.dtype.element_ty
    if USE_TMA:
        dy_src = tl.make_tensor_descriptor(dy_ptr, [M, N], [stride_dym, 1], [BLOCK_M, BLOCK_N])
        x_src = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        dx_dst = tl.make_tensor_descriptor(
            dx_ptr, [M, K], [stride_dxm, 1], [BLOCK_M, BLOCK_K // EPI_SPLIT]
        )  # fmt: skip
    else:
        dy_src = dy_ptr
        x_src = x_ptr
        dx_dst = dx_ptr
    w_src = w_source(w_ptr, q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, N, K,
                     stride_wn, BASE, BLOCK_N, BLOCK_K)  # fmt: skip
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
        inv_keep = 1.0 / (1.0 - p)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_k, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_k = tile_coords(tile, num_pid_m, num_pid_k, GROUP_M)
        m0 = pid_m * BLOCK_M
        k0 = pid_k * BLOCK_K
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if ADAPTER == "dora" and HAS_DROPOUT:
            acc_d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if COMPUTE_DX and (BASE == "dense" or BASE == "dense_tma"):
            for n0 in range(0, N, BLOCK_N):
                dy = load_rows(dy_src, m0, n0, M, N, stride_dym, stride_dyn, USE_TMA, BLOCK_M,
                               BLOCK_N)  # fmt: skip
                w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K)
                if ADAPTER == "dora":
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < N
                    c = tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) / (
                        tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0))  # fmt: skip
                    if HAS_DROPOUT:
                        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
                        dyc = (dy.to(tl.float32) * (c - 1.0)[None, :]).to(dtype)
                        acc_d = tl.dot(dyc, w, acc_d, input_precision=DOT_PRECISION)
                    else:
                        dyc = (dy.to(tl.float32) * c[None, :]).to(dtype)
                        acc = tl.dot(dyc, w, acc, input_precision=DOT_PRECISION)
                else:
                    acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        elif COMPUTE_DX:
            # a decoded 4-bit W lives in registers: the MMA's A operand (wgmma takes only A
            # from registers), so the tile is dx^T = W^T dy^T
            acc_t = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                dy = load_rows(dy_src, m0, n0, M, N, stride_dym, stride_dyn, USE_TMA, BLOCK_M,
                               BLOCK_N)  # fmt: skip
                w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K,
                           Q_BLOCKSIZE, Q_NESTED_BLOCKSIZE)
                acc_t = tl.dot(w.to(dtype).T, dy.T, acc_t, input_precision=DOT_PRECISION)
            acc = acc_t.T
        # epilogue operands after the main loop: the accumulator already fills the registers
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
        if COMPUTE_DX:
            a = tl.load(
                a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0,
            ).to(dtype)  # [R_PAD, BLOCK_K], cast in registers
            low = tl.dot(g, a, input_precision=DOT_PRECISION)
            if ADAPTER == "dora" and HAS_DROPOUT:
                low += acc_d
            if HAS_DROPOUT:
                low = tl.where(keep, low * inv_keep, 0.0)
            store_rows(dx_dst, acc + low, m0, k0, M, K, stride_dxm, stride_dxk, USE_TMA,
                       BLOCK_M, BLOCK_K, EPI_SPLIT)  # fmt: skip
        if NEED_DA:
            x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M, BLOCK_K)
            if HAS_DROPOUT:
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
            part = tl.dot(g.T, x, input_precision=DOT_PRECISION)  # [R_PAD, BLOCK_K]
            tl.store(
                ws_ptr + pid_m * stride_wsp + offs_r[:, None] * stride_wsr + offs_k[None, :],
                part, mask=mask_r[:, None] & mask_k[None, :],
            )  # fmt: skip


@triton.jit
def _lora_reduce_kernel(
    wsa_ptr, da_ptr, wsb_ptr, db_ptr, wsm_ptr, dm_ptr, norm_ptr,
    NA, PA, NB, PB, PROGS_A, NM, PM, PROGS_AB,
    BLOCK: tl.constexpr, HAS_DM: tl.constexpr = False,
):  # fmt: skip
    """dA[i] = sum_p wsa[p, i] (programs < PROGS_A), dB[i] = sum_p wsb[p, i] (the rest);
    p ascending, stored in the output's dtype.  HAS_DM (DoRA): programs from PROGS_AB on
    give dm[i] = sum_p wsm[p, i] / norm[i]."""
    pid = tl.program_id(0)
    if HAS_DM and pid >= PROGS_AB:
        offs = (pid - PROGS_AB).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, PM):
            acc += tl.load(wsm_ptr + i * NM + offs, mask=offs < NM, other=0.0)
        acc = acc / tl.load(norm_ptr + offs, mask=offs < NM, other=1.0)
        tl.store(dm_ptr + offs, acc.to(dm_ptr.dtype.element_ty), mask=offs < NM)
    elif pid < PROGS_A:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, PA):
            acc += tl.load(wsa_ptr + i * NA + offs, mask=offs < NA, other=0.0)
        tl.store(da_ptr + offs, acc.to(da_ptr.dtype.element_ty), mask=offs < NA)
    else:
        offs = (pid - PROGS_A).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, PB):
            acc += tl.load(wsb_ptr + i * NB + offs, mask=offs < NB, other=0.0)
        tl.store(db_ptr + offs, acc.to(db_ptr.dtype.element_ty), mask=offs < NB)


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
    *,
    traceable: bool = False,
    tma: bool | None = None,
    base4: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dy: [M, N], x: [M, K], weight: [N, K], lora_A: [r, K], lora_B: [N, r], u: [M, r]
    (from ``lora_forward``), seed: the forward's int64 [1].  Returns dx [M, K] in x.dtype,
    dA [r, K] in lora_A.dtype, dB [N, r] in lora_B.dtype (contiguous); None for what is
    not needed.  ``traceable``/``tma``/``base4`` as in ``lora_forward``."""
    weight = fp8_codes(weight, base4)
    dx, dA, dB, _ = _backward(dy, x, weight, lora_A, lora_B, None, None, u, None, scaling,
                              dropout_p, seed, need_dx, need_dA, need_dB, False, traceable, tma,
                              base4)
    return dx, dA, dB


def dora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    u: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    need_dm: bool = True,
    *,
    traceable: bool = False,
    tma: bool | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """DoRA on a dense base: ``lora_backward``'s arguments plus magnitude [N], norm [N]
    (fp32) and z [M, N] (contiguous, from ``dora_forward``).  Returns dx, dA, dB and dm [N]
    (magnitude's dtype); the same three launches as LoRA, dm's partials made in the dy pass."""
    return _backward(dy, x, weight, lora_A, lora_B, magnitude, norm, u, z, scaling, dropout_p,
                     seed, need_dx, need_dA, need_dB, need_dm, traceable, tma, None)


def _backward(dy, x, weight, lora_A, lora_B, magnitude, norm, u, z, scaling, dropout_p, seed,
              need_dx, need_dA, need_dB, need_dm, traceable, tma, base4):
    dora = magnitude is not None
    need_dm = dora and need_dm
    M, K = x.shape
    N = lora_B.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    dx = torch.empty(M, K, device=dev, dtype=x.dtype) if need_dx else None
    dA = torch.empty(R, K, device=dev, dtype=lora_A.dtype) if need_dA else None
    dB = torch.empty(N, R, device=dev, dtype=lora_B.dtype) if need_dB else None
    dm = torch.empty(magnitude.shape, device=dev, dtype=magnitude.dtype) if need_dm else None
    if M == 0:
        return (dx, dA.zero_() if need_dA else None, dB.zero_() if need_dB else None,
                dm.zero_() if need_dm else None)
    if not (need_dx or need_dA or need_dB or need_dm):
        return None, None, None, None
    info = current_device_info()
    if need_dx:  # dA alone never reads W
        weight, base4 = fp8_route(info, x, R, weight, base4, tma, traceable, "dx", dy, x, dx)
    if traceable:  # fake tensors (no data_ptr), maybe symbolic strides: planned per trace
        call = _call(info, dy, x, weight, lora_A, lora_B, u, z, dx, dora, scaling, dropout_p,
                     need_dx, need_dA, need_dB, need_dm, traceable, tma, base4)  # fmt: skip
    else:
        # everything the launches depend on besides the fresh outputs and workspaces
        # (operand_key of each operand, flattened: this runs on every call)
        key = (info, tma, M, K, N, R, need_dx, need_dA, need_dB, need_dm, float(scaling),
               float(dropout_p), dy.dtype, dy.stride(), x.dtype, x.stride(), weight.dtype,
               weight.stride(), lora_A.dtype, lora_A.stride(), lora_B.dtype, lora_B.stride(),
               u.dtype, u.stride(), seed.dtype, dy.data_ptr() & 15, x.data_ptr() & 15,
               weight.data_ptr() & 15, lora_A.data_ptr() & 15, lora_B.data_ptr() & 15,
               u.data_ptr() & 15, seed.data_ptr() & 15,
               None if base4 is None else base4_key(base4),
               dora and (operand_key(magnitude), operand_key(norm), operand_key(z)))  # fmt: skip
        call = _calls.get(key) or _calls.put(key, _call(
            info, dy, x, weight, lora_A, lora_B, u, z, dx, dora, scaling, dropout_p, need_dx,
            need_dA, need_dB, need_dm, traceable, tma, base4))  # fmt: skip
    dy_spec, dx_spec, reduce_spec, dy_scalars, dx_scalars, reduce_scalars, sizes, serial = call
    ctx = context(traceable)
    f32 = torch.float32
    # g and the partial sums live only through these launches: reused buffers (_workspace)
    g = transient(ctx, "g", dev, x.dtype, sizes[0]) if dx_spec is not None else u
    ws_b = transient(ctx, "dB partials", dev, f32, sizes[1]) if need_dB else u
    ws_m = transient(ctx, "dm partials", dev, f32, sizes[2]) if need_dm else None
    ws_a = transient(ctx, "dA partials", dev, f32, sizes[3]) if need_dA and dx_spec else u
    q_ptrs = _NO_Q if base4 is None else q_pointers(base4)
    mag, nrm = (magnitude, norm) if dora else (None, None)  # LoRA builds never read them
    launch(dy_spec, (dy, lora_B, u, g, ws_b, z if need_dm else None, mag, nrm, ws_m),
           dy_scalars, traceable=traceable, ctx=ctx, key=serial)  # fmt: skip
    if dx_spec is not None:
        launch(dx_spec, (dy, weight, g, lora_A, x, seed, dx if need_dx else x, ws_a, *q_ptrs,
                         mag, nrm),
               dx_scalars, traceable=traceable, ctx=ctx, key=serial)  # fmt: skip
    if reduce_spec is not None:
        launch(reduce_spec, (ws_a, dA if need_dA else ws_a, ws_b, dB if need_dB else ws_b, ws_m,
                             dm, nrm if need_dm else None),
               reduce_scalars, traceable=traceable, ctx=ctx, key=serial)  # fmt: skip
    return dx, dA, dB, dm


def _call(info, dy, x, weight, lora_A, lora_B, u, z, dx, dora, scaling, dropout_p, need_dx,
          need_dA, need_dB, need_dm, traceable, tma, base4):  # fmt: skip
    """The launches of a backward call, their scalar arguments, the workspace sizes
    (elements of g, the dB, dm and dA partials) and a serial (``launch``'s key), for
    ``_backward``'s key; ``info``: (arch, SMs)."""
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    arch, sms = info
    dx_arg = dx if need_dx else x  # never written when COMPUTE_DX=False
    if tma is None:
        tma = not traceable and use_tma(arch, dy, x, dx_arg, *(() if base4 else (weight,)))
    base, _, w_strides, q_sizes = w_arguments(weight, base4, K, tma)
    dy_spec, dx_spec, reduce_spec, parts_a, parts_b = _plan(
        M, N, K, R, dot_precision(x.dtype), x.dtype.itemsize, need_dx, need_dA, need_dB,
        dropout_p > 0.0, tma, sms, base, q_sizes, dora, need_dm,
    )  # fmt: skip
    parts_m = dy_spec.grid[0] if need_dm else 0
    g_strides = (R, 1) if dx_spec is not None else u.stride()  # g: [M, R] row-major
    dy_scalars = (M, N, R, *dy.stride(), *lora_B.stride(), *u.stride(), *g_strides, N * R, R,
                  z.stride(0) if need_dm else 0, float(scaling))  # fmt: skip
    dx_scalars = None
    if dx_spec is not None:
        dx_scalars = (M, N, K, R, *dy.stride(), *w_strides, *g_strides, *lora_A.stride(),
                      *x.stride(), *dx_arg.stride(), R * K, K, float(dropout_p),
                      dx_spec.grid[0])  # fmt: skip
    na, nb = (R * K if need_dA else 0), (N * R if need_dB else 0)
    progs_a = _configs.cdiv(na, _configs.REDUCE_BLOCK)
    reduce_scalars = (na, parts_a, nb, parts_b, progs_a, N if need_dm else 0, parts_m,
                      progs_a + _configs.cdiv(nb, _configs.REDUCE_BLOCK))  # fmt: skip
    sizes = (M * R, parts_b * N * R, parts_m * N, parts_a * R * K)
    return (dy_spec, dx_spec, reduce_spec, dy_scalars, dx_scalars, reduce_scalars, sizes,
            next_serial())


@functools.lru_cache(maxsize=1024)
def _plan(M, N, K, R, prec, esize, need_dx, need_dA, need_dB, has_dropout, tma, sms,
          base="dense", q_sizes=(None, None), dora=False, need_dm=False):
    """The launches of a backward call (dy, dx or None, reduce or None) and the partial
    counts of dA and dB, per shape."""
    r_pad = _configs.pad_rank(R)
    kind = _configs.operand_kind(esize, prec)
    need_g = need_dx or need_dA
    adapter = "dora" if dora else "lora"
    c = _configs.pick("dy", kind, r_pad, M, 1, sms, tma, adapter=adapter)
    parts_b = _configs.cdiv(M, c.block_m) if need_dB else 0
    dy_spec = LaunchSpec(
        _lora_dy_kernel, (_configs.cdiv(M, c.block_m),),
        dict(WRITE_G=need_g, NEED_DB=need_dB, R_PAD=r_pad, DOT_PRECISION=prec, USE_TMA=tma,
             BLOCK_M=c.block_m, BLOCK_N=c.block_n, ADAPTER=adapter, NEED_DM=need_dm),
        c.num_warps, c.num_stages,
    )  # fmt: skip
    dx_spec, parts_a = None, 0
    if need_g:
        variant = _configs.adapter_variant(dora, has_dropout)
        # a variant with no TMA tile (DoRA's tf32 dx) runs the pointer build of the kernel
        # dA alone (no dx) has no W main loop: the dense tiles, whatever the base
        tiles_of = base if need_dx else "dense"
        tma = tma and bool(_configs.configs_for("dx", kind, r_pad, tma=True, adapter=variant,
                                                base=tiles_of))  # fmt: skip
        c = _configs.pick("dx", kind, r_pad, M, K, sms, tma, adapter=variant, base=tiles_of)
        parts_a = _configs.cdiv(M, c.block_m) if need_dA else 0
        tiles = _configs.cdiv(M, c.block_m) * _configs.cdiv(K, c.block_k)
        dx_spec = LaunchSpec(
            _lora_dx_kernel, (min(tiles, sms) if tma else tiles,),
            dict(COMPUTE_DX=need_dx, NEED_DA=need_dA, HAS_DROPOUT=has_dropout, R_PAD=r_pad,
                 DOT_PRECISION=prec, USE_TMA=tma,
                 BASE=("dense_tma" if tma else "dense") if base == "dense" else base,
                 BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                 GROUP_M=_configs.GROUP_M, FLATTEN=tma and c.flatten, EPI_SPLIT=2 if tma else 1,
                 Q_BLOCKSIZE=q_sizes[0], Q_NESTED_BLOCKSIZE=q_sizes[1], ADAPTER=adapter),
            c.num_warps, c.num_stages,
        )  # fmt: skip
    reduce_spec = None
    if need_dA or need_dB or need_dm:
        block = _configs.REDUCE_BLOCK
        na, nb = (R * K if need_dA else 0), (N * R if need_dB else 0)
        nm = N if need_dm else 0
        cr = _configs.configs_for("reduce", kind, r_pad)[0]
        reduce_spec = LaunchSpec(
            _lora_reduce_kernel,
            (_configs.cdiv(na, block) + _configs.cdiv(nb, block) + _configs.cdiv(nm, block),),
            dict(BLOCK=block, HAS_DM=need_dm), cr.num_warps, cr.num_stages,
        )  # fmt: skip
    return dy_spec, dx_spec, reduce_spec, parts_a, parts_b
