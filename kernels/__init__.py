"""fastlora's Triton kernels (installed as ``fastlora.kernels``): the fused LoRA forward
and backward and their launchers.  Nothing here is module-shaped; autograd and op
registration live in ``fastlora.triton_backend``."""

from ._configs import MAX_R, MMA_MIN_R, configs_for, pad_rank
from ._launch import dot_precision
from .dequant_4bit import dequantize_4bit
from .lora_backward import dora_backward, lora_backward
from .lora_forward import dora_forward, fused_4bit_ok, lora_forward

__all__ = [
    "MAX_R", "MMA_MIN_R", "configs_for", "dequantize_4bit", "dora_backward", "dora_forward",
    "dot_precision", "fused_4bit_ok",
    "lora_backward",
    "lora_forward",
    "pad_rank",
]
