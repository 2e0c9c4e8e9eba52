"""Initialisations of the LoRA factors (PEFT's names and conventions).

Two families:

- plain (``True``, ``"gaussian"``, ``False``): the base weight stays as it is; with ``B = 0``
  the layer starts equal to its base.
- decomposition (``"pissa"``, ``"olora"``): the weight splits into a low-rank part and a
  residual, ``W = s * B A + W_res``; the factors take the low-rank part and ``weight`` is
  overwritten with ``W_res``, so the layer's output is unchanged at step 0 while training
  starts from the principal (PiSSA) or leading-column (OLoRA) directions of ``W``.
  Factorisations run in float32 (float64 for a float64 weight), whatever the model dtype;
  the residual is taken against the factors as stored (after any cast to a low-precision
  dtype), so ``W_res + s * B A`` reproduces ``W`` as closely as the weight's dtype allows.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

InitMode = Union[bool, str]

# PEFT's `init_lora_weights` values that keep the base weight as it is
PLAIN_INITS = (True, False, "gaussian")
# values that split W into s * B A + W_res and overwrite the base weight with W_res
DECOMPOSITION_INITS = ("pissa", "olora")
INIT_MODES = PLAIN_INITS + DECOMPOSITION_INITS
# PEFT inits that leave the base weight untouched: an adapter trained from any of them loads
# like a plain one (the factors are overwritten by the checkpoint)
PEFT_BASE_PRESERVING_INITS = PLAIN_INITS + ("eva", "orthogonal")


def is_decomposition(mode: object) -> bool:
    """True for the inits that overwrite the base weight with a residual."""
    return isinstance(mode, str) and mode.lower() in DECOMPOSITION_INITS


def check_mode(mode: object, name: str = "init_lora_weights") -> InitMode:
    """Return ``mode`` (lower-cased when a string) or raise ``ValueError`` listing the choices."""
    if isinstance(mode, bool):
        return mode
    if isinstance(mode, str) and mode.lower() in ("gaussian",) + DECOMPOSITION_INITS:
        return mode.lower()
    hint = ""
    if isinstance(mode, str) and mode.lower().startswith("pissa_niter_"):
        hint = (
            " (PEFT's randomised 'pissa_niter_N' is not supported: its residual cannot be "
            "recomputed exactly when an adapter is reloaded; use 'pissa')"
        )
    raise ValueError(f"{name}: expected one of {INIT_MODES}, got {mode!r}{hint}")


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: float64 stays float64, every narrower float is lifted to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (PEFT's ``pissa_init``): ``W = U S V^T``, ``A = sqrt(S_r/s) V_r^T`` [r, in],
    ``B = U_r sqrt(S_r/s)`` [out, r], so ``s * B A`` is the best rank-r approximation of ``W``.
    ``weight``: [out, in]; returned in float32 (float64 for a float64 weight)."""
    if not scaling > 0:
        raise ValueError(
            f"init_lora_weights='pissa': needs scaling = lora_alpha / r > 0, got {scaling}"
        )
    W = weight.to(_compute_dtype(weight.dtype))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (PEFT's ``olora_init``): ``W = Q R``, ``A = R[:r]`` [r, in], ``B = Q[:, :r]``
    [out, r] (orthonormal columns). As in PEFT the factors are not divided by the scaling:
    the residual is ``W - s * Q_r R_r``. ``weight``: [out, in]."""
    Q, R = torch.linalg.qr(weight.to(_compute_dtype(weight.dtype)))
    return R[:r].contiguous(), Q[:, :r].contiguous()


@torch.no_grad()
def init_decomposition_(layer: nn.Module, mode: str) -> None:
    """Split ``layer.weight`` into ``scaling * lora_B @ lora_A + W_res`` and store ``W_res``
    in ``layer.weight`` (in place: a parameter shared with another module changes there too)."""
    weight = layer.weight
    out_features, in_features = weight.shape
    r = layer.lora_A.shape[0]
    if r > min(out_features, in_features):
        raise ValueError(
            f"init_lora_weights={mode!r}: r={r} exceeds min(out_features, in_features)="
            f"{min(out_features, in_features)} for a [{out_features}, {in_features}] weight"
        )
    if weight.is_meta:
        raise ValueError(
            f"init_lora_weights={mode!r}: the weight is on the meta device (no data to decompose)"
        )
    if mode == "pissa":
        A, B = pissa_factors(weight, r, layer.scaling)
    else:
        A, B = olora_factors(weight, r)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    W = weight.to(A.dtype)
    stored = layer.lora_B.to(A.dtype) @ layer.lora_A.to(A.dtype)
    weight.copy_(W - layer.scaling * stored)


def initialize(layer: nn.Module, mode: InitMode) -> None:
    """Initialise a ``FastLoRALinear``'s factors for ``mode`` (PEFT's ``init_lora_weights``).
    ``"pissa"``/``"olora"`` also overwrite ``layer.weight`` with the residual (see the module
    docstring); calling them twice decomposes the residual again."""
    mode = check_mode(mode)
    if is_decomposition(mode):
        init_decomposition_(layer, mode)
    else:
        init_plain_(layer.lora_A, layer.lora_B, mode)
