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

from . import _configs, dropout_mask
from .dequant_fp8 import BASES_FP8
from .lora_backward import _lora_dx_kernel, _lora_dy_kernel, _lora_reduce_kernel
from .dora_norm import _dora_norm_kernel
from .lora_dx_gemm import _lora_dx_gemm_kernel, _lora_tail_kernel
from .lora_dy_pass import _lora_dy_split_kernel
from .lora_forward import _lora_forward_kernel, _lora_shrink_kernel
from .lora_sgmv import _sgmv_expand_kernel, _sgmv_segment_kernel, _sgmv_shrink_kernel

JIT_KERNELS = {
    "shrink": _lora_shrink_kernel,
    "forward": _lora_forward_kernel,
    "dy": _lora_dy_kernel,
    "dx": _lora_dx_kernel,
    "reduce": _lora_reduce_kernel,
    "dropout": dropout_mask._dropout_kernel,
}
# kernels outside the tile tables (_configs.KERNELS): their one launch config
STANDALONE = {
    "dropout": _configs.TileConfig(
        dropout_mask.BLOCK_M, 0, dropout_mask.BLOCK_K, dropout_mask.NUM_WARPS, 1,
        "the composition's dropout pass (kernels/dropout_mask.py): one fixed tile"),
}
# the kernels each dispatch candidate launches (fastlora.kernels.api FORWARD_CANDIDATES /
# BACKWARD_CANDIDATES, and the composition's Triton pass): the report lists every candidate
# with its kernels' worst resources, and fails on a candidate missing here
CANDIDATE_KERNELS = {
    ("forward", "fused"): ("shrink", "forward"),
    ("backward", "fused"): ("dy", "dx", "reduce"),
    ("forward", "composition"): ("dropout",),
    ("backward", "composition"): ("dropout",),
    # the candidates of kernels/backward_candidates.py (a 4-bit decode-once pass aside)
    ("backward", "dx_gemm"): ("dy", "dx_gemm", "tail"),
    ("backward", "split_dy"): ("dy_split", "dx_gemm_split", "tail_split"),
    ("forward", "decode_once"): ("shrink", "forward"),
    ("forward", "warp_spec"): ("shrink", "forward_ws"),
    # the hybrids: their skinny GEMMs are cuBLAS's (no Triton build), the rest Triton's
    ("forward", "cublas_shrink"): ("dropout", "forward"),
    ("backward", "dx_gemm_cublas"): ("dx_gemm", "tail"),
    ("backward", "decode_once"): ("dy", "dx", "reduce"),
}
# the backward candidates (backward_candidates.py) and DoRA's norm: built by the report, not
# (yet) by the ahead-of-time C build, which reads JIT_KERNELS
CANDIDATE_JIT_KERNELS = {
    "dy_split": _lora_dy_split_kernel,
    "dx_gemm": _lora_dx_gemm_kernel,
    "dx_gemm_split": _lora_dx_gemm_kernel,
    "dx_gemm_p0": _lora_dx_gemm_kernel,
    "forward_ws": _lora_forward_kernel,
    "tail": _lora_tail_kernel,
    "tail_split": _lora_tail_kernel,
    "dora_norm": _dora_norm_kernel,
    # the multi-adapter (SGMV) kernels, lora_sgmv.py
    "sgmv_shrink": _sgmv_shrink_kernel,
    "sgmv_expand": _sgmv_expand_kernel,
    "sgmv_segment": _sgmv_segment_kernel,
}
# the candidates' builds: g from the row dy pass (one part in the activation dtype) or the
# split one (fp32 parts; the most it launches compiled, _configs.MAX_G_PARTS)
_CANDIDATE_BUILDS = {
    "dx_gemm": {"G_PARTS": 1, "WARP_SPEC": False},
    "dx_gemm_split": {"G_PARTS": _configs.MAX_G_PARTS, "WARP_SPEC": False},
    "dx_gemm_p0": {"G_PARTS": 1, "WARP_SPEC": False, "HAS_DROPOUT": False},  # p = 0 only
    "forward_ws": {"WARP_SPEC": True},
    "tail": {"G_PARTS": 1},
    "tail_split": {"G_PARTS": _configs.MAX_G_PARTS},
}
_FP32_G = ("dy_split", "dx_gemm_split", "tail_split")

# dtype variant -> (activation type, adapter type, dot input precision).  Adapters are
# read in their own dtype: "bf16+fp32" is PEFT's default on a bf16 model.
DTYPES = {
    "fp16": ("fp16", "fp16", "ieee"),
    "bf16": ("bf16", "bf16", "ieee"),
    "bf16+fp32": ("bf16", "fp32", "ieee"),
    "fp16+fp32": ("fp16", "fp32", "ieee"),
    "fp32": ("fp32", "fp32", "ieee"),
    "tf32": ("fp32", "fp32", "tf32"),  # fp32 tensors with torch's allow_tf32 on
}
_ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_ADAPTER_PTRS = {"a_ptr", "b_ptr", "da_ptr", "db_ptr", "mag_ptr", "dm_ptr", "rhs_ptr"}
_SPECIAL_PTRS = {"seed_ptr": "*i64", "ws_ptr": "*fp32", "wsa_ptr": "*fp32", "wsb_ptr": "*fp32",
                 "wsm_ptr": "*fp32", "norm_ptr": "*fp32",
                 # SGMV: the sort (int64 index, order), segment bounds, (s, p) table
                 "order_ptr": "*i64", "sidx_ptr": "*i64", "bounds_ptr": "*i64",
                 "table_ptr": "*fp32"}
# DoRA's operands: None (constexpr) in a LoRA build, as the launchers pass them
_DORA_PTRS = ("z_ptr", "mag_ptr", "norm_ptr", "wsm_ptr", "dm_ptr")
_FLOATS = {"scaling", "dropout_p"}
# the 4-bit base's loader arguments (kernels/dequant_4bit.py); q_absmax_ptr is uint8 codes
# under double quantization, fp32 otherwise; blocksizes are powers of two >= 32 (bitsandbytes)
_Q_ARGS = {
    "q_absmax_ptr": "*fp32", "q_code2_ptr": "*fp32", "q_absmax2_ptr": "*fp32",
    "q_offset_ptr": "*fp32",
}
# the blocksizes compiled for a 4-bit build: QLoRA's default (bitsandbytes' 64, nested 256)
Q_BLOCKSIZES = {"Q_BLOCKSIZE": 64, "Q_NESTED_BLOCKSIZE": 256}
# the FP8 base (kernels/dequant_fp8.py): the checkpoints' 128x128 scale blocks
FP8_BLOCKSIZES = {"Q_BLOCKSIZE": 128, "Q_NESTED_BLOCKSIZE": 128}
# kernels with a W mainloop, built for each base kind the report is asked for
BASE_KERNELS = ("forward", "dx")
# last-dimension strides of contiguous tensors: Triton specialises a stride of 1 to a constant
_UNIT_STRIDES = {
    "shrink": {"stride_xk", "stride_ak", "stride_ur"},
    "forward": {"stride_xk", "stride_wk", "stride_ur", "stride_br", "stride_yn"},
    "dy": {"stride_dyn", "stride_br", "stride_ur", "stride_gr"},
    "dx": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_xk", "stride_dxk"},
    "reduce": set(),
    # SGMV, the x side (shrink of x with A [n, R, K], dx expand with A): K-contiguous A
    "sgmv_shrink": {"stride_sc", "stride_rc"},
    "sgmv_expand": {"stride_rc", "stride_oc"},
    # ... and the B side (g = s dy B, y += u B^T): B [n, N, R] read as B^T, r-contiguous
    ("sgmv_shrink", "B"): {"stride_sc", "stride_rr"},
    ("sgmv_expand", "B"): {"stride_rr", "stride_oc"},
    "sgmv_segment": {"stride_xk", "stride_dak", "stride_dyn", "stride_dbr"},
    "dy_split": {"stride_dyn", "stride_br", "stride_ur"},
    "dx_gemm": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_dxk"},
    "tail": {"stride_xk", "stride_gr"},
    "dropout": {"stride_tk", "stride_ok"},
}
_UNIT_STRIDES["dx_gemm_split"] = _UNIT_STRIDES["dx_gemm_p0"] = _UNIT_STRIDES["dx_gemm"]
_UNIT_STRIDES["tail_split"] = _UNIT_STRIDES["tail"]
_UNIT_STRIDES["forward_ws"] = _UNIT_STRIDES["forward"]
_UNIT_STRIDES["dora_norm"] = {"stride_wk", "stride_ak", "stride_br"}
# sizes that are r (or counts) and so not known to be multiples of 16
_NOT_DIVISIBLE = {
    "R", "NUM_PROGS", "stride_um", "stride_gm", "stride_bn", "stride_wsn", "stride_wsp",
    "NA", "NB", "PA", "PB", "PROGS_A", "PM", "PROGS_AB", "stride_gs", "stride_dar", "N_PER",
    "NUM_ADAPTERS", "TILES_K", "stride_lm", "stride_rc", "stride_daa", "stride_dba", "stride_dbn",
}
# the constexpr flags compiled: every optional piece of code on
FLAGS = {
    "HAS_BIAS": True, "HAS_DROPOUT": True, "COMPUTE_DX": True, "NEED_DA": True,
    "WRITE_G": True, "NEED_DB": True, "NEED_DM": True, "HAS_DM": True,
}
# adapter variants (_configs.ADAPTERS): the ADAPTER constexpr and whether DoRA's dropout
# accumulators are compiled in; DoRA changes these kernels only
ADAPTERS = _configs.ADAPTERS
DORA_KERNELS = ("forward", "dy", "dx", "reduce")
SMEM_LIMIT = _configs.SMEM_LIMIT
# builds per arch: sm_90 launches the TMA build, and the pointer build where a stride or
# base address is not 16-byte aligned; sm_80 the pointer build only
BUILDS = {80: ("ptr",), 86: ("ptr",), 89: ("ptr",), 90: ("tma", "ptr")}


def operand_kind(dtype: str) -> str:
    """The config table a dtype variant launches from (``_configs.operand_kind``)."""
    act, _, precision = DTYPES[dtype]
    return _configs.operand_kind(_ESIZE[act], precision)


def _base_constexpr(base: str, tma: bool) -> str:
    """The ``BASE`` a launcher passes: dense and FP8 take their TMA loader in a TMA build."""
    if base == "dense":
        return "dense_tma" if tma else "dense"
    if base in BASES_FP8:
        return "e4m3_tma" if tma else "e4m3"
    return base


def compile_kernel(
    kernel: str, dtype: str, config: _configs.TileConfig, arch: int, r_pad: int,
    build: str = "ptr", base: str = "dense", variant: str = "lora",
):  # fmt: skip
    """``triton.compile`` of one kernel for ``sm_<arch>``; ``build`` "tma" (tensor
    descriptors, persistent) or "ptr"; ``base`` "dense", a bitsandbytes 4-bit kind of
    ``BASES_4BIT`` or "e4m3" (FP8; the forward and dx GEMMs decode W in their K loop); ``variant`` one of
    ``ADAPTERS`` ("dora": DoRA's epilogues, "dora_dropout": also its second accumulators).
    Returns the CompiledKernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``)."""
    fn = JIT_KERNELS.get(kernel) or CANDIDATE_JIT_KERNELS[kernel]
    act, adapter, precision = DTYPES[dtype]
    tma = build == "tma"
    four_bit = base != "dense"
    constexprs = {
        "R_PAD": r_pad,
        "DOT_PRECISION": precision,
        "GROUP_M": _configs.GROUP_M,
        "USE_TMA": tma,
        "BASE": _base_constexpr(base, tma),
        "FLATTEN": tma and config.flatten,
        "EPI_SPLIT": 2 if tma else 1,
        "BLOCK": _configs.REDUCE_BLOCK,
        **FLAGS,
        "ADAPTER": "dora" if variant.startswith("dora") else "lora",
        # DoRA without dropout; SGMV's B side (g, the y expand) never runs dropout
        **({"HAS_DROPOUT": False} if variant in ("dora", "B") else {}),
        **({"NEED_DM": False, "HAS_DM": False} if variant == "lora" else {}),
        **({n: None for n in _DORA_PTRS} if variant == "lora" else {}),
        **(config.meta(kernel) if kernel not in STANDALONE else
           {"BLOCK_M": config.block_m, "BLOCK_K": config.block_k}),
        "WARP_SPEC": False,  # a constexpr with a default: passed, or it would be an i32
        **_CANDIDATE_BUILDS.get(kernel, {}),
    }
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    if four_bit:
        sizes = FP8_BLOCKSIZES if base in BASES_FP8 else Q_BLOCKSIZES
        constexprs.update({n: v for n, v in sizes.items() if n in fn.arg_names})
    else:  # the 4-bit loader's arguments: None, so dense cubins keep their params
        constexprs.update({n: None for n in fn.arg_names if n.lower().startswith("q_")})
    nested = base.endswith("_dq")
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _Q_ARGS:
            signature[name] = _Q_ARGS[name] if name != "q_absmax_ptr" else (
                "*u8" if nested else "*fp32")
            if name.endswith("_ptr"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "w_ptr" and four_bit:
            signature[name] = "*u8"  # packed codes, two per byte (4-bit) or one (FP8)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _UNIT_STRIDES.get((kernel, variant), _UNIT_STRIDES[kernel]):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif (name == "g_ptr" and kernel in _FP32_G) or (name == "out_ptr" and
                                                          kernel == "dora_norm"):
            signature[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _SPECIAL_PTRS:
            signature[name] = _SPECIAL_PTRS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*" + (adapter if name in _ADAPTER_PTRS else act)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in _NOT_DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


# Per-SM limits for the occupancy column (CUDA occupancy calculator, sm_80 and sm_90):
# 64K 32-bit registers, 2048 threads, 32 blocks; shared memory per SM (KB) per arch.
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_BLOCKS = 32
SM_SHARED = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


@dataclass
class Resources:
    shared: int
    registers: int
    spill_bytes: int
    wgmma: bool  # Hopper warpgroup MMA in the PTX
    tma: bool  # TMA bulk tensor copies (cp.async.bulk.tensor)
    wait_depth: int  # deepest wgmma.wait_group N (-1 without wgmma)
    persistent: bool  # programs loop over tiles (grid = SM count)
    ctas_per_sm: int
    producer_split: bool = False  # every TMA load in a producer partition (``producer_split``)


def ptx_facts(ptx: str) -> tuple[bool, bool, int]:
    """(uses wgmma, uses TMA, deepest wgmma.wait_group) read from a kernel's PTX."""
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return "wgmma.mma_async" in ptx, "cp.async.bulk.tensor" in ptx, max(waits, default=-1)


_SETMAXNREG = re.compile(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+);")
_TMA_LOAD = re.compile(r"cp\.async\.bulk\.tensor\.\d+d\.shared::(?:cta|cluster)\.global")


def producer_split(ptx: str) -> bool:
    """Whether a warp-specialized build keeps its loads apart from its MMAs, read from the
    PTX Triton lowers each partition into: the code from a ``setmaxnreg.dec`` to the lowest
    register budget (the producer warps) up to the next ``setmaxnreg`` holds every TMA load
    (``cp.async.bulk.tensor`` global -> shared) and no wgmma, and wgmma runs only in code
    after a ``setmaxnreg.inc`` (the consumers).  A build Triton did not specialize has no
    ``setmaxnreg``: False."""
    marks = list(_SETMAXNREG.finditer(ptx))
    if not marks:
        return False
    regions = [(m.group(1), int(m.group(2)), ptx[m.end():nxt.start() if nxt else len(ptx)])
               for m, nxt in zip(marks, [*marks[1:], None])]  # fmt: skip
    decs = [n for kind, n, _ in regions if kind == "dec"]
    if not decs:
        return False
    producer = [text for kind, n, text in regions if kind == "dec" and n == min(decs)]
    loads = len(_TMA_LOAD.findall(ptx))
    produced = sum(len(_TMA_LOAD.findall(text)) for text in producer)
    consumers_mma = any("wgmma.mma_async" in text for kind, _, text in regions if kind == "inc")
    return (loads > 0 and produced == loads and consumers_mma
            and not any("wgmma.mma_async" in text for text in producer))


def ctas_per_sm(arch: int, shared: int, registers: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers, threads and shared memory (allocation
    granularities ignored: an upper bound)."""
    threads = num_warps * 32
    limits = [SM_THREADS // threads, SM_BLOCKS, SM_REGISTERS // max(registers * threads, 1)]
    if shared:
        limits.append(SM_SHARED[arch] // shared)
    return min(limits)


def cuobjdump_path() -> str:
    """The cuobjdump Triton bundles (triton/backends/nvidia/bin)."""
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def cubin_usage(cubin: bytes) -> dict[str, int]:
    """Resource usage of the one function in a cubin, as ``cuobjdump --dump-resource-usage``
    (bundled with Triton) reads it: REG, STACK, SHARED, LOCAL, ... in registers / bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    line = re.search(r"^\s*REG:.*$", out, re.M)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line.group(0))}


def resources(compiled, arch: int, num_warps: int, persistent: bool) -> Resources:
    """Shared memory from the compiler's metadata; registers and spills from the cubin
    Triton built and caches (what a launch loads), read by the cuobjdump Triton bundles:
    spill bytes are the function's stack frame plus local memory (a Triton kernel has no
    calls or local arrays, so a non-empty stack is spilled registers; ``ptxas -v`` on the
    PTX without Triton's own flags reports fewer); the Hopper facts from the PTX."""
    usage = cubin_usage(compiled.asm["cubin"])
    regs = usage["REG"]
    spills = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    wgmma, tma, depth = ptx_facts(compiled.asm["ptx"])
    shared = compiled.metadata.shared
    occupancy = ctas_per_sm(arch, shared, regs, num_warps)
    return Resources(shared, regs, spills, wgmma, tma, depth, persistent, occupancy,
                     producer_split(compiled.asm["ptx"]))
