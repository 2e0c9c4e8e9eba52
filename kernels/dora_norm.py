"""DoRA's row norms ``||W_n + s (B A)_n||`` in one launch, without a copy of W.

    norm   [N] fp32   one program per BLOCK_N rows walks K in BLOCK_K steps: the W tile in
                      its own dtype, (B A) for the same tile from an R_PAD-deep product
                      (B's rows resident in registers), sum of (w + s ba)^2 in fp32

The direct form reads W once, as the cheap form's ``W A^T`` product must anyway (a cached
``||W_n||^2`` saves no pass over W), and has no cancellation between ``||W_n||^2`` and the
cross term when W and s B A nearly cancel.  Products in IEEE fp32 (``(B A)`` is r-deep: a
few FMAs per element of W), as PEFT forms ``W + s B A`` in fp32 for half-precision bases.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._launch import LaunchSpec, current_device_info, launch


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[n] (fp32) = sqrt(sum_k (W[n, k] + s (B A)[n, k])^2) for rows pid*BLOCK_N .."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    s = tl.cast(scaling, tl.float32)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & (offs_r[None, :] < R), other=0.0,
    ).to(tl.float32)  # fmt: skip
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=(offs_r[:, None] < R) & mask_k[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        v = w + s * tl.dot(b, a, input_precision="ieee")
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt(acc), mask=mask_n)


@functools.lru_cache(maxsize=256)
def _spec(N: int, r_pad: int, sms: int) -> LaunchSpec:
    c = _configs.pick("dora_norm", "16bit", r_pad, 1, N, sms)
    return LaunchSpec(_dora_norm_kernel, (_configs.cdiv(N, c.block_n),),
                      dict(R_PAD=r_pad, BLOCK_N=c.block_n, BLOCK_K=c.block_k),
                      c.num_warps, c.num_stages)  # fmt: skip


def norm_kernel_ok(r: int) -> bool:
    """Whether the kernel has a tile for rank ``r`` (r <= 64 on a GPU)."""
    return r <= _configs.MAX_R and bool(_configs.configs_for("dora_norm", "16bit",
                                                               _configs.pad_rank(r)))


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, *, traceable: bool = False) -> torch.Tensor:  # fmt: skip
    """weight: [N, K] (fp16, bf16 or fp32), lora_A: [r, K], lora_B: [N, r] -> ``||W_n + s
    (B A)_n||`` [N] fp32 (the caller detaches: no autograd here).  One launch."""
    N, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    if N == 0:
        return norm
    spec = _spec(N, _configs.pad_rank(R), current_device_info()[1])
    launch(spec, (weight, lora_A, lora_B, norm),
           (N, K, R, *weight.stride(), *lora_A.stride(), *lora_B.stride(), float(scaling)),
           traceable=traceable)  # fmt: skip
    return norm
