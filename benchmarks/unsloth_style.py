"""The ``unsloth_style`` baseline: LoRA as a hand-written autograd function over BLAS calls.

Unsloth's ``matmul_lora`` recipe (base GEMM, then the low-rank product added in place with
``addmm_``; a manual backward; no dropout), written from DESIGN.md section 1 and made as
strong as a non-fused composition gets: ``u = s x A^T`` is saved (Unsloth recomputes
``x A^T`` in backward) and ``g = s dy B`` is computed once and used for both ``dx`` and
``dA`` (Unsloth computes ``dy B`` twice). It is the best hand-written baseline that does not
fuse into the GEMM, so beating it measures the fusion and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class UnslothStyleLoRA(torch.autograd.Function):
    """x: [M, K], weight: [N, K], bias: [N] | None, lora_A: [r, K], lora_B: [N, r] -> [M, N]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, scaling: float) -> Tensor:
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        u = torch.mm(x, lora_A.t()).mul_(scaling)          # [M, r]
        y.addmm_(u, lora_B.t())                            # y += u B^T, in place
        ctx.scaling = scaling
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        dy = dy.contiguous()
        g = torch.mm(dy, lora_B).mul_(ctx.scaling)         # [M, r]
        dx = torch.mm(dy, weight)                          # [M, K]
        dx.addmm_(g, lora_A)                               # dx += g A, in place
        dA = torch.mm(g.t(), x)                            # [r, K]
        dB = torch.mm(dy.t(), u)                           # [N, r]
        return dx, None, None, dA, dB, None


class UnslothStyleLinear(nn.Module):
    """A frozen ``linear`` (shared, not copied) plus trainable ``lora_A``/``lora_B``."""

    def __init__(self, linear: nn.Linear, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__()
        self.base = linear
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = UnslothStyleLoRA.apply(x.reshape(-1, x.shape[-1]), self.base.weight, self.base.bias,
                                   self.lora_A, self.lora_B, self.scaling)
        return y.view(*lead, y.shape[-1])
