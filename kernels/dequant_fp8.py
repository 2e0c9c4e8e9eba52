"""The FP8 base (e4m3 codes with block scales, as FP8 checkpoints ship): a tile loader the
GEMM mainloops call, and a standalone decode of the whole weight built on it (the
"decode once, then the dense kernels" candidate at large M).

Layout: codes uint8 [N, K] (float8_e4m3fn bits, row-major), scales fp32
[ceil(N/QBN), ceil(K/QBK)] (QBN = QBK = 128 in the checkpoints):

    W[n, k] = e4m3(codes[n, k]) * scale[n // QBN, k // QBK]      (fp32, then the compute dtype)

The codes are decoded with integer operations (no fp8 type needed, so the interpreter runs
the same code): e4m3fn is 1 sign, 4 exponent (bias 7), 3 mantissa bits with subnormals;
``(code & 0x7F) << 7`` is the float16 bit pattern of ``|value| * 2**-8`` (bias 15, 10
mantissa bits, subnormals onto subnormals), so ``fp16(bits) * (256 * scale)`` is exact up
to the one fp32 rounding of the product. 0x7F/0xFF are NaN (e4m3fn has no infinities).
``BASE`` (a constexpr string, as in ``_tiles.load_w``): "e4m3" (pointer loads) or
"e4m3_tma" (the codes through a tensor descriptor: 1-byte TMA loads on sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import LaunchSpec, context, launch, transient

BASES_FP8 = ("e4m3", "e4m3_tma")
# the standalone decode's tile
DECODE_BLOCK_N = 32
DECODE_BLOCK_K = 128
# TMA needs 16-byte aligned row strides: K % 16 == 0 for 1-byte codes
TMA_ALIGN_CODES = 16


@triton.jit
def e4m3_half(byte):
    """float16 of ``value * 2**-8`` for e4m3fn bytes (uint8, any shape): integer operations
    on 16 bits, NaN (0x7F, 0xFF) re-encoded as float16 NaN 0x7E00 without a select."""
    code = byte.to(tl.int16) & 0xFF
    mag = code & 0x7F
    bits = (mag << 7) + ((mag + 1) >> 7) * 0x3E80  # 0x7F << 7 = 0x3F80 -> 0x7E00
    bits = bits | ((code & 0x80) << 8)  # the sign to bit 15
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def load_fp8_tile(
    w_src, scale_ptr, n0, k0, N, K,
    BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QBN: tl.constexpr, QBK: tl.constexpr,
):  # fmt: skip
    """``W[n0 : n0+BLOCK_N, k0 : k0+BLOCK_K]`` decoded to fp32 (0 outside W).

    ``w_src``: the codes' uint8 pointer ("e4m3"; row stride K) or a tensor descriptor over
    them with block [BLOCK_N, BLOCK_K] ("e4m3_tma"). One scale per row when the tile's
    columns sit in one scale block (QBK a multiple of BLOCK_K, k0 a multiple of BLOCK_K:
    the launchers' configs), else one per element, gathered from the small scale array."""
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    if BASE == "e4m3_tma":
        byte = w_src.load([tl.cast(n0, tl.int32), tl.cast(k0, tl.int32)])  # zero-filled edges
    else:
        byte = tl.load(w_src + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0)
    value = e4m3_half(byte).to(tl.float32)
    scale_cols = tl.cdiv(K, QBK)
    # the 2**8 the float16 re-encoding took off goes onto the scale; masked-off codes are 0
    # (and TMA zero-fills), so the tile is 0 outside W without a select
    if QBK % BLOCK_K == 0:
        scale = tl.load(scale_ptr + (offs_n // QBN) * scale_cols + k0 // QBK, mask=mask_n,
                        other=0.0)[:, None]  # fmt: skip
    else:
        scale = tl.load(scale_ptr + (offs_n // QBN)[:, None] * scale_cols + (offs_k // QBK)[None, :],
                        mask=mask, other=0.0)  # fmt: skip
    return value * (scale * 256.0)


@triton.jit
def _dequant_fp8_kernel(
    codes_ptr, scale_ptr, out_ptr, N, K, stride_on, stride_ok,
    QBN: tl.constexpr, QBK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[N, K] = W decoded into out's dtype; one program per [BLOCK_N, BLOCK_K] tile."""
    n0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    w = load_fp8_tile(codes_ptr, scale_ptr, n0, k0, N, K, "e4m3", BLOCK_N, BLOCK_K, QBN, QBK)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
        w.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
    )  # fmt: skip


def dequantize_fp8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    traceable: bool = False,
) -> torch.Tensor:
    """The whole FP8 weight decoded: W [N, K] in ``dtype`` (into ``out`` when given, e.g. a
    reused workspace). codes: uint8 [N, K]; scale: fp32 [ceil(N/bn), ceil(K/bk)]; the
    arguments are what ``fastlora.bases.BlockFp8.kernel_args()`` returns. ``traceable``:
    launch through wrap_triton (inside a triton_op)."""
    N, K = codes.shape
    if out is None:
        out = torch.empty((N, K), device=codes.device, dtype=dtype)
    if N == 0 or K == 0:
        return out
    grid = (triton.cdiv(N, DECODE_BLOCK_N), triton.cdiv(K, DECODE_BLOCK_K))
    spec = LaunchSpec(_dequant_fp8_kernel, grid,
                      dict(QBN=block_size[0], QBK=block_size[1], BLOCK_N=DECODE_BLOCK_N,
                           BLOCK_K=DECODE_BLOCK_K), 4, 1)  # fmt: skip
    launch(spec, (codes, scale, out), (N, K, out.stride(0), out.stride(1)), traceable=traceable)
    return out


def decoded_weight(base4: dict, dtype: torch.dtype, traceable: bool = False) -> torch.Tensor:
    """An FP8 base (``base4`` = ``BlockFp8.kernel_args()``) decoded in one launch into a
    buffer reused by later calls on the same stream (a fresh one under CUDA graph capture or
    tracing): W [N, K] in ``dtype``, for the dense kernels ("decode once")."""
    codes = base4["codes"]
    N, K = codes.shape
    out = transient(context(traceable), "decoded W", codes.device, dtype, N * K)
    return dequantize_fp8(codes, base4["absmax"], (base4["blocksize"], base4["nested_blocksize"]),
                          dtype, out[: N * K].view(N, K), traceable=traceable)  # fmt: skip
