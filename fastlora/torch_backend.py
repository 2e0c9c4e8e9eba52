"""The lean PyTorch backend: DESIGN.md section 1 with no extra [M, N] temporaries.

Forward is one GEMM for the base (with bias), one skinny GEMM for ``u``, and one in-place
``addmm_`` of ``u B^T`` into the output. The unpacked mask and ``x * mask`` live in a reused
scratch buffer (``fastlora._scratch``), never in a fresh [M, K] tensor. Backward is one GEMM ``dy W`` with the low-rank
term accumulated into it in place. Saved for backward: ``x``, ``u`` [M, r] and the dropout
mask packed to one bit per element. This path serves the CPU, float64, devices without
Triton, and on CUDA it is the "cuBLAS composition" the fused kernels are measured against.

Precision: the low-rank path runs in ``x``'s dtype (adapters in another dtype are cast to it;
matmuls accumulate in fp32 as torch's do); gradients come back in each parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import _autograd, bases
from fastlora.dropout import draw_packed_mask, keep_in_scratch, keep_scale


def _keep(x: Tensor, mask_bits: Tensor) -> Tensor:
    """The keep mask as 0/1 in x's dtype, in the reused "mask" scratch buffer: masking is
    then a plain multiply, and ``x * mask`` is formed in place in the same buffer (no fresh
    [M, K] tensor: on the CPU each would cost its page faults)."""
    return keep_in_scratch(mask_bits, x.shape[1], x.dtype)


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    mask_bits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x: [M, K], weight: [N, K] (dense, or 4-bit: ``fastlora.bases``), bias: [N] | None,
    lora_A: [r, K], lora_B: [N, r], mask_bits: [M, ceil(K/8)] uint8 | None. Returns y: [M, N] and u: [M, r] (x.dtype)."""
    B = lora_B.to(x.dtype)
    # the scale (with 1/(1-p)) goes on A [r, K], in A's own precision, not on a pass over u
    if mask_bits is None:
        u = torch.mm(x, (lora_A * scaling).to(x.dtype).t())
    else:
        xk = _keep(x, mask_bits).mul_(x)
        u = torch.mm(xk, (lora_A * (scaling * keep_scale(dropout_p))).to(x.dtype).t())
    # low-rank part (and bias) first, then the base GEMM accumulates onto it (beta = 1):
    # y is written once by the small GEMM and once by the big one, never re-read by a pass
    y = torch.mm(u, B.t()) if bias is None else torch.addmm(bias, u, B.t())
    # a 4-bit base is decoded into a transient W here and again in backward, never saved
    y.addmm_(x, bases.dense_weight(weight, x.dtype).t())
    return y, u


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    mask_bits: Tensor | None,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [M, K], dA [r, K], dB [N, r]); a gradient not asked for comes back empty."""
    A = lora_A.to(x.dtype)
    # outputs of a custom op may not alias each other: one empty tensor each
    dx, dA, dB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dx or need_dA:
        # g = s dy B, with 1/(1-p) folded in so the [M, K] side is a plain masked product; the
        # scale goes on B [N, r] in B's own precision, not on a pass over g
        scale = scaling if mask_bits is None else scaling * keep_scale(dropout_p)
        g = torch.mm(dy, (lora_B * scale).to(dy.dtype))
        keep = None if mask_bits is None else _keep(x, mask_bits)
        if need_dx:
            # low-rank term first, then the big GEMM accumulates onto it (beta = 1)
            dx = torch.mm(g, A)
            if keep is not None:
                dx.mul_(keep)
            dx.addmm_(dy, bases.dense_weight(weight, dy.dtype))
        if need_dA:
            xk = x if keep is None else keep.mul_(x)  # the mask's last use: x * mask in place
            dA = torch.mm(g.t(), xk).to(lora_A.dtype)
    if need_dB:
        # (u^T dy)^T: the reduction over M runs faster with dy untransposed
        dB = torch.mm(u.t(), dy).t().to(lora_B.dtype).contiguous()
    return dx, dA, dB


# Registered ops: what torch.compile, export and opcheck see.
lora_fwd = torch.library.custom_op("fastlora::lora_fwd", forward, mutates_args=())
lora_bwd = torch.library.custom_op("fastlora::lora_bwd", backward, mutates_args=())


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits):
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, u, mask_bits, scaling, dropout_p, need_dx, need_dA, need_dB):
    return _autograd.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)


lora_fwd.register_autograd(
    lambda ctx, dy, _du: _autograd.grads(ctx, dy, lora_bwd), setup_context=_autograd.setup_context
)


class _LoRAFunction(torch.autograd.Function):
    """Eager path: the same two functions without custom-op dispatch, which costs ~100 us
    a call (it dominates at decode shapes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits):
        y, u = forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits)
        _autograd.save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _autograd.grads(ctx, dy, backward)


def apply(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
) -> Tensor:
    """x: [M, K] -> y: [M, N]; ``dropout_p == 0`` means no dropout (eval passes 0)."""
    mask_bits = draw_packed_mask(x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
    if torch.compiler.is_compiling():
        return lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits)[0]
    return _LoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, mask_bits)
