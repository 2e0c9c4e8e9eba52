"""The kernel layer's public face (``fastlora.kernels.api``): the fused LoRA forward and
backward launchers and what the backend reads of the configs.  Nothing here is
module-shaped; autograd and op registration live in ``fastlora.triton_backend``.

``kernels/`` has no ``__init__.py`` on purpose: run from a checkout's root, a regular
package would shadow the unrelated ``kernels`` package that transformers and bitsandbytes
import; a namespace portion yields to any regular package of that name on ``sys.path``."""

from . import _configs, _launch
from ._configs import MAX_R, MMA_MIN_R, configs_for, pad_rank
from ._launch import dot_precision
from .dequant_4bit import dequantize_4bit
from .lora_backward import dora_backward, lora_backward
from .lora_forward import dora_forward, fused_4bit_ok, lora_forward
from .lora_sgmv import sgmv_backward, sgmv_forward, stack_adapters

__all__ = [
    "MAX_R", "MMA_MIN_R", "configs_for", "dequantize_4bit", "dora_backward", "dora_forward",
    "dot_precision", "fused_4bit_ok",
    "lora_backward",
    "lora_forward",
    "pad_rank",
    "sgmv_backward",
    "sgmv_forward",
    "stack_adapters",
]
