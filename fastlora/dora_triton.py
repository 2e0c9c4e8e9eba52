"""DoRA on the Triton backend: the LoRA kernels with the DoRA epilogue (``fastlora.kernels``
``dora_forward`` / ``dora_backward``), wired into autograd.

    norm      ||W_n + s (B A)_n|| in one launch (``weight_norm``)          -> norm [N]
    forward   shrink + GEMM (column scale c = m / norm in the epilogue; with dropout a
              second accumulator D(x) W^T on the same W tiles)      -> y, u, z
    backward  dy pass (g and dB with c, dm partials from dy * z), dx GEMM (dy scaled by
              c in registers; with dropout a second accumulator), reduce  -> dx, dA, dB, dm

Saved for backward as on the torch path: ``x``, ``u``, ``z`` (when ``m`` is trained), ``m``,
``norm`` and the int64 dropout seed (the mask is regenerated from it).  Under
``torch.compile`` DoRA takes the torch backend's registered ops (``fastlora::dora_fwd``),
which trace; the eager path below launches the kernels directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import dora_torch, triton_backend

_kernels = triton_backend._kernels


def _grads(ctx, dy):
    x, weight, lora_A, lora_B, magnitude, norm, u, z, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    with triton_backend._launch_lock:
        dx, dA, dB, dm = _kernels.dora_backward(
            dy, x, weight, lora_A, lora_B, magnitude, norm, u, z, ctx.scaling, ctx.dropout_p,
            seed, need_x, need_A, need_B, need_m,
        )  # fmt: skip
    # the base is frozen in DoRA; if a user unfroze it, the torch path's exact formula
    # (its dropout mask would differ from the kernels': refuse rather than guess)
    if need_w and ctx.dropout_p > 0:
        raise RuntimeError("DoRA on the triton backend: a trainable base weight with dropout "
                           "is not supported; use set_backend('torch')")
    dW = db = None
    if need_w or (need_b and ctx.has_bias):  # (a frozen base launches nothing here)
        dW, db = dora_torch.base_grads(dy, x, weight, magnitude, norm, None, 0.0, need_w,
                                       need_b, ctx.has_bias)  # fmt: skip
    return dx, dW, db, dA, dB, dm, None, None, None, None


class _DoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
        with triton_backend._launch_lock:
            y, u, z = _kernels.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, norm,
                                            scaling, dropout_p, seed)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, u,
                              z if ctx.needs_input_grad[5] else None, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy)


def fused(x: Tensor, weight: Tensor, lora_A: Tensor) -> bool:
    """Whether ``apply_dora`` runs the fused kernels for these operands (else the torch
    path): eager, a half-precision or fp32 weight, a rank and dtype with DoRA tiles, and a
    strategy that is not ``"composition"``."""
    return (not torch.compiler.is_compiling()
            and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not _composition(x, lora_A.shape[0]))


def norm_kernel_ok(r: int) -> bool:
    """Whether ``weight_norm``'s kernel has a tile for rank ``r``."""
    return _kernels.norm_kernel_ok(r)


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W_n + s (B A)_n||`` [N] fp32, detached, in one launch (``dora_weight_norm``)."""
    with triton_backend._launch_lock:
        return _kernels.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(),
                                         float(scaling))


def _composition(x: Tensor, r: int) -> bool:
    cfg = _kernels._configs
    if r > cfg.MAX_R:
        return True
    kind = cfg.operand_kind(x.dtype.itemsize, _kernels.dot_precision(x.dtype))
    if x.device.type == "cuda" and (kind != "16bit" or cfg.pad_rank(r) > cfg.max_r_pad(kind)):
        return True  # fp32 inputs (TF32 or not): no DoRA tiles (see _configs), the torch path
    # the same reading of set_strategy / FASTLORA_STRATEGY as LoRA's (the env read once)
    return triton_backend._forced() == "composition"


def apply_dora(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """x: [M, K] -> y: [M, N] through the fused kernels; ``norm`` [N] fp32 from
    ``fastlora.dora.weight_norm``.  Ranks the kernels have no config for, and a strategy
    forced to ``"composition"``, take the torch path (DoRA's fused/composition pick is not
    measured per shape as LoRA's is)."""
    if torch.compiler.is_compiling() or _composition(x, lora_A.shape[0]):
        return dora_torch.apply_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling,
                                     dropout_p)
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    else:  # never read by the kernels
        seed = torch.empty(1, device=x.device, dtype=torch.int64)
    return _DoRAFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm.float(),
                               float(scaling), float(dropout_p), seed)
