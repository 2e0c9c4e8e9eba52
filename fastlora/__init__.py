"""fastlora: LoRA at the cost of the frozen linear layer.

``FastLoRALinear`` is a drop-in ``nn.Linear``; ``lora_linear`` is the functional op under
it; ``set_backend`` picks the implementation ("auto", "torch", "triton").
"""

from fastlora.backend import get_backend, set_backend, use_backend
from fastlora.functional import lora_linear
from fastlora.layer import FastLoRALinear

__version__ = "0.1.0"

__all__ = [
    "FastLoRALinear",
    "lora_linear",
    "set_backend",
    "get_backend",
    "use_backend",
    "__version__",
]
