"""The unfused reference with PEFT's semantics. Tests compare every backend against it;
nothing on a hot path calls it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = x W^T + b + s (D(x) A^T) B^T`` as PEFT computes it, op by op.

    x: [..., K], weight: [N, K], bias: [N] or None, lora_A: [r, K], lora_B: [N, r].
    dropout_mask: 0/1 or bool, shaped like x (the kept elements), or None for no dropout.
    """
    base = F.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return base + F.linear(F.linear(xd, lora_A), lora_B) * scaling


# the same name as the op it checks, for ``from fastlora import reference; reference.lora_linear``
lora_linear = lora_linear_reference


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """DoRA as PEFT computes it (``peft/tuners/lora/dora.py``), op by op: the row norm of
    ``W + s B A`` formed in full from the detached LoRA weight, detached, and
    ``y = x W^T + b + (m/norm - 1) * (D(x) W^T) + (m/norm) * s (D(x) A^T) B^T``.
    magnitude: [N]; the other arguments as ``lora_linear_reference``."""
    lora_weight = (lora_B @ lora_A).detach()
    norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1).detach()
    scale = magnitude / norm
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    base = F.linear(x, weight, bias)
    lora = F.linear(F.linear(xd, lora_A), lora_B) * scaling
    return base + (scale - 1) * F.linear(xd, weight) + scale * lora
