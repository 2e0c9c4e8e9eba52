"""Autograd wiring shared by the backends: what is saved for backward, the gradients of a
base a user unfroze, and the shapes of the backward's outputs for fake tensors."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, state, u) -> None:
    """Saved: x, the parameters, u [M, r] and the dropout state (bits or a seed), no more.
    All through ``save_for_backward``, so saved-tensor hooks (offloading, checkpointing,
    memory accounting) see every saved byte."""
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_bias = bias is not None
    # u's gradient is never used: no zeros materialized for it (nor for an unused y)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, state)


def setup_context(ctx, inputs, output) -> None:
    """``register_autograd`` form of ``save`` for an op returning (y, u)."""
    ctx.mark_non_differentiable(output[1])
    save(ctx, *inputs, output[1])


LoRAGrads = Callable[..., "tuple[Tensor, Tensor, Tensor]"]


def grads(ctx, dy: Tensor, lora_grads: LoRAGrads) -> tuple:
    """Gradients for (x, weight, bias, lora_A, lora_B, scaling, dropout_p, state).

    ``lora_grads(dy, x, weight, lora_A, lora_B, u, state, scaling, dropout_p, need_dx,
    need_dA, need_dB)`` returns (dx, dA, dB), empty or None where not asked for.  ``dy``
    is None when y got no gradient (grads are not materialized)."""
    if dy is None:
        return (None,) * 8
    x, weight, lora_A, lora_B, u, state = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx, dA, dB = lora_grads(
        dy, x, weight, lora_A, lora_B, u, state, ctx.scaling, ctx.dropout_p, need_x, need_A, need_B
    )
    # the base is frozen in LoRA; if a user unfroze it, its gradients are still exact
    dW = torch.mm(dy.t(), x).to(weight.dtype) if need_w else None
    db = dy.sum(0).to(weight.dtype) if (need_b and ctx.has_bias) else None
    return (
        dx if need_x else None, dW, db, dA if need_A else None, dB if need_B else None,
        None, None, None,
    )  # fmt: skip


def fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB) -> tuple[Tensor, Tensor, Tensor]:
    """Output shapes of a backward op; a gradient not asked for is an empty tensor."""
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_dA else x.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_dB else x.new_empty(0),
    )
