"""LoRA forward: ``y = x W^T + b + s * D(x) A^T B^T`` in two launches.

    shrink   u = s * D(x) A^T             [M, r]   dropout applied in registers
    forward  y = x W^T + b + u B^T        [M, N]   a pure GEMM main loop; u B^T starts the
                                                   accumulator (u and B^T loaded at the
                                                   tile's start), b added in the epilogue,
                                                   one store

D(x) = x * m / (1-p) is never stored: the keep mask m comes from Philox keyed by
(seed, row, column), so the backward regenerates exactly the same mask.  Adapters are
read in their own dtype (PEFT keeps them fp32) and cast in registers: no host-side cast.

Two builds of the same kernels, chosen per call (``use_tma``):
- pointer loads (cp.async pipelines), one program per tile: sm_80, and any arch where a
  stride or base address is not 16-byte aligned;
- on sm_90: persistent programs (grid = SM count, grouped tile order) that load x and W
  and store y through tensor descriptors (TMA), the epilogue stored in subtiles.
- ``warp_spec_forward`` (the "warp_spec" candidate): the TMA build with Triton's warp
  specialization of the tile loop (a producer warp issues every TMA load, u and B^T too,
  through descriptors; the 4 consumer warps run the wgmma and the epilogue).  Triton 3.9
  specializes only a loop whose every load is a descriptor load and fails the pass with
  the low-rank step before the main loop, so there u B^T is the epilogue's first step.
Under torch.compile (``traceable``) the pointer build is launched: the TMA build's
in-kernel descriptors need Triton's per-launch scratch allocator, which code compiled by
Inductor is not known to provide (not testable without a GPU).
An FP8 base decodes its codes in the main loop only where that build is spill-free and,
on sm_90, loads them through TMA (``fp8_fused_ok``); any other call decodes W once into a
reused workspace and runs the dense kernels.
A new base kind is a ``BASE`` branch of ``_tiles.load_w``; a new adapter epilogue goes
beside ``lora_epilogue``.

DoRA (``dora_forward``, ``ADAPTER="dora"``, dense base): the same two launches; the GEMM's
epilogue stores the pre-scale output z and writes y with the column scale m / norm, and
with dropout a second accumulator D(x) W^T runs on the main loop's W tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._launch import CallCache, LaunchSpec, base4_key, context, current_device_info
from ._launch import dot_precision, launch, next_serial, operand_key
from ._tiles import RNG_COLS_PER_DRAW, apply_dropout, dropout_keep, load_rows, load_w
from ._tiles import store_rows, tile_coords, w_source
from .dequant_fp8 import BASES_FP8, TMA_ALIGN_CODES, decoded_weight

__all__ = ["RNG_COLS_PER_DRAW", "dora_forward", "dropout_keep", "forward_gemm", "lora_forward",
           "use_tma", "warp_spec_forward"]

# TMA: 16-byte aligned base addresses and row strides, unit last stride (CUDA's
# cuTensorMapEncodeTiled rules for a 2-D tensor).
TMA_ALIGN = 16
# per-call plans (``_forward``): launches, TMA decision and scalar arguments by key
_calls = CallCache()


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
    scaling, dropout_p,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """u[M, r] = s * D(x) A^T; one program per BLOCK_M rows, loop over K."""
    dtype = x_ptr.dtype.element_ty
    s = tl.cast(scaling, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    if USE_TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    else:
        x_src = x_ptr
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M, BLOCK_K)
        if HAS_DROPOUT:
            x = apply_dropout(x, seed, offs_m, k0, p, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0,
        ).to(dtype)  # [BLOCK_K, R_PAD]: A^T in x's dtype, cast in registers
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    tl.store(
        u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
        (acc * s).to(u_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )  # fmt: skip


@triton.jit
def lora_epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr):
    """LoRA epilogue on the fp32 [BM, BN] tile (u B^T is already in it: the kernel starts
    the accumulator with that R_PAD-deep step): + b.  An adapter that scales the output
    (DoRA's m / ||W + s B A||) applies its column scale here."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def dora_scale(mag_ptr, norm_ptr, offs_n, N):
    """DoRA's column scale c = m / norm [BLOCK_N] in fp32 (zero outside N)."""
    mask_n = offs_n < N
    m = tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return m / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)


@triton.jit
def dora_epilogue(acc, z, c, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):  # fmt: skip
    """DoRA epilogue, after the pre-scale output z = D(x) W^T + u B^T was stored (acc =
    x W^T + u B^T): y = acc + (c - 1) z + b with dropout, y = c z + b without (z is acc)."""
    if HAS_DROPOUT:
        y = acc + (c[None, :] - 1.0) * z
    else:
        y = c[None, :] * z
    return lora_epilogue(y, bias_ptr, offs_n, N, HAS_BIAS)


@triton.jit
def _lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
    q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr,
    z_ptr, mag_ptr, norm_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
    stride_bn, stride_br, stride_ym, stride_yn,
    dropout_p, NUM_PROGS,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr, Q_NESTED_BLOCKSIZE: tl.constexpr,
    ADAPTER: tl.constexpr = "lora", HAS_DROPOUT: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
):  # fmt: skip
    """y[M, N] = x W^T + b + u B^T.  Programs walk tiles tile = pid, pid + NUM_PROGS, ...
    (NUM_PROGS = tile count without TMA: one tile each).

    WARP_SPEC (TMA build, dense base, LoRA): the tile loop warp-specialized, u [M, r] and
    B [N, r] read through descriptors (16-byte aligned rows), u B^T added after the main
    loop.

    ADAPTER "dora" (dense base): also z [M, N] (y's strides) and DoRA's epilogue; with
    HAS_DROPOUT the main loop runs a second accumulator D(x) W^T on the same W tiles (mask
    in registers), started, like the first, with u B^T."""
    dtype = x_ptr.dtype.element_ty
    if USE_TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        y_dst = tl.make_tensor_descriptor(
            y_ptr, [M, N], [stride_ym, 1], [BLOCK_M, BLOCK_N // EPI_SPLIT]
        )  # fmt: skip
        if ADAPTER == "dora":
            z_dst = tl.make_tensor_descriptor(
                z_ptr, [M, N], [stride_ym, 1], [BLOCK_M, BLOCK_N // EPI_SPLIT]
            )  # fmt: skip
    else:
        x_src = x_ptr
        y_dst = y_ptr
        z_dst = z_ptr
    if ADAPTER == "dora" and HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        p = tl.cast(dropout_p, tl.float32)
    w_src = w_source(w_ptr, q_absmax_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, N, K,
                     stride_wn, BASE, BLOCK_N, BLOCK_K)  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    if WARP_SPEC:  # every load of the specialized loop through a descriptor
        u_src = tl.make_tensor_descriptor(u_ptr, [M, R], [stride_um, 1], [BLOCK_M, R_PAD])
        b_src = tl.make_tensor_descriptor(b_ptr, [N, R], [stride_bn, 1], [BLOCK_N, R_PAD])
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS, flatten=FLATTEN,
                         warp_specialize=WARP_SPEC):  # fmt: skip
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # the low-rank step first, into the fresh accumulator: u and B^T are loaded at the
        # tile's start (not after the main loop) and their registers are free before it
        # (warp-specialized: loaded by the producer, zero past [M, r] and [N, r])
        if WARP_SPEC:
            u = u_src.load([tl.cast(m0, tl.int32), 0])
            b_t = b_src.load([tl.cast(n0, tl.int32), 0]).to(dtype).T
        else:
            u = tl.load(
                u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0,
            )  # fmt: skip
            b_t = tl.load(
                b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0,
            ).to(dtype)  # [R_PAD, BLOCK_N]: B^T in x's dtype, cast in registers
        if WARP_SPEC:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M,
                              BLOCK_K)  # fmt: skip
                w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K)
                acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
            # after the main loop: the specialization pass fails with it before
            acc = tl.dot(u, b_t, acc, input_precision=DOT_PRECISION)
        elif BASE == "dense" or BASE == "dense_tma":
            acc = tl.dot(u, b_t, input_precision=DOT_PRECISION)
            if ADAPTER == "dora" and HAS_DROPOUT:
                acc_d = acc  # z's accumulator: u B^T + D(x) W^T
            for k0 in range(0, K, BLOCK_K):
                x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M,
                              BLOCK_K)  # fmt: skip
                w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K)
                acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
                if ADAPTER == "dora" and HAS_DROPOUT:
                    # D(x) W^T on the same W tile: no second pass over W
                    xd = apply_dropout(x, seed, offs_m, k0, p, BLOCK_K)
                    acc_d = tl.dot(xd, w.T, acc_d, input_precision=DOT_PRECISION)
        else:
            # a decoded 4-bit W lives in registers: it is the MMA's A operand (wgmma takes A
            # from registers, B only from shared memory), so the tile is y^T = W x^T
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = load_rows(x_src, m0, k0, M, K, stride_xm, stride_xk, USE_TMA, BLOCK_M,
                              BLOCK_K)  # fmt: skip
                w = load_w(w_src, n0, k0, N, K, stride_wn, stride_wk, BASE, BLOCK_N, BLOCK_K,
                           Q_BLOCKSIZE, Q_NESTED_BLOCKSIZE)
                acc_t = tl.dot(w.to(dtype), x.T, acc_t, input_precision=DOT_PRECISION)
            acc = tl.dot(u, b_t, acc_t.T, input_precision=DOT_PRECISION)
        if ADAPTER == "dora":
            c = dora_scale(mag_ptr, norm_ptr, offs_n, N)
            if HAS_DROPOUT:
                z = acc_d
            else:
                z = acc
            store_rows(z_dst, z, m0, n0, M, N, stride_ym, stride_yn, USE_TMA, BLOCK_M, BLOCK_N,
                       EPI_SPLIT)  # fmt: skip
            acc = dora_epilogue(acc, z, c, bias_ptr, offs_n, N, HAS_BIAS, HAS_DROPOUT)
        else:
            acc = lora_epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS)
        store_rows(y_dst, acc, m0, n0, M, N, stride_ym, stride_yn, USE_TMA, BLOCK_M, BLOCK_N,
                   EPI_SPLIT)  # fmt: skip


def w_arguments(weight: torch.Tensor, base4: dict | None, K: int, tma: bool):
    """(BASE, the four ``q_`` pointers, W's strides, the two blocksize constexprs) of a GEMM
    over ``weight``: a dense weight (``q_`` all None), or the packed codes of a bitsandbytes
    4-bit base (``base4`` = ``fastlora.bases.Packed4bit.kernel_args()``)."""
    if base4 is None:
        return "dense", _NO_Q, (weight.stride(0), weight.stride(1)), (None, None)
    base = base4["BASE"]
    if base == "e4m3" and tma and K % TMA_ALIGN_CODES == 0:
        base = "e4m3_tma"  # FP8 codes through 1-byte TMA loads
    return base, q_pointers(base4), (K, 1), (base4["blocksize"], base4["nested_blocksize"])


def q_pointers(base4: dict | None) -> tuple:
    """The four ``q_`` pointers of ``w_arguments`` (per call: they are the layer's tensors)."""
    if base4 is None:
        return _NO_Q
    return base4["absmax"], base4["code2"], base4["absmax2"], base4["offset"]


_NO_Q = (None,) * 4


def fp8_codes(weight: torch.Tensor, base4: dict | None) -> torch.Tensor:
    """The tensor the GEMMs read W through: an FP8 base's codes as uint8 (``base4`` from
    ``fastlora.bases.BlockFp8.kernel_args``), else ``weight``."""
    return base4["codes"] if base4 is not None and "codes" in base4 else weight


def fp8_fused_ok(arch: int, kind: str, K: int, r_pad: int, tma: bool, kernel: str,
                 *, interpreter: bool | None = None) -> bool:  # fmt: skip
    """Whether the FP8 tile loader runs in ``kernel``'s ("forward", "dx") main loop for a
    call, else the launcher decodes W once (``decoded_weight``) and runs the dense kernels.

    - a config must exist for the base (``_configs.configs_for``): none for IEEE fp32
      operands, whose FMA tiles spill with a decoded W in registers on sm_80 and sm_90;
    - on sm_90, only the TMA build with the codes through 1-byte TMA loads (``tma``, and
      ``K % 16 == 0`` for a 16-byte row stride): the pointer build's decoded tile makes
      wgmma wait with depth 0, so it is never launched there (under torch.compile, with
      unaligned activations or an odd K the call decodes once instead)."""
    if arch >= 90 and not (tma and K % TMA_ALIGN_CODES == 0):
        return False
    return bool(_configs.configs_for(kernel, kind, r_pad, interpreter=interpreter, tma=tma,
                                     base="e4m3_tma" if tma else "e4m3"))  # fmt: skip


def fp8_route(info, x, R, weight, base4, tma, traceable, kernel, *operands):
    """(weight, base4) for a call's launches: an FP8 base as it is where ``fp8_fused_ok``,
    else W decoded once into x's dtype and no base4 (the dense kernels). ``info``: (arch,
    SMs); ``R``: the rank; ``operands``: the activations whose alignment decides TMA."""
    if base4 is None or base4["BASE"] not in BASES_FP8:
        return weight, base4
    arch = info[0]
    if tma is None:
        tma = not traceable and use_tma(arch, *operands)
    kind = _configs.operand_kind(x.dtype.itemsize, dot_precision(x.dtype))
    if fp8_fused_ok(arch, kind, x.shape[1], _configs.pad_rank(R), tma, kernel):
        return weight, base4
    return decoded_weight(base4, x.dtype, traceable), None


def fused_4bit_ok(K: int, base4: dict) -> bool:
    """The GEMMs' 4-bit tile loader reads whole quantization blocks per row: K must be a
    multiple of the blocksize (true of real models); other shapes take the composition."""
    if base4["BASE"] in BASES_FP8:  # the FP8 loader masks any K
        return True
    return K % base4["blocksize"] == 0


def _tma_ok(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or (t.stride(0) * es) % TMA_ALIGN or t.data_ptr() % TMA_ALIGN:
            return False
    return True


def use_tma(arch: int, *tensors: torch.Tensor) -> bool:
    """Whether the TMA build may run: sm_90+ and every big operand TMA-addressable."""
    return arch >= 90 and _tma_ok(*tensors)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    *,
    traceable: bool = False,
    tma: bool | None = None,
    base4: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r],
    seed: int64 [1] (read only when dropout_p > 0).  Returns y: [M, N] and u: [M, r],
    both in x.dtype; u = s * D(x) A^T is what the backward needs for dB.  Computes in
    x.dtype with fp32 accumulation.  ``traceable``: launch through wrap_triton (inside a
    triton_op); ``tma``: force the TMA build on or off (default: sm_90 and aligned)."""
    weight = fp8_codes(weight, base4)
    y, u, _ = _forward(x, weight, bias, lora_A, lora_B, None, None, scaling, dropout_p, seed,
                       traceable, tma, base4)
    return y, u


def forward_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    *,
    traceable: bool = False,
    tma: bool | None = None,
    base4: dict | None = None,
) -> torch.Tensor:
    """``lora_forward``'s GEMM launch alone, with u = s D(x) A^T [M, r] given (contiguous,
    x.dtype: made elsewhere, e.g. by cuBLAS): y = x W^T + b + u B^T [M, N] in one launch.
    ``lora_A`` [r, K] is read for its shape only."""
    weight = fp8_codes(weight, base4)
    # no dropout in a LoRA GEMM: the seed is never read (u stands in for its pointer)
    y, _, _ = _forward(x, weight, bias, lora_A, lora_B, None, None, 1.0, 0.0, u, traceable,
                       tma, base4, u_given=u)
    return y


def warp_spec_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *,
                      traceable=False, tma=None, base4=None):  # fmt: skip
    """The "warp_spec" forward candidate: ``lora_forward``'s signature, results and launches
    (shrink, GEMM), the GEMM warp-specialized (module docstring).  Where that build cannot
    run it is ``lora_forward``: no sm_90 TMA build (or ``tma=False``, or under
    torch.compile), a 4-bit or FP8 base, 32-bit operands, rows of u or B not 16-byte
    aligned (r times the element size)."""
    if warp_spec_ok(x, weight, lora_A, lora_B, tma, traceable, base4):
        y, u, _ = _forward(x, weight, bias, lora_A, lora_B, None, None, scaling, dropout_p,
                           seed, traceable, True, None, warp_spec=True)  # fmt: skip
        return y, u
    return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                        traceable=traceable, tma=tma, base4=base4)


def warp_spec_ok(x, weight, lora_A, lora_B, tma, traceable, base4) -> bool:
    """Whether ``warp_spec_forward`` runs its warp-specialized build for these operands."""
    R = lora_A.shape[0]
    if traceable or base4 is not None or tma is False or x.element_size() != 2:
        return False
    # the descriptors' 16-byte rows: x, W, B, and the fresh u [M, r] and y [M, N]
    N = lora_B.shape[0]
    if (R * x.element_size()) % TMA_ALIGN or (N * x.element_size()) % TMA_ALIGN:
        return False
    if not _tma_ok(x, weight, lora_B):
        return False
    kind = _configs.operand_kind(x.element_size(), dot_precision(x.dtype))
    if not _configs.configs_for("forward_ws", kind, _configs.pad_rank(R), tma=True):
        return False
    return tma or current_device_info()[0] >= 90


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    *,
    traceable: bool = False,
    tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA on a dense base: ``lora_forward``'s arguments plus magnitude [N] (any float
    dtype) and the detached row norms norm [N] (fp32).  Returns y [M, N], u [M, r] and the
    pre-scale output z = D(x) W^T + u B^T [M, N] (what the backward needs for dm), all in
    x.dtype.  The same two launches as LoRA: the shrink, then the GEMM with DoRA's epilogue."""
    return _forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
                    traceable, tma, None)


def _forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
             traceable, tma, base4, u_given=None, warp_spec=False):
    """The shrink and GEMM launches; with ``u_given`` the GEMM alone, reading it as u."""
    dora = magnitude is not None
    M, K = x.shape
    N = lora_B.shape[0]
    R = lora_A.shape[0]
    dev, dtype = x.device, x.dtype
    y = torch.empty(M, N, device=dev, dtype=dtype)
    u = torch.empty(M, R, device=dev, dtype=dtype) if u_given is None else u_given
    z = torch.empty(M, N, device=dev, dtype=dtype) if dora else None
    if M == 0:
        return y, u, z
    info = current_device_info()
    weight, base4 = fp8_route(info, x, R, weight, base4, tma, traceable, "forward", x, y)
    if traceable:  # fake tensors (no data_ptr), maybe symbolic strides: planned per trace
        call = _call(info, x, weight, bias, lora_A, lora_B, u, y, dora, scaling, dropout_p,
                     traceable, tma, base4, warp_spec)  # fmt: skip
    else:
        # everything the launches depend on besides y, u, z (fresh: aligned, contiguous)
        # (operand_key of each operand, flattened: this runs on every call)
        key = (info, tma, M, K, N, R, float(scaling), float(dropout_p), x.dtype, x.stride(),
               weight.dtype, weight.stride(), lora_A.dtype, lora_A.stride(), lora_B.dtype,
               lora_B.stride(), seed.dtype, x.data_ptr() & 15, weight.data_ptr() & 15,
               lora_A.data_ptr() & 15, lora_B.data_ptr() & 15, seed.data_ptr() & 15,
               None if bias is None else operand_key(bias),
               None if base4 is None else base4_key(base4),
               dora and (operand_key(magnitude), operand_key(norm)),
               None if u_given is None else operand_key(u_given), warp_spec)  # fmt: skip
        call = _calls.get(key) or _calls.put(key, _call(
            info, x, weight, bias, lora_A, lora_B, u, y, dora, scaling, dropout_p, traceable,
            tma, base4, warp_spec))  # fmt: skip
    shrink, fwd, shrink_scalars, fwd_scalars, serial = call
    q_ptrs = _NO_Q if base4 is None else q_pointers(base4)
    ctx = context(traceable)
    if u_given is None:
        launch(shrink, (x, lora_A, u, seed), shrink_scalars, traceable=traceable, ctx=ctx,
               key=serial)  # fmt: skip
    launch(
        fwd, (x, weight, bias if bias is not None else weight, u, lora_B, y, *q_ptrs,
              *((z, magnitude, norm) if dora else (None, None, None)), seed),
        fwd_scalars, traceable=traceable, ctx=ctx, key=serial,
    )  # fmt: skip
    return y, u, z


def _call(info, x, weight, bias, lora_A, lora_B, u, y, dora, scaling, dropout_p, traceable, tma,
          base4, warp_spec=False):  # fmt: skip
    """The launches of a forward call, their scalar arguments and a serial (``launch``'s
    key), for ``_forward``'s key; ``info``: (arch, SMs)."""
    M, K = x.shape
    N, R = y.shape[1], u.shape[1]
    arch, sms = info
    if tma is None:  # under torch.compile: the pointer build (see the module docstring)
        tma = not traceable and use_tma(arch, x, y, *(() if base4 else (weight,)))
    base, _, w_strides, q_sizes = w_arguments(weight, base4, K, tma)
    shrink, fwd = _plan(M, N, K, R, dot_precision(x.dtype), x.dtype.itemsize, bias is not None,
                        dropout_p > 0.0, tma, sms, base, q_sizes, dora,
                        warp_spec)  # fmt: skip
    shrink_scalars = (M, K, R, *x.stride(), *lora_A.stride(), *u.stride(), float(scaling),
                      float(dropout_p))  # fmt: skip
    fwd_scalars = (M, N, K, R, *x.stride(), *w_strides, *u.stride(), *lora_B.stride(),
                   *y.stride(), float(dropout_p), fwd.grid[0])  # fmt: skip
    return shrink, fwd, shrink_scalars, fwd_scalars, next_serial()


@functools.lru_cache(maxsize=1024)
def _plan(M, N, K, R, prec, esize, has_bias, has_dropout, tma, sms, base="dense",
          q_sizes=(None, None), dora=False, warp_spec=False):
    """The two launches of a forward call: configs, grids, constexprs (per shape)."""
    r_pad = _configs.pad_rank(R)
    kind = _configs.operand_kind(esize, prec)
    c = _configs.pick("shrink", kind, r_pad, M, 1, sms, tma)
    shrink = LaunchSpec(
        _lora_shrink_kernel, (_configs.cdiv(M, c.block_m),),
        dict(HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PRECISION=prec, USE_TMA=tma,
             BLOCK_M=c.block_m, BLOCK_K=c.block_k),
        c.num_warps, c.num_stages,
    )  # fmt: skip
    variant = _configs.adapter_variant(dora, has_dropout)
    c = _configs.pick("forward_ws" if warp_spec else "forward", kind, r_pad, M, N, sms, tma,
                      adapter=variant, base=base)  # fmt: skip
    tiles = _configs.cdiv(M, c.block_m) * _configs.cdiv(N, c.block_n)
    fwd = LaunchSpec(
        _lora_forward_kernel, (min(tiles, sms) if tma else tiles,),
        dict(HAS_BIAS=has_bias, R_PAD=r_pad, DOT_PRECISION=prec, USE_TMA=tma,
             BASE=("dense_tma" if tma else "dense") if base == "dense" else base,
             BLOCK_M=c.block_m, BLOCK_N=c.block_n,
             BLOCK_K=c.block_k, GROUP_M=_configs.GROUP_M, FLATTEN=tma and c.flatten,
             EPI_SPLIT=2 if tma else 1, Q_BLOCKSIZE=q_sizes[0], Q_NESTED_BLOCKSIZE=q_sizes[1],
             ADAPTER="dora" if dora else "lora", HAS_DROPOUT=dora and has_dropout,
             WARP_SPEC=warp_spec),
        c.num_warps, c.num_stages,
    )  # fmt: skip
    return shrink, fwd
