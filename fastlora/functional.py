"""``lora_linear``: the functional op every module calls. It checks the inputs, applies
autocast the way ``nn.Linear`` does, flattens the leading dims and hands the call to the
backend that ``fastlora.backend.resolve`` picks."""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from fastlora import backend as _backend
from fastlora import bases

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor")
    return t


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument, what was expected and what came."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., in_features], got a 0-D tensor")
    base = bases.base_of(weight)  # a 4-bit weight is checked there, with its quant_state
    if base.kind == "dense":
        _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    N, K = base.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(
            f"x: expected last dimension in_features={K} (weight is [{N}, {K}]), "
            f"got shape {tuple(x.shape)}"
        )
    if r < 1:
        raise ValueError(f"lora_A: expected r >= 1 rows, got {r}")
    if tuple(lora_A.shape) != (r, K):
        raise ValueError(f"lora_A: expected shape [r, in_features]=[{r}, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [out_features, r]=[{N}, {r}], got {tuple(lora_B.shape)}")
    bases.check_compute_dtype(base, x)
    compute = base.compute_dtype_for(x)
    what = "the weight's dtype" if base.kind == "dense" else "x's dtype, the 4-bit compute dtype"
    if x.dtype != compute:
        raise TypeError(f"x: expected dtype {compute} ({what}), got {x.dtype}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
        if bias.dtype != compute:
            raise TypeError(f"bias: expected dtype {compute} ({what}), got {bias.dtype}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {t.device}")
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces float attributes as symbols, which have no value
        # to check here; they were checked where they were set (FastLoRALinear, eager calls)
        return
    if not _is_number(scaling) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
    if not _is_number(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")


# Signatures of argument sets check_inputs passed (a call with the same types, dtypes,
# devices, shapes and hyperparameters needs no second look); bounded like a cache
_checked: set = set()
_CHECKED_LIMIT = 4096
_PLAIN = (Tensor, torch.nn.Parameter)


def _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> tuple | None:
    """Everything ``check_inputs`` reads, or None where that is not a plain tuple of values
    (a 4-bit weight: its quant_state is checked every call)."""
    if type(weight) not in _PLAIN or type(lora_A) not in _PLAIN or type(lora_B) not in _PLAIN:
        return None
    b = None if bias is None else (type(bias), bias.dtype, bias.device, bias.shape)
    return (
        type(x), x.dtype, x.device, x.shape[-1:], type(weight), weight.dtype, weight.device,
        weight.shape, b, lora_A.dtype, lora_A.device, lora_A.shape, lora_B.dtype,
        lora_B.device, lora_B.shape, type(scaling), scaling, type(dropout_p), dropout_p,
    )  # fmt: skip


def _check_once(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """``check_inputs``, skipped for an argument signature that already passed it: the
    same bad input still raises the same error (failures are never remembered)."""
    if torch.compiler.is_compiling():  # symbolic shapes: check as traced, remember nothing
        check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        return
    sig = _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if sig is not None and sig in _checked:
        return
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if sig is not None:
        if len(_checked) >= _CHECKED_LIMIT:
            _checked.clear()
        _checked.add(sig)


# one C call answers "no autocast anywhere" (the common case) without building x.device
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_on(x: Tensor) -> bool:
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return False
    return torch.is_autocast_enabled(x.device.type)


def _autocast_cast(t: object, dtype: torch.dtype) -> object:
    """What autocast does to one argument (``at::autocast::is_eligible``): floating-point
    tensors other than float64 go to the autocast dtype; anything else is left to the checks."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    magnitude: Tensor | None = None,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """``y = x W^T + b + scaling * (D(x) A^T) B^T`` (DESIGN.md section 1).

    x: [..., K], weight: [N, K], bias: [N] or None, lora_A: [r, K], lora_B: [N, r].
    ``weight`` may be a bitsandbytes 4-bit ``Params4bit`` (with its ``quant_state``): it is
    decoded into x's dtype, which must then be float16, bfloat16 or float32 (``fastlora.bases``).
    Dropout with rate ``dropout_p`` acts on the low-rank input only and only when
    ``training``. Returns [..., N] in x's dtype (or the autocast dtype under autocast).

    DoRA (PEFT's ``use_dora``) when ``magnitude`` [N] is given: the output columns are scaled
    by ``magnitude / ||W + scaling B A||`` (row norms, detached; see ``fastlora.dora``).
    ``weight_sq_norm`` [N]: ``||W_n||^2`` cached by the caller (computed when None).
    """
    _check_tensor("x", x)  # first: autocast has no state for some devices (meta)
    if _autocast_on(x):
        # as nn.Linear under autocast: cast before the dtype checks, since x and weight may
        # arrive in different dtypes (a bf16 activation into an fp32 layer); the casts are
        # differentiable, so gradients return in each tensor's own dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (_autocast_cast(t, dtype) for t in (x, weight, bias))
    _check_once(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if magnitude is not None:
        from fastlora import dora

        dora.check_magnitude(magnitude, weight_sq_norm, weight)
    p = float(dropout_p) if training else 0.0
    backend = _backend.resolve(x)
    if magnitude is None and backend == "triton":
        # takes x [..., K] as it is: flattened inside its autograd function, where the
        # reshape records no autograd view
        return _triton_backend().apply(x, weight, bias, lora_A, lora_B, float(scaling), p)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if magnitude is not None:
        y2d = dora.apply(backend, x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm,
                         float(scaling), p)
        return y2d.view(*lead, lora_B.shape[0])
    from fastlora import torch_backend

    y2d = torch_backend.apply(x2d, weight, bias, lora_A, lora_B, float(scaling), p)
    return y2d.view(*lead, lora_B.shape[0])


_triton: ModuleType | None = None


def _triton_backend() -> ModuleType:
    # imported on first use: the torch path must work where Triton cannot be imported
    global _triton
    if _triton is None:
        from fastlora import triton_backend

        _triton = triton_backend
    return _triton
