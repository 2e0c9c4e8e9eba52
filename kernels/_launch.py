"""How kernels are launched: autotuned over the shared config list, through
``torch.library.wrap_triton`` so torch.compile and opcheck see each launch."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton

from . import _configs


def launchable(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)``; the raw kernel under ``TRITON_INTERPRET=1``,
    where wrap_triton raises on some torch versions (pytorch issue 152868)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return kernel
    return torch.library.wrap_triton(kernel)


@functools.cache
def _autotuned(fn: Any, kernel: str, kind: str, r_pad: int) -> Any:
    configs = [
        triton.Config(c.meta(kernel), num_warps=c.num_warps, num_stages=c.num_stages)
        for c in _configs.configs_for(kernel, kind, r_pad)
    ]
    if not configs:
        raise ValueError(
            f"fastlora {kernel} kernel: no tile config for {kind} operands with rank block "
            f"{r_pad} (largest: {_configs.max_r_pad(kind)}); use the composition strategy"
        )
    return triton.autotune(configs=configs, key=_configs.AUTOTUNE_KEYS[kernel])(fn)


def tuned(fn: Any, kernel: str, dtype: torch.dtype, r_pad: int) -> Any:
    """The launchable, autotuned ``fn`` for operands of ``dtype`` and one rank block.
    One Autotuner per (kernel, operand kind, r_pad), so each sees only configs that fit."""
    kind = _configs.operand_kind(dtype.itemsize, dot_precision(dtype))
    return launchable(_autotuned(fn, kernel, kind, r_pad))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch would (``allow_tf32``), as cuBLAS does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
