"""The 4-bit base (bitsandbytes NF4/FP4): a tile loader the GEMM mainloops call, and a
standalone decode of the whole weight built on it.

Layout (bitsandbytes ``quantize_4bit``): the [N, K] weight is flattened row-major; element
``i = n*K + k`` is the 4-bit code in byte ``i // 2`` (high nibble when ``i`` is even), scaled
by ``absmax[i // blocksize]`` (fp32).  Under double quantization ("nested") the absmax is
itself stored as uint8 codes into a 256-entry fp32 table, with one fp32 scale per
``nested_blocksize`` (256) of them and one fp32 offset:

    absmax[j] = code2[q[j]] * absmax2[j // nested_blocksize] + offset
    W[n, k]   = table[code(i)] * absmax[i // blocksize]      (fp32, then the compute dtype)

which is bitsandbytes' ``dequantize_4bit`` step for step.  ``BASE`` picks the code table
(1: NF4, 2: FP4; 0 is the dense base, which never reaches this file).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

BASE_NF4 = 1
BASE_FP4 = 2
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
def load_4bit_tile(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    rows, cols, mask, K, blocksize, nested_blocksize,
    BASE: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """``W[rows, cols]`` decoded to fp32, 0 where ``mask`` is false.

    ``rows`` (output features n) and ``cols`` (input features k) are int64 index tensors
    that broadcast to the tile's shape, in either orientation: a forward mainloop asks for
    ``W^T`` tiles [BLOCK_K, BLOCK_N] with ``rows = offs_n[None, :]``, ``cols = offs_k[:, None]``,
    the dx mainloop for ``W`` tiles [BLOCK_N, BLOCK_K].  Reads half a byte per element plus
    one absmax per ``blocksize`` elements (cached: neighbouring elements share it)."""
    idx = rows * K + cols
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where((idx % 2) == 0, byte >> 4, byte & 15)
    if BASE == 1:
        value = nf4_value(code)
    else:
        value = fp4_value(code)
    block = idx // blocksize
    if NESTED:
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
    BASE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[N, K] = W decoded into out's dtype; one program per [BLOCK_N, BLOCK_K] tile."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = load_4bit_tile(
        packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
        offs_n[:, None], offs_k[None, :], mask, K, blocksize, nested_blocksize,
        BASE, NESTED,
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
    BASE: int,
    NESTED: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The whole 4-bit weight decoded: W [N, K] in ``dtype``.

    packed: uint8 [ceil(N*K/2)]; absmax: fp32 [ceil(N*K/blocksize)], or uint8 codes when
    ``NESTED`` with code2: fp32 [256], absmax2: fp32 [ceil(len(absmax)/nested_blocksize)],
    offset: fp32 [1] (all on one device; unused pointers may alias absmax).  The arguments
    are what ``fastlora.bases.Packed4bit.kernel_args()`` returns."""
    N, K = shape
    out = torch.empty((N, K), device=packed.device, dtype=dtype)
    if N == 0 or K == 0:
        return out
    grid = (triton.cdiv(N, DECODE_BLOCK_N), triton.cdiv(K, DECODE_BLOCK_K))
    launch(
        _dequant_4bit_kernel, grid,
        (packed, absmax, code2, absmax2, offset, out,
         N, K, blocksize, nested_blocksize, out.stride(0), out.stride(1)),
        dict(BASE=BASE, NESTED=NESTED, BLOCK_N=DECODE_BLOCK_N, BLOCK_K=DECODE_BLOCK_K),
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out
