"""Initialisations of the LoRA factors (PEFT's names and conventions)."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

InitMode = Union[bool, str]

# PEFT's `init_lora_weights` values that keep the base weight as it is
PLAIN_INITS = (True, False, "gaussian")


@torch.no_grad()
def init_plain_(lora_A: torch.Tensor, lora_B: torch.Tensor, mode: InitMode) -> None:
    """``True``: A Kaiming-uniform (a = sqrt(5)), B = 0, so the layer starts equal to its base.
    ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0. ``False``: both Kaiming-uniform, as nn.Linear
    initialises a weight (a non-zero start, for tests)."""
    r = lora_A.shape[0]
    if mode is True:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)
    elif mode == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / r)
        nn.init.zeros_(lora_B)
    elif mode is False:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        raise ValueError(f"init_lora_weights: expected one of {PLAIN_INITS}, got {mode!r}")


def initialize(layer: nn.Module, mode: InitMode) -> None:
    """Initialise a ``FastLoRALinear``'s factors for ``mode`` (PEFT's ``init_lora_weights``)."""
    init_plain_(layer.lora_A, layer.lora_B, mode)
