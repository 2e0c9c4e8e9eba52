"""Compile one kernel for one GPU target without a GPU: the helpers the resource report
and a later ahead-of-time (CMake) build share, so both see the launch configs autotune
uses (``_configs.configs_for``).

The signature mirrors what Triton's runtime specialises for the common case: contiguous
last dimensions (stride constexpr 1), 16-byte aligned pointers and sizes divisible by 16,
and the feature flags that produce the most code (bias, dropout, dx and g all on).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

from . import _configs
from .lora_backward import _lora_da_kernel, _lora_db_kernel, _lora_dx_kernel
from .lora_forward import _lora_forward_kernel, _lora_shrink_kernel

JIT_KERNELS = {
    "shrink": _lora_shrink_kernel,
    "forward": _lora_forward_kernel,
    "dx": _lora_dx_kernel,
    "da": _lora_da_kernel,
    "db": _lora_db_kernel,
}

# dtype variant -> (operand type, dot input precision); adapters are cast to the operand
# type by the launchers, so every pointer but the seed and the fp32 workspace has it
DTYPES = {
    "fp16": ("fp16", "ieee"),
    "bf16": ("bf16", "ieee"),
    "fp32": ("fp32", "ieee"),
    "tf32": ("fp32", "tf32"),  # fp32 tensors with torch's allow_tf32 on
}
_ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_SPECIAL_PTRS = {"seed_ptr": "*i64", "ws_ptr": "*fp32"}
_FLOATS = {"scaling", "dropout_p"}
# last-dimension strides of contiguous tensors: Triton specialises a stride of 1 to a constant
_UNIT_STRIDES = {
    "shrink": {"stride_xk", "stride_ak", "stride_ur"},
    "forward": {"stride_xk", "stride_wk", "stride_ur", "stride_br", "stride_yn"},
    "dx": {"stride_dyn", "stride_wk", "stride_br", "stride_ak", "stride_dxk", "stride_gr"},
    "da": {"stride_gr", "stride_xk", "stride_wk"},  # ws [splits, r, K]
    "db": {"stride_dyn", "stride_ur", "stride_wr"},  # ws [splits, N, r]
}
# sizes that are r (or M_BUCKET) and so not known to be multiples of 16
_NOT_DIVISIBLE = {"R", "M_BUCKET", "stride_um", "stride_gm", "stride_bn"}
_NOT_DIVISIBLE_IN = {"db": {"stride_wn"}}
# the constexpr flags compiled: every optional piece of code on
FLAGS = {"HAS_BIAS": True, "HAS_DROPOUT": True, "COMPUTE_DX": True, "WRITE_G": True}
SMEM_LIMIT = _configs.SMEM_LIMIT


def operand_kind(dtype: str) -> str:
    """The config table a dtype variant launches from (``_configs.operand_kind``)."""
    act, precision = DTYPES[dtype]
    return _configs.operand_kind(_ESIZE[act], precision)


def compile_kernel(kernel: str, dtype: str, config: _configs.TileConfig, arch: int, r_pad: int):
    """``triton.compile`` of one kernel for ``sm_<arch>``; returns the CompiledKernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``)."""
    fn = JIT_KERNELS[kernel]
    act, precision = DTYPES[dtype]
    constexprs = {
        "R_PAD": r_pad,
        "DOT_PRECISION": precision,
        "GROUP_M": _configs.GROUP_M,
        "REDUCE_BLOCK_M": _configs.reduce_block_m(operand_kind(dtype)),
        **FLAGS,
        **config.meta(kernel),
    }
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES[kernel]:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _SPECIAL_PTRS:
            signature[name] = _SPECIAL_PTRS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*" + act
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in _NOT_DIVISIBLE | _NOT_DIVISIBLE_IN.get(kernel, set()):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


@dataclass
class Resources:
    shared: int
    registers: int
    spill_bytes: int


def resources(compiled, arch: int) -> Resources:
    """Shared memory from the compiler's metadata; registers and spills from the ptxas
    that Triton bundles, run with ``-v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return Resources(compiled.metadata.shared, regs, spills)
