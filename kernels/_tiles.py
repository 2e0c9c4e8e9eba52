"""Tile helpers every LoRA kernel shares: the grouped tile order, the base-weight tile
loader and the dropout mask.

Where variants grow (DESIGN.md section 6):
- a **base kind** is a ``BASE`` branch in ``load_w`` (and ``w_source``): dense pointer,
  dense TMA, or bitsandbytes 4-bit NF4/FP4 decoded in registers (``dequant_4bit.py``),
  returning the same dense ``[BLOCK_N, BLOCK_K]`` tile; both GEMM roles (forward
  ``x W^T``, backward ``dy W``) call it, so they pick it up together;
- a new **adapter kind** (DoRA) is an epilogue next to ``lora_epilogue`` in
  ``lora_forward.py`` and a reduction beside dB in the ``dy`` pass of
  ``lora_backward.py``; the main loops stay as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from .dequant_4bit import load_4bit_tile
from .dequant_fp8 import load_fp8_tile

# Philox4x32 gives four 32-bit draws per counter: one call serves 4 adjacent columns.
RNG_COLS_PER_DRAW = 4


@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order (Triton's matmul tutorial): GROUP_M row tiles walk the columns
    together, so the column operand's tiles are reused from L2."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % group_size
    pid_n = (tile % group) // group_size
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.jit
def load_w(
    w_src, n0, k0, N, K, stride_wn, stride_wk,
    BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr = None, Q_NESTED_BLOCKSIZE: tl.constexpr = None,
):  # fmt: skip
    """Base weight tile W[n0 : n0+BLOCK_N, k0 : k0+BLOCK_K] (zero outside W).

    BASE "dense": ``w_src`` is W's pointer, read through its strides (cp.async on sm_80+);
    "dense_tma": ``w_src`` is a tensor descriptor with block [BLOCK_N, BLOCK_K] (TMA);
    "nf4"/"fp4" (+ "_dq" under double quantization): ``w_src`` is the tuple ``w_source``
    builds, and the bitsandbytes 4-bit codes are decoded in registers (fp32; the caller
    casts to the compute dtype), half a byte read per element; ``Q_BLOCKSIZE`` and
    ``Q_NESTED_BLOCKSIZE`` are its quantization blocksizes;
    "e4m3"/"e4m3_tma": ``w_src`` is (codes pointer or descriptor, scale pointer), the FP8
    codes decoded in registers (fp32, ``dequant_fp8.py``), one byte read per element;
    ``Q_BLOCKSIZE`` and ``Q_NESTED_BLOCKSIZE`` are the scale block's rows and columns."""
    if BASE == "dense_tma":
        w = w_src.load([tl.cast(n0, tl.int32), tl.cast(k0, tl.int32)])  # TMA coordinates are 32-bit
    elif BASE == "e4m3" or BASE == "e4m3_tma":
        w = load_fp8_tile(w_src[0], w_src[1], n0, k0, N, K, BASE, BLOCK_N, BLOCK_K,
                          Q_BLOCKSIZE, Q_NESTED_BLOCKSIZE)  # fmt: skip
    elif BASE != "dense":
        w = load_4bit_tile(
            w_src[0], w_src[1], w_src[2], w_src[3], w_src[4], n0, k0, N, K,
            BASE, BLOCK_N, BLOCK_K, Q_BLOCKSIZE, Q_NESTED_BLOCKSIZE,
        )  # fmt: skip
    else:
        # int64: offs_n * stride_wn passes 2**31 on vocabulary-sized W (N*K > 2**31)
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_src + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0,
        )  # fmt: skip
    return w


@triton.jit
def w_source(
    w_ptr, q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, N, K, stride_wn,
    BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """What ``load_w`` reads W from: a tensor descriptor ("dense_tma"), W's pointer
    ("dense"), for an FP8 base (codes, scales), or for a 4-bit base the tuple (packed codes, absmax, nested code table,
    nested absmax, offset); the ``q_`` pointers are None for the dense kinds (constexpr:
    the dense kernels keep their parameter list)."""
    if BASE == "dense_tma":
        src = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
    elif BASE == "e4m3_tma":  # 1-byte codes through TMA (K % 16 == 0: 16-byte row stride)
        src = (tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K]),
               q_absmax_ptr)  # fmt: skip
    elif BASE == "e4m3":
        src = (w_ptr, q_absmax_ptr)
    elif BASE == "dense":
        src = w_ptr
    else:
        src = (w_ptr, q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr)
    return src


@triton.jit
def load_rows(
    src, m0, c0, M, C, stride_m, stride_c,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Activation tile src[m0 : m0+BLOCK_M, c0 : c0+BLOCK_C] (x or dy), zero outside;
    ``src`` is a tensor descriptor when USE_TMA, else a pointer."""
    if USE_TMA:
        t = src.load([tl.cast(m0, tl.int32), tl.cast(c0, tl.int32)])
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        t = tl.load(
            src + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c,
            mask=(offs_m[:, None] < M) & (offs_c[None, :] < C), other=0.0,
        )  # fmt: skip
    return t


@triton.jit
def store_rows(
    dst, val, m0, c0, M, C, stride_m, stride_c,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """Store an fp32 tile [BLOCK_M, BLOCK_C] at dst[m0, c0] in dst's dtype.  With TMA the
    tile goes out in EPI_SPLIT column subtiles, so each staging buffer is small and the
    store of one overlaps the conversion of the next."""
    if USE_TMA:
        m0 = tl.cast(m0, tl.int32)
        c0 = tl.cast(c0, tl.int32)
        if EPI_SPLIT == 2:
            halves = tl.permute(tl.reshape(val, (BLOCK_M, 2, BLOCK_C // 2)), (0, 2, 1))
            v0, v1 = tl.split(halves)
            dst.store([m0, c0], v0.to(dst.dtype))
            dst.store([m0, c0 + BLOCK_C // 2], v1.to(dst.dtype))
        else:
            dst.store([m0, c0], val.to(dst.dtype))
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(
            dst + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c,
            val.to(dst.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_c[None, :] < C),
        )  # fmt: skip


@triton.jit
def dropout_keep(seed, offs_m, k0, p, BLOCK_K: tl.constexpr):
    """Keep mask [BM, BLOCK_K] for rows offs_m and columns k0 .. k0 + BLOCK_K (k0 a
    multiple of 4): element (row, col) keeps iff Philox4x32-10(seed; col // 4, row, 0, 0)
    [(0, 2, 1, 3)[col % 4]], as a uniform in [0, 1), is >= p (the lane order is what the
    two nested joins below give).

    Row and column group are separate 32-bit counters, so the stream never wraps for
    M*K >= 2**31 (it needs M, K < 2**32) and no int64 product is formed; the same
    (seed, row, col) gives the same bit in every kernel, whatever its tiling."""
    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    zero = (offs_m[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    rows = offs_m[:, None].to(tl.uint32) + zero
    cols = groups[None, :].to(tl.uint32) + zero
    r0, r1, r2, r3 = philox(seed, cols, rows, zero, zero)
    # join stacks on a new last axis: [BM, BK/4, 2 (j), 2 (i)] holds r_(2i+j), so column
    # 4g + 2j + i takes draw r_(2i+j) of group g: lanes 0, 2, 1, 3 (tests/philox.py)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (offs_m.shape[0], BLOCK_K))
    return uint_to_uniform_float(bits) >= p


@triton.jit
def apply_dropout(x, seed, offs_m, k0, p, BLOCK_K: tl.constexpr):
    """D(x) = x * m / (1-p) on a [BM, BLOCK_K] tile, in x's dtype."""
    keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
    return tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)
