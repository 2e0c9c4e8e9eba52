"""fastlora: LoRA at the cost of the frozen linear layer.

``FastLoRALinear`` is a drop-in ``nn.Linear``; ``lora_linear`` is the functional op under
it; ``set_backend`` picks the implementation ("auto", "torch", "triton").
"""

from fastlora import _kernel_path

_kernel_path.register()

from fastlora.adapter import load_adapter, save_adapter
from fastlora.backend import get_backend, set_backend, use_backend
from fastlora.fp8 import quantize_fp8
from fastlora.functional import lora_linear
from fastlora.layer import FastLoRALinear
from fastlora.multi_adapter import adapter_batch, delete_adapter, set_adapter
from fastlora.model import (
    FastLoRAConfig,
    apply_lora,
    from_peft,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "FastLoRALinear",
    "lora_linear",
    "apply_lora",
    "merge_lora",
    "quantize_fp8",
    "from_peft",
    "save_adapter",
    "load_adapter",
    "set_adapter",
    "delete_adapter",
    "adapter_batch",
    "trainable_parameters",
    "print_trainable_parameters",
    "FastLoRAConfig",
    "set_backend",
    "get_backend",
    "use_backend",
    "__version__",
]
