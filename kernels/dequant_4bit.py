"""The 4-bit base (bitsandbytes NF4/FP4): a tile loader the GEMM mainloops call, and a
standalone decode of the whole weight built on it.

Layout (bitsandbytes ``quantize_4bit``): the [N, K] weight is flattened row-major; element
``i = n*K + k`` is the 4-bit code in byte ``i // 2`` (high nibble when ``i`` is even), scaled
by ``absmax[i // blocksize]`` (fp32).  Under double quantization ("nested") the absmax is
itself stored as uint8 codes into a 256-entry fp32 table, with one fp32 scale per
``nested_blocksize`` (256) of them and one fp32 offset:

    absmax[j] = code2[q[j]] * absmax2[j // nested_blocksize] + offset
    W[n, k]   = table[code(i)] * absmax[i // blocksize]      (fp32, then the compute dtype)

which is bitsandbytes' ``dequantize_4bit`` step for step.  ``BASE`` (a constexpr string,
as in ``_tiles.load_w``) names the kind: "nf4", "fp4", "nf4_dq", "fp4_dq" (double quant).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import LaunchSpec, launch

BASES_4BIT = ("nf4", "fp4", "nf4_dq", "fp4_dq")
# the standalone decode's tile; each program decodes DECODE_BLOCK_N x DECODE_BLOCK_K elements
DECODE_BLOCK_N = 32
DECODE_BLOCK_K = 64


@triton.jit
def nf4_value(code):
    """bitsandbytes' NF4 table (``get_4bit_type("nf4")``, fp32) at ``code`` in [0, 16):
    a 4-level select tree, registers only (no table in memory)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    b3 = (code & 8) != 0
    p0 = tl.where(b0, -0.6961928009986877, -1.0)
    p1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    p2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    p3 = tl.where(b0, 0.0, -0.09105003625154495)
    p4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    p5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    p6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    p7 = tl.where(b0, 1.0, 0.7229568362236023)
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    q2 = tl.where(b1, p5, p4)
    q3 = tl.where(b1, p7, p6)
    r0 = tl.where(b2, q1, q0)
    r1 = tl.where(b2, q3, q2)
    return tl.where(b3, r1, r0)


@triton.jit
def fp4_value(code):
    """bitsandbytes' FP4 table (1 sign bit, then the magnitudes 0, 1/192, 2/3, 1, 1/3, 1/2,
    1/6, 1/4 in bit-pattern order, fp32) at ``code`` in [0, 16)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    p0 = tl.where(b0, 0.0052083334885537624, 0.0)
    p1 = tl.where(b0, 1.0, 0.6666666865348816)
    p2 = tl.where(b0, 0.5, 0.3333333432674408)
    p3 = tl.where(b0, 0.25, 0.1666666716337204)
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    mag = tl.where(b2, q1, q0)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask,
            BASE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """fp32 absmax of the quantization blocks ``block`` (any shape), 0 where masked."""
    if BASE == "nf4_dq" or BASE == "fp4_dq":
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
            absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0
        ) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _values(code, BASE: tl.constexpr):
    if BASE == "nf4" or BASE == "nf4_dq":
        value = nf4_value(code)
    else:
        value = fp4_value(code)
    return value


@triton.jit
def load_4bit_tile(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, n0, k0, N, K,
    BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """``W[n0 : n0+BLOCK_N, k0 : k0+BLOCK_K]`` decoded to fp32 (0 outside W), for K a
    multiple of ``BLOCKSIZE`` (a quantization block never straddles two rows; the launchers
    send other shapes to the composition) and k0 a multiple of BLOCK_K.

    ``BASE``: "nf4" or "fp4", "_dq" appended under double quantization.  Reads the tile's
    BLOCK_N x BLOCK_K/2 packed bytes (contiguous per row), split into the high (even k) and
    low (odd k) nibbles and interleaved, and one absmax per row and ``BLOCKSIZE`` columns
    (a single one per row when BLOCKSIZE >= BLOCK_K), broadcast over its columns."""
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    byte = tl.load(
        packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
        mask=mask_n[:, None] & (offs_b[None, :] < K // 2), other=0,
    ).to(tl.int32)  # fmt: skip
    code = tl.interleave(byte >> 4, byte & 15)  # [BLOCK_N, BLOCK_K]: k even -> high nibble
    value = _values(code, BASE)
    blocks_per_row = K // BLOCKSIZE
    if BLOCKSIZE >= BLOCK_K:
        block = offs_n * blocks_per_row + k0 // BLOCKSIZE
        scale = _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask_n, BASE,
                        NESTED_BLOCKSIZE)[:, None]  # fmt: skip
    else:
        GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_g = k0 // BLOCKSIZE + tl.arange(0, GROUPS)
        block = offs_n[:, None] * blocks_per_row + offs_g[None, :]
        g = _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                    mask_n[:, None] & (offs_g[None, :] < blocks_per_row), BASE,
                    NESTED_BLOCKSIZE)  # fmt: skip
        scale = tl.reshape(tl.broadcast_to(g[:, :, None], (BLOCK_N, GROUPS, BLOCKSIZE)),
                           (BLOCK_N, BLOCK_K))  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.where(mask_n[:, None] & (offs_k[None, :] < K), value * scale, 0.0)


@triton.jit
def load_4bit_any(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    rows, cols, mask, K, blocksize, nested_blocksize, BASE: tl.constexpr,
):  # fmt: skip
    """``W[rows, cols]`` decoded to fp32 for any shape (blocks may straddle rows, K odd):
    one gathered byte and absmax per element.  The standalone decode's path; the GEMMs
    use ``load_4bit_tile``."""
    idx = rows * K + cols
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where((idx % 2) == 0, byte >> 4, byte & 15)
    value = _values(code, BASE)
    block = idx // blocksize
    if BASE == "nf4_dq" or BASE == "fp4_dq":
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
            absmax2_ptr + block // nested_blocksize, mask=mask, other=0.0
        ) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
    N, K, blocksize, nested_blocksize, stride_on, stride_ok,
    BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[N, K] = W decoded into out's dtype; one program per [BLOCK_N, BLOCK_K] tile."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = load_4bit_any(
        packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
        offs_n[:, None], offs_k[None, :], mask, K, blocksize, nested_blocksize, BASE,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
        w.to(out_ptr.dtype.element_ty), mask=mask,
    )  # fmt: skip


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    nested_blocksize: int,
    BASE: str,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """The whole 4-bit weight decoded: W [N, K] in ``dtype``.

    packed: uint8 [ceil(N*K/2)]; absmax: fp32 [ceil(N*K/blocksize)], or uint8 codes when
    ``BASE`` ends in "_dq" (double quantization) with code2: fp32 [256], absmax2: fp32 [ceil(len(absmax)/nested_blocksize)],
    offset: fp32 [1] (all on one device; unused pointers may alias absmax).  The arguments
    are what ``fastlora.bases.Packed4bit.kernel_args()`` returns.  ``out``: an [N, K]
    ``dtype`` tensor to decode into (a reused workspace), else a new one; ``traceable``:
    launch through wrap_triton (inside a triton_op)."""
    N, K = shape
    if out is None:
        out = torch.empty((N, K), device=packed.device, dtype=dtype)
    elif tuple(out.shape) != (N, K) or out.dtype != dtype:
        raise ValueError(f"dequantize_4bit: out must be [{N}, {K}] {dtype}, got "
                         f"{list(out.shape)} {out.dtype}")
    if N == 0 or K == 0:
        return out
    grid = (triton.cdiv(N, DECODE_BLOCK_N), triton.cdiv(K, DECODE_BLOCK_K))
    spec = LaunchSpec(_dequant_4bit_kernel, grid,
                      dict(BASE=BASE, BLOCK_N=DECODE_BLOCK_N, BLOCK_K=DECODE_BLOCK_K), 4, 1)
    launch(spec, (packed, absmax, code2, absmax2, offset, out),
           (N, K, blocksize, nested_blocksize, out.stride(0), out.stride(1)),
           traceable=traceable)
    return out
