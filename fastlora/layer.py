"""``FastLoRALinear``: a drop-in ``nn.Linear`` with a LoRA update on a frozen base."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlora import inits
from fastlora.functional import lora_linear


def _check_hparams(r: object, lora_alpha: object, lora_dropout: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")


class FastLoRALinear(nn.Linear):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with ``W``, ``b`` frozen.

    A subclass of ``nn.Linear``: ``weight`` [out, in] and ``bias`` [out] keep their names, so a
    base checkpoint loads into it. ``lora_A``: [r, in], ``lora_B``: [out, r];
    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Precision: the low-rank path runs in the input's dtype with fp32 accumulation; LoRA
    parameters may be kept in float32 beside a bf16/fp16 base (they are cast to the input's
    dtype for the matmuls) and receive gradients in their own dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: inits.InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_hparams(r, lora_alpha, lora_dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                        self.weight.device, self.weight.dtype)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, device, dtype):
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: inits.InitMode = True) -> None:
        """(Re)initialise ``lora_A``/``lora_B`` (PEFT's ``init_lora_weights`` values)."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters: unmerge() the layer first")
        inits.initialize(self, init_lora_weights)
        self.init_lora_weights = init_lora_weights

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: inits.InitMode = True,
    ) -> "FastLoRALinear":
        """Wrap ``linear`` without copying: the new layer holds the same ``weight``/``bias``
        parameters (frozen), and new LoRA factors on their device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"linear: expected a torch.nn.Linear, got {type(linear).__name__} "
                "(transposed Conv1D layers such as GPT-2's are not nn.Linear)"
            )
        if isinstance(linear, FastLoRALinear):
            raise TypeError("linear: expected a plain torch.nn.Linear, got a FastLoRALinear "
                            "(it already carries a LoRA update)")
        _check_hparams(r, lora_alpha, lora_dropout)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         linear.weight.device, linear.weight.dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.lora_dropout, self.training)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` [out, in] in float32 at least (float64 for a float64 weight)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B A`` into ``weight`` (float32 arithmetic at least, in place in the
        same tensor); forward becomes the plain linear."""
        if self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (same arithmetic) and return to the LoRA forward."""
        if not self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}")
