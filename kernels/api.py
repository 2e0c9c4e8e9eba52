"""The kernel layer's public face (``fastlora.kernels.api``): the fused LoRA forward and
backward launchers and what the backend reads of the configs.  Nothing here is
module-shaped; autograd and op registration live in ``fastlora.triton_backend``.

``kernels/`` has no ``__init__.py`` on purpose: run from a checkout's root, a regular
package would shadow the unrelated ``kernels`` package that transformers and bitsandbytes
import; a namespace portion yields to any regular package of that name on ``sys.path``."""

from . import _configs, _launch  # noqa: F401  (the backend reads them through this module)
from ._configs import MAX_R, MMA_MIN_R, configs_for, pad_rank
from ._launch import dot_precision
from .backward_candidates import cublas_shrink_forward, decode_once_backward, decode_once_forward
from .backward_candidates import dx_gemm_backward, dx_gemm_cublas_backward, split_dy_backward
from .dequant_4bit import dequantize_4bit
from .dora_norm import dora_weight_norm, norm_kernel_ok
from .dropout_mask import dropout_apply
from .lora_backward import dora_backward, lora_backward
from .lora_forward import dora_forward, fused_4bit_ok, lora_forward, warp_spec_forward
from .lora_sgmv import sgmv_backward, sgmv_forward, stack_adapters

# Candidates per direction, name -> launcher with lora_forward's / lora_backward's signature
# (base4= included); the dispatcher times each per shape bucket.  Every one regenerates the
# same dropout mask (_tiles.dropout_keep), so any forward pairs with any backward.  The
# hybrids ("cublas_shrink", "dx_gemm_cublas") run their skinny GEMMs on cuBLAS (torch.mm).
FORWARD_CANDIDATES = {
    "fused": lora_forward,
    "decode_once": decode_once_forward,
    "cublas_shrink": cublas_shrink_forward,
    "warp_spec": warp_spec_forward,
}
BACKWARD_CANDIDATES = {
    "fused": lora_backward,
    "dx_gemm": dx_gemm_backward,
    "split_dy": split_dy_backward,
    "decode_once": decode_once_backward,
    "dx_gemm_cublas": dx_gemm_cublas_backward,
}
# candidates that differ from "fused" only on a 4-bit base (a dense base runs "fused")
CANDIDATES_4BIT_ONLY = frozenset({"decode_once"})
# candidates that differ from "fused" only on sm_90 with a dense base (elsewhere they run
# "fused": the dispatcher does not time them there)
CANDIDATES_SM90_DENSE_ONLY = frozenset({"warp_spec"})

__all__ = [
    "BACKWARD_CANDIDATES", "CANDIDATES_4BIT_ONLY", "CANDIDATES_SM90_DENSE_ONLY",
    "FORWARD_CANDIDATES",
    "MAX_R", "MMA_MIN_R", "configs_for", "dequantize_4bit", "dora_backward", "dora_forward",
    "dora_weight_norm", "dropout_apply", "norm_kernel_ok",
    "dot_precision", "fused_4bit_ok",
    "lora_backward",
    "lora_forward",
    "pad_rank",
    "sgmv_backward",
    "sgmv_forward",
    "stack_adapters",
]
