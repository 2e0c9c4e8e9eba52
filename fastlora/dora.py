"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``): the adapter kind that adds a
trainable per-output magnitude ``m`` [N] to LoRA.

PEFT's semantics (``peft/tuners/lora/dora.py``), with ``norm_n = ||W_n + s (B A)_n||`` computed
from the detached LoRA weight and itself detached (DoRA paper section 4.3) and ``c = m / norm``:

    y = x W^T + b + (c - 1) * (D(x) W^T) + c * (s D(x) A^T) B^T        (column scales)

Writing ``z = D(x) W^T + u B^T`` (the pre-scale output, ``u = s D(x) A^T``):

    p = 0:  y = c * z + b
    p > 0:  y = x W^T + b + (c - 1) * z + u B^T

and backward (the norm is a constant):

    dm = colsum(dy * z) / norm                       [N]
    g  = s dy (c * B)                                [M, r]   (c scales B's rows: no [M, N] pass)
    dB = c * (dy^T u)                                [N, r]
    dA = g^T D(x)                                    [r, K]
    dx = dy (c * W) + g A                            p = 0
    dx = dy W + mask/(1-p) * (dy ((c - 1) * W) + g A)  p > 0

Cheap norms: ``norm^2 = ||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T`` in fp32
(fp64 for fp64 weights), clamped at 0 before the square root; ``||W_n||^2`` is cached by the
layer (``WeightNormCache``), ``W A^T`` is one [N, r] product per step. ``W + s B A`` is never
formed.

Saved for backward: ``x``, ``u`` [M, r], ``S = (x * mask) W^T`` [M, N] (``x W^T`` at p = 0),
``m`` and ``norm`` [N] and the packed dropout mask. ``S`` is the one [M, N] activation (``dm``
is ``(ks colsum(dy * S) + B . (u^T dy)) / norm``): without it ``dm`` needs either ``x W^T``
again or ``dy^T x`` (a third full GEMM, +50% of the frozen layer's fwd+bwd); PEFT saves two
[M, N] tensors (the base and the LoRA results) plus ``D(x)`` and the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import bases


# PEFT's state-dict name of the magnitude (``<module>.lora_magnitude_vector`` in a saved
# adapter, ``<module>.lora_magnitude_vector.<adapter>.weight`` in a live PeftModel)
MAGNITUDE_KEY = "lora_magnitude_vector"
# rows of W converted to fp32 at a time when W is half precision (bounds the transient copy)
_ROW_CHUNK = 2048


# --------------------------------------------------------------------------- the norm


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the norm: float32, or float64 for float64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_mm(weight: Tensor, right: Tensor) -> Tensor:
    """``weight @ right`` in ``right``'s (accumulation) dtype; a half-precision weight is
    converted a block of rows at a time, never as a whole [N, K] copy."""
    if weight.dtype == right.dtype:
        return torch.mm(weight, right)
    return torch.cat([torch.mm(weight[i : i + _ROW_CHUNK].to(right.dtype), right)
                      for i in range(0, weight.shape[0], _ROW_CHUNK)])


@torch.no_grad()
def weight_sq_norm(weight: Tensor) -> Tensor:
    """``||W_n||^2`` per output row: weight [N, K] -> [N] in the accumulation dtype."""
    acc = acc_dtype(weight.dtype)
    weight = bases.dense_weight(weight, acc)  # a 4-bit base is decoded (transient)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                sq_norm: Tensor | None = None) -> Tensor:
    """``||W_n + s (B A)_n||`` per row without forming ``W + s B A``: weight [N, K],
    lora_A [r, K], lora_B [N, r], sq_norm [N] (``weight_sq_norm(weight)``, computed if None).
    Returns [N] in the accumulation dtype, detached."""
    acc = acc_dtype(weight.dtype)
    A = lora_A.detach().to(acc)
    B = lora_B.detach().to(acc)
    if sq_norm is None:
        sq_norm = weight_sq_norm(weight)
    WA = _rows_mm(bases.dense_weight(weight, acc).detach(), A.t())  # [N, r]: one pass over W
    cross = torch.linalg.vecdot(B, WA)                     # B_n . (W A^T)_n
    quad = torch.linalg.vecdot(B @ (A @ A.t()), B)         # B_n (A A^T) B_n^T
    sq = sq_norm.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return sq.clamp_min_(0.0).sqrt_()


class WeightNormCache:
    """``||W_n||^2`` of a frozen base weight, recomputed when the weight changes.

    The key is the weight tensor's identity, storage, shape, dtype and autograd version
    counter: in-place writes (``copy_`` under ``no_grad``, ``load_state_dict``, an optimizer
    step on an unfrozen base), ``.to()``/``.data =`` replacements and a new ``weight``
    Parameter all miss it. Writes through ``weight.data`` bypass the version counter: owners
    call ``clear()`` where they do that (``merge``/``unmerge``)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Tensor | None = None

    @staticmethod
    def _key_of(weight: Tensor) -> tuple:
        return (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape),
                weight.dtype, weight.device)

    def get(self, weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return weight_sq_norm(weight)  # traced: the pass over W is part of the graph
        key = self._key_of(weight)
        if self._key != key or self._value is None:
            self._value = weight_sq_norm(weight)
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None



# --------------------------------------------------------------------------- the op


def check_magnitude(magnitude: object, sq_norm: object, weight: Tensor) -> None:
    """``TypeError``/``ValueError`` naming the argument for a bad magnitude or cached norm."""
    N = bases.out_in_features(weight)[0]
    for name, t in (("magnitude", magnitude), ("weight_sq_norm", sq_norm)):
        if t is None and name == "weight_sq_norm":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name}: expected shape [out_features]=[{N}], got {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(
                f"{name}: expected device {weight.device} (the weight's), got {t.device}")


def apply(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
          lora_B: Tensor, magnitude: Tensor, sq_norm: Tensor | None, scaling: float,
          dropout_p: float) -> Tensor:
    """x: [M, K] -> y: [M, N]: the norm (detached), then the backend's op.  Where the fused
    kernels run (``dora_triton.fused``), the norm is their one-launch direct form
    (``kernels/dora_norm.py``: reads W once in its dtype, no fp32 copy, no cached
    ``||W_n||^2`` needed); elsewhere the cheap form above with the cached ``sq_norm``."""
    if backend == "triton" and not bases.is_4bit(weight):  # a 4-bit base: the torch path
        from fastlora import dora_triton

        if dora_triton.fused(x, weight, lora_A):
            if dora_triton.norm_kernel_ok(lora_A.shape[0]):
                norm = dora_triton.weight_norm(weight, lora_A, lora_B, scaling)
            else:  # ranks the norm kernel has no tile for
                norm = weight_norm(weight, lora_A, lora_B, scaling, sq_norm)
            return dora_triton.apply_dora(x, weight, bias, lora_A, lora_B, magnitude, norm,
                                          scaling, dropout_p)  # fmt: skip
    from fastlora import dora_torch

    norm = weight_norm(weight, lora_A, lora_B, scaling, sq_norm)
    return dora_torch.apply_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling,
                                 dropout_p)  # fmt: skip
