"""The fused kernels' dropout as a standalone pass, for the cuBLAS composition on a device
that runs Triton: ``out = t * m / (1-p)`` with ``m`` the keep mask of ``_tiles.dropout_keep``
(Philox keyed by seed, row and column).  The composition and the fused kernels then draw the
same bits from the same seed, so a fused forward may pair with a composition backward and
the reverse (``fastlora.triton_backend``).

    dropout_apply(x, seed, p)            D(x)          [M, K] -> [M, K]  (forward, dA)
    dropout_apply(g_a, seed, p, out=g_a) (g A) m/(1-p) in place          (dx's low-rank term)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs, _launch
from ._tiles import dropout_keep

# a [32, 128] tile: 4096 elements over 4 warps (32 per thread, Philox draws 4 at a time);
# the columns start at a multiple of 4 as dropout_keep needs
BLOCK_M = 32
BLOCK_K = 128
NUM_WARPS = 4


@triton.jit
def _dropout_kernel(
    t_ptr, out_ptr, seed_ptr, M, K, stride_tm, stride_tk, stride_om, stride_ok, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, k] = t[m, k] * keep(seed, m, k) / (1 - p), computed in fp32, stored in out's
    dtype (the fused kernels' ``apply_dropout``)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    p = tl.cast(dropout_p, tl.float32)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_k[None, :] * stride_tk, mask=inside,
                other=0.0)  # fmt: skip
    keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)
    val = tl.where(keep, t.to(tl.float32) * (1.0 / (1.0 - p)), 0.0)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
             val.to(out_ptr.dtype.element_ty), mask=inside)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _spec(M: int, K: int) -> _launch.LaunchSpec:
    grid = (_configs.cdiv(M, BLOCK_M), _configs.cdiv(K, BLOCK_K))
    return _launch.LaunchSpec(_dropout_kernel, grid, {"BLOCK_M": BLOCK_M, "BLOCK_K": BLOCK_K},
                              NUM_WARPS, 1)  # fmt: skip


def dropout_apply(
    t: torch.Tensor, seed: torch.Tensor, dropout_p: float, out: torch.Tensor | None = None, *,
    traceable: bool = False,
) -> torch.Tensor:  # fmt: skip
    """t: [M, K] (any strides), seed: int64 [1] -> ``t * m / (1 - p)`` [M, K] in ``out``
    (``t`` itself for in place; a fresh tensor like ``t`` when None).  One launch."""
    if t.dim() != 2:
        raise ValueError(f"t: expected a 2-D tensor [M, K], got shape {tuple(t.shape)}")
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in (0, 1), got {dropout_p!r}")
    if seed.dtype != torch.int64 or seed.numel() < 1:
        raise ValueError(f"seed: expected an int64 tensor of 1 element, got {seed.dtype} "
                         f"{tuple(seed.shape)}")  # fmt: skip
    if out is None:
        out = torch.empty_like(t)
    elif out.shape != t.shape:
        raise ValueError(f"out: expected shape {tuple(t.shape)}, got {tuple(out.shape)}")
    M, K = t.shape
    if M and K:
        _launch.launch(
            _spec(M, K), (t, out, seed),
            (M, K, t.stride(0), t.stride(1), out.stride(0), out.stride(1), float(dropout_p)),
            traceable=traceable,
        )  # fmt: skip
    return out
