"""LoRA candidates beside today's ``lora_forward`` / ``lora_backward`` ("fused").  The
dispatcher times them per shape bucket.  The Triton ones run 3 launches (4 on a 4-bit base:
its decode first).

    dx_gemm     row dy pass (``_lora_dy_kernel``: g, dB partials) -> dx as a pure GEMM with
                the low-rank step first (``_lora_dx_gemm_kernel``; on sm_90 128 x 256 tiles at
                p = 0, 128 x 128 over two warpgroups with dropout) -> tail (dA from one
                skinny pass over x, dB partials summed)
    split_dy    the same with the 2-D dy pass (``_lora_dy_split_kernel``: fp32 g partials,
                fewer dB partials) in place of the row pass
    decode_once today's fused kernels on a 4-bit base decoded once per call into a reused
                workspace (``decode_once``): a dense main loop instead of a decode per tile

Hybrids: the skinny GEMMs (one operand of width r, bound by reading x or dy once) on
cuBLAS, where a Triton streaming pass is weak; the Triton fusion kept where it saves HBM
traffic (u B^T starting the forward GEMM's accumulator, g A as dx's first K step):

    cublas_shrink   forward: u = s D(x) A^T by cuBLAS (D(x) by ``dropout_apply``, the
                    kernels' Philox, when p > 0), then the fused forward GEMM with that u
    dx_gemm_cublas  backward: g = s dy B and dB = dy^T u by cuBLAS, dx by the dx_gemm
                    kernel; dA = g^T x by cuBLAS at p = 0, by the tail kernel when p > 0
                    (the mask regenerated in registers: D(x) never written)

Not a candidate: warp specialization of the dx tile loop (``WARP_SPEC`` of the dx GEMM
kernel).  Triton 3.9 specializes it on sm_90 only with 4 warps, no flattening and every
load in the loop a descriptor load (g and A too; a pointer load aborts its pass with
"unsupported load type for producer commit"); the sm_90 PTX then differs (``setmaxnreg``,
named barriers) but the consumer's wgmma waits with depth 0 in every config tried, and the
pass fails outright on some tiles without dropout.  It stays off until Triton pipelines it.

Every candidate regenerates the forward's dropout mask with ``_tiles.dropout_keep`` (Philox
keyed by seed, row, column), so any forward pairs with any backward.  No atomics; partial
counts follow from the shape: bitwise reproducible per shape.
"""

from __future__ import annotations

import functools

import torch

from . import _configs
from ._launch import CallCache, LaunchSpec, context, current_device_info, dot_precision
from ._launch import launch, next_serial, operand_key, transient
from .dequant_4bit import dequantize_4bit
from .dropout_mask import dropout_apply
from .lora_backward import _lora_dy_kernel, lora_backward
from .lora_dx_gemm import _lora_dx_gemm_kernel, _lora_tail_kernel
from .lora_dy_pass import _lora_dy_split_kernel
from .lora_forward import forward_gemm, lora_forward, use_tma

# the dy pass of each candidate ("row": ``_lora_dy_kernel``, "split": the 2-D pass; "cublas":
# none, g and dB by cuBLAS)
CANDIDATES = {"dx_gemm": "row", "split_dy": "split", "dx_gemm_cublas": "cublas"}
_calls = CallCache()


def decoded_weight(base4: dict, shape: tuple[int, int], dtype: torch.dtype,
                   traceable: bool = False) -> torch.Tensor:
    """A 4-bit base decoded in one launch into a buffer reused by later calls on the same
    stream (``_workspace``; a fresh one under CUDA graph capture or tracing): W [N, K]."""
    N, K = shape
    ctx = context(traceable)
    out = transient(ctx, "decoded W", base4["packed"].device, dtype, N * K)[: N * K].view(N, K)
    return dequantize_4bit(base4["packed"], base4["absmax"], base4["code2"], base4["absmax2"],
                           base4["offset"], shape, base4["blocksize"],
                           base4["nested_blocksize"], base4["BASE"], dtype, out=out,
                           traceable=traceable)  # fmt: skip


def decode_once_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *,
                        traceable=False, tma=None, base4=None):  # fmt: skip
    """``lora_forward`` on a 4-bit base decoded once (``decoded_weight``) into x's dtype;
    a dense base goes straight to ``lora_forward``."""
    if base4 is not None:
        weight = decoded_weight(base4, (lora_B.shape[0], x.shape[1]), x.dtype, traceable)
    return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                        traceable=traceable, tma=tma)


def decode_once_backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                         need_dx=True, need_dA=True, need_dB=True, *, traceable=False,
                         tma=None, base4=None):  # fmt: skip
    """``lora_backward`` on a 4-bit base decoded once into x's dtype (dense: unchanged)."""
    if base4 is not None and need_dx:
        weight = decoded_weight(base4, (lora_B.shape[0], x.shape[1]), x.dtype, traceable)
        base4 = None
    return lora_backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx,
                         need_dA, need_dB, traceable=traceable, tma=tma, base4=base4)


def _candidate(name: str):
    dy_pass = CANDIDATES[name]

    def backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx=True,
                 need_dA=True, need_dB=True, *, traceable=False, tma=None, base4=None):
        return _backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx,
                         need_dA, need_dB, traceable, tma, base4, dy_pass)

    backward.__name__ = backward.__qualname__ = f"{name}_backward"
    backward.__doc__ = (f"The {name!r} backward candidate (module docstring), with "
                        "``lora_backward``'s signature and results.")
    return backward


dx_gemm_backward = _candidate("dx_gemm")
split_dy_backward = _candidate("split_dy")
dx_gemm_cublas_backward = _candidate("dx_gemm_cublas")


def cublas_shrink_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *,
                          traceable=False, tma=None, base4=None):  # fmt: skip
    """The "cublas_shrink" forward (module docstring), with ``lora_forward``'s signature and
    results: u = s D(x) A^T [M, r] in one cuBLAS GEMM (D(x) from the kernels' Philox when
    p > 0: any backward regenerates the same mask), then ``forward_gemm`` with that u."""
    M, R = x.shape[0], lora_A.shape[0]
    xd = x if dropout_p == 0.0 else dropout_apply(x, seed, dropout_p, traceable=traceable)
    u = torch.empty(M, R, device=x.device, dtype=x.dtype)
    # the scale as cuBLAS's alpha (applied to the fp32 sum, as the shrink kernel does): one
    # launch, no scaled copy of A; beta = 0: u's uninitialised contents are never read
    u.addmm_(xd, lora_A.to(x.dtype).t(), beta=0.0, alpha=scaling)
    y = forward_gemm(x, weight, bias, lora_A, lora_B, u, traceable=traceable, tma=tma,
                     base4=base4)
    return y, u


def _backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dA,
              need_dB, traceable, tma, base4, dy_pass):
    """dy: [M, N], x: [M, K], weight: [N, K], lora_A: [r, K], lora_B: [N, r], u: [M, r]
    -> dx [M, K], dA [r, K], dB [N, r] (None where not needed)."""
    if dy_pass == "cublas":
        return _cublas_backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                                need_dx, need_dA, need_dB, traceable, tma, base4)
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    dev = x.device
    dx = torch.empty(M, K, device=dev, dtype=x.dtype) if need_dx else None
    dA = torch.empty(R, K, device=dev, dtype=lora_A.dtype) if need_dA else None
    dB = torch.empty(N, R, device=dev, dtype=lora_B.dtype) if need_dB else None
    if M == 0:
        return dx, dA.zero_() if need_dA else None, dB.zero_() if need_dB else None
    if not (need_dx or need_dA or need_dB):
        return None, None, None
    if base4 is not None and need_dx:
        weight = decoded_weight(base4, (N, K), x.dtype, traceable)
    info = current_device_info()
    if traceable:  # fake tensors (no data_ptr), maybe symbolic strides: planned per trace
        call = _call(info, dy, x, weight, lora_A, lora_B, u, dx, scaling, dropout_p, need_dx,
                     need_dA, need_dB, traceable, tma, dy_pass)  # fmt: skip
    else:
        # everything the launches depend on besides the fresh outputs and workspaces
        key = (info, tma, M, K, N, R, need_dx, need_dA, need_dB, float(scaling),
               float(dropout_p), dy_pass,
               *(operand_key(t) for t in (dy, x, lora_A, lora_B, u, seed)),
               operand_key(weight) if need_dx else None)  # fmt: skip
        call = _calls.get(key) or _calls.put(key, _call(
            info, dy, x, weight, lora_A, lora_B, u, dx, scaling, dropout_p, need_dx, need_dA,
            need_dB, traceable, tma, dy_pass))  # fmt: skip
    dy_spec, dx_spec, tail_spec, dy_scalars, dx_scalars, tail_scalars = call[:6]
    sizes, dy_pass, serial = call[6:]
    ctx = context(traceable)
    f32 = torch.float32
    g_dtype = f32 if dy_pass == "split" else x.dtype
    need_g = need_dx or need_dA
    g = transient(ctx, "g", dev, g_dtype, sizes[0]) if need_g else u
    ws_b = transient(ctx, "dB partials", dev, f32, sizes[1]) if need_dB else u
    if dy_pass == "split":
        dy_tensors = (dy, lora_B, u, g, ws_b)
    else:
        dy_tensors = (dy, lora_B, u, g, ws_b, None, None, None, None)
    launch(dy_spec, dy_tensors, dy_scalars, traceable=traceable, ctx=ctx, key=serial)
    if dx_spec is not None:
        launch(dx_spec, (dy, weight, g, lora_A, seed, dx), dx_scalars, traceable=traceable,
               ctx=ctx, key=serial)  # fmt: skip
    if tail_spec is not None:
        launch(tail_spec, (x, g, seed, dA if need_dA else g, ws_b, dB if need_dB else ws_b),
               tail_scalars, traceable=traceable, ctx=ctx, key=serial)  # fmt: skip
    return dx, dA, dB


def _cublas_backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx,
                     need_dA, need_dB, traceable, tma, base4):
    """The "dx_gemm_cublas" backward: ``_backward``'s arguments and results."""
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    dev = x.device
    # dB = dy^T u: cuBLAS reads dy's transpose in place; an empty M gives zeros
    dB = torch.mm(dy.t(), u).to(lora_B.dtype) if need_dB else None
    if not (need_dx or need_dA):
        return None, None, dB
    # g = s dy B [M, r] in dy's dtype (as the row dy pass writes it), s as cuBLAS's alpha
    g = torch.empty(M, R, device=dev, dtype=dy.dtype)
    g.addmm_(dy, lora_B.to(dy.dtype), beta=0.0, alpha=scaling)
    # with dropout dA = g^T D(x) by the tail kernel (the mask in registers, no D(x) written)
    tail_dA = need_dA and dropout_p > 0.0
    dx = torch.empty(M, K, device=dev, dtype=x.dtype) if need_dx else None
    dA = torch.empty(R, K, device=dev, dtype=lora_A.dtype) if tail_dA else None
    if M > 0 and (need_dx or tail_dA):
        if base4 is not None and need_dx:
            weight = decoded_weight(base4, (N, K), x.dtype, traceable)
        info = current_device_info()
        args = (info, dy, x, weight, lora_A, lora_B, u, dx, scaling, dropout_p, need_dx,
                tail_dA, False, traceable, tma, "cublas")  # fmt: skip
        if traceable:
            call = _call(*args)
        else:
            key = (info, tma, M, K, N, R, need_dx, tail_dA, float(scaling), float(dropout_p),
                   "cublas", *(operand_key(t) for t in (dy, x, lora_A, seed)),
                   operand_key(weight) if need_dx else None)  # fmt: skip
            call = _calls.get(key) or _calls.put(key, _call(*args))
        _, dx_spec, tail_spec, _, dx_scalars, tail_scalars, _, _, serial = call
        ctx = context(traceable)
        if dx_spec is not None:
            launch(dx_spec, (dy, weight, g, lora_A, seed, dx), dx_scalars, traceable=traceable,
                   ctx=ctx, key=serial)  # fmt: skip
        if tail_spec is not None:  # dA only: no dB partials to sum (NB = 0)
            launch(tail_spec, (x, g, seed, dA, g, g), tail_scalars, traceable=traceable,
                   ctx=ctx, key=serial)  # fmt: skip
    elif tail_dA:
        dA.zero_()
    if need_dA and not tail_dA:
        dA = torch.mm(g.t(), x).to(lora_A.dtype)
    return dx, dA, dB


def _call(info, dy, x, weight, lora_A, lora_B, u, dx, scaling, dropout_p, need_dx, need_dA,
          need_dB, traceable, tma, dy_pass):  # fmt: skip
    """Launch specs, scalar arguments, workspace sizes (g, dB partials) and a serial."""
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    arch, sms = info
    if tma is None:
        tma = not traceable and use_tma(arch, dy, x, *((weight, dx) if need_dx else ()))
    dy_spec, dx_spec, tail_spec, parts_g, parts_b, n_per, dy_pass = _plan(
        M, N, K, R, dot_precision(x.dtype), x.dtype.itemsize, need_dx, need_dA, need_dB,
        dropout_p > 0.0, tma, sms, dy_pass)  # fmt: skip
    need_g = need_dx or need_dA
    # g: [parts_g, M, R] row-major (one part, in x's dtype, from the row pass)
    g_strides = (M * R, R, 1)
    if dy_pass == "cublas":
        dy_scalars = None
    elif dy_pass == "split":
        dy_scalars = (M, N, R, n_per, *dy.stride(), *lora_B.stride(), *u.stride(), M * R, R,
                      N * R, R, float(scaling))  # fmt: skip
    else:
        dy_scalars = (M, N, R, *dy.stride(), *lora_B.stride(), *u.stride(),
                      *(g_strides[1:] if need_g else u.stride()), N * R, R, 0, float(scaling))
    dx_scalars = None
    if dx_spec is not None:
        dx_scalars = (M, N, K, R, *dy.stride(), *weight.stride(), *g_strides,
                      *lora_A.stride(), *dx.stride(), float(dropout_p), dx_spec.grid[0])
    tail_scalars = None
    if tail_spec is not None:
        nb = N * R if need_dB else 0
        progs_a = tail_spec.grid[0] - _configs.cdiv(nb, _configs.REDUCE_BLOCK)
        tail_scalars = (M, K, R, nb, parts_b, progs_a, *x.stride(), *g_strides, K,
                        float(dropout_p))  # fmt: skip
    sizes = (parts_g * M * R, parts_b * N * R)
    return (dy_spec, dx_spec, tail_spec, dy_scalars, dx_scalars, tail_scalars, sizes, dy_pass,
            next_serial())


def split_count(M: int, N: int, block_m: int, block_n: int, sms: int) -> int:
    """Column splits of the 2-D dy pass: the fewest giving two programs per SM, each split a
    whole number of BLOCK_N tiles (a function of the shape: the bits depend on it)."""
    tiles_n = _configs.cdiv(N, block_n)
    rows = _configs.cdiv(M, block_m)
    return max(1, min(tiles_n, _configs.cdiv(2 * sms, rows), _configs.MAX_G_PARTS))


@functools.lru_cache(maxsize=1024)
def _plan(M, N, K, R, prec, esize, need_dx, need_dA, need_dB, has_dropout, tma, sms,
          dy_pass):  # fmt: skip
    """(dy spec, dx spec or None, tail spec or None, g parts, dB parts, columns per split)."""
    r_pad = _configs.pad_rank(R)
    kind = _configs.operand_kind(esize, prec)
    need_g = need_dx or need_dA
    if r_pad > _configs.SPLIT_MAX_R_PAD and dy_pass == "split":
        dy_pass = "row"  # (the split pass's readers have tiles up to this rank block)
    if dy_pass == "cublas":  # g [M, r] in x's dtype and dB come from cuBLAS: no dy pass
        dy_spec, parts_g, parts_b, n_per = None, 1, 0, 0
    elif dy_pass == "split":
        # row blocks for a quarter of the SMs: the column splits (up to MAX_G_PARTS) fill it
        c = _configs.pick("dy_split", kind, r_pad, M, 1,
                          max(1, sms // _configs.MAX_G_PARTS), tma)  # fmt: skip
        tiles_n = _configs.cdiv(N, c.block_n)
        split = split_count(M, N, c.block_m, c.block_n, sms) if need_g else 1
        n_per = _configs.cdiv(tiles_n, split) * c.block_n
        split = _configs.cdiv(N, n_per)
        dy_spec = LaunchSpec(
            _lora_dy_split_kernel, (_configs.cdiv(M, c.block_m), split),
            dict(WRITE_G=need_g, NEED_DB=need_dB, R_PAD=r_pad, DOT_PRECISION=prec, USE_TMA=tma,
                 BLOCK_M=c.block_m, BLOCK_N=c.block_n),
            c.num_warps, c.num_stages,
        )  # fmt: skip
        parts_g = split
        parts_b = _configs.cdiv(M, c.block_m) if need_dB else 0
    else:
        c = _configs.pick("dy", kind, r_pad, M, 1, sms, tma)
        dy_spec = LaunchSpec(
            _lora_dy_kernel, (_configs.cdiv(M, c.block_m),),
            dict(WRITE_G=need_g, NEED_DB=need_dB, R_PAD=r_pad, DOT_PRECISION=prec, USE_TMA=tma,
                 BLOCK_M=c.block_m, BLOCK_N=c.block_n),
            c.num_warps, c.num_stages,
        )  # fmt: skip
        parts_g, n_per = 1, 0
        parts_b = _configs.cdiv(M, c.block_m) if need_dB else 0
    dx_spec = None
    if need_dx:
        # tf32 has pointer builds only (see _configs); the TMA build needs aligned operands
        dx_tma = tma and bool(_configs.configs_for("dx_gemm", kind, r_pad, tma=True))
        dx_kernel = "dx_gemm_split" if dy_pass == "split" else "dx_gemm"
        c = _configs.pick(dx_kernel, kind, r_pad, M, K, sms, dx_tma)
        big = [] if has_dropout or dy_pass == "split" else _configs.configs_for(
            "dx_gemm_p0", kind, r_pad, tma=dx_tma)
        # p = 0: the 128 x 256 tile where it still gives every SM a tile
        if big and _configs.cdiv(M, big[0].block_m) * _configs.cdiv(K, big[0].block_k) >= sms:
            c = big[0]
        tiles = _configs.cdiv(M, c.block_m) * _configs.cdiv(K, c.block_k)
        dx_spec = LaunchSpec(
            _lora_dx_gemm_kernel, (min(tiles, sms) if dx_tma else tiles,),
            dict(G_PARTS=parts_g, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec,
                 USE_TMA=dx_tma, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                 GROUP_M=_configs.GROUP_M, EPI_SPLIT=2 if dx_tma else 1, WARP_SPEC=False),
            c.num_warps, c.num_stages,
        )  # fmt: skip
    tail_spec = None
    if need_dA or need_dB:
        c = _configs.pick("tail_split" if dy_pass == "split" else "tail", kind, r_pad, 1, K,
                          sms, tma)
        progs_a = _configs.cdiv(K, c.block_k) if need_dA else 0
        progs_b = _configs.cdiv(N * R, _configs.REDUCE_BLOCK) if need_dB else 0
        tail_spec = LaunchSpec(
            _lora_tail_kernel, (progs_a + progs_b,),
            dict(G_PARTS=parts_g, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec,
                 USE_TMA=tma, BLOCK_M=c.block_m, BLOCK_K=c.block_k,
                 BLOCK=_configs.REDUCE_BLOCK),
            c.num_warps, c.num_stages,
        )  # fmt: skip
    return dy_spec, dx_spec, tail_spec, parts_g, parts_b, n_per, dy_pass
