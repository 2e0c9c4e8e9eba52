"""Ahead-of-time build of fastlora's Triton kernels into C sources (run by CMakeLists.txt).

    python aot/generate.py pack   --src ROOT --out build/gen/fl_pack.h
    python aot/generate.py cubins --src ROOT --arch 90 --dtype fp16 --out build/gen

``pack`` writes, for every kernel, a C function that lays the launch values out in the
kernel's parameter order (read from the ``@triton.jit`` function, so a renamed or added
argument fails the build here, not a launch on a GPU), and the checks that decide whether
the 16-aligned specialisation may run.  ``cubins`` compiles every variant for one arch
and dtype with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(no GPU needed) and writes ``fl_sm<arch>_<dtype>.c``: the cubins, embedded with
``.incbin``, and a table the runtime (aot/src/fastlora_kernels.c) picks from.

Variants per (arch, dtype, rank block R_PAD in 16/32/64/128), from ``_configs.configs_for``:
    shrink, forward, dy, dx  "large" (first config that fits) and "small" (last) tile, both
                             16-aligned; "generic" = the smallest pointer-build tile
                             without alignment hints.  On sm_90 "large" and "small" are
                             the TMA build (tensor descriptors built in the kernel, which
                             need per-CTA global scratch: the C API's workspace), "generic"
                             the cp.async build for strides TMA cannot take.
    flags                    forward: HAS_BIAS on/off; shrink, dx: HAS_DROPOUT on/off
plus one ``_lora_reduce_kernel`` (the fixed-order sum of the dA/dB partials).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, with the GPU tiles
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

PARAM_BYTES = {"ptr": 8, "i32": 4, "f32": 4}  # CUdeviceptr, int32_t, float
ALIGN = 16  # the divisibility Triton's runtime specialises on (pointers and ints)


@dataclass(frozen=True)
class Arg:
    """How one kernel argument is fed from C.  kind: ptr | i32 | f32 | unit | const.
    ``field``: the ``fl_launch`` member (aot/src/fl_internal.h) or, for const, the
    variant key; ``div``: hinted divisible by 16 in the aligned specialisation."""

    kind: str
    field: str = ""
    div: bool = True


def P(f, div=True):
    return Arg("ptr", f, div)


def I(f, div=True):  # noqa: E743
    return Arg("i32", f, div)


def F(f):
    return Arg("f32", f, False)


U = Arg("unit")  # a last-dimension stride: the C API takes contiguous rows, so it is 1


def C(key):
    return Arg("const", key)


# The 4-bit base's loader arguments (pointers and block sizes): None constexprs in the dense
# builds the C library holds.
Q_NONE = {n: C("none") for n in ("q_absmax_ptr", "q_code2_ptr", "q_absmax2_ptr",
                                 "q_offset_ptr", "Q_BLOCKSIZE", "Q_NESTED_BLOCKSIZE")}

# Every argument of every kernel, by name.  The hints mirror kernels/_compile.py (what
# Triton's runtime specialises for aligned tensors) except M, which is left unhinted so
# any M takes the fast path (a hint on M only sharpens the row mask).
KERNEL_ARGS = {
    "shrink": {
        "x_ptr": P("x"), "a_ptr": P("a"), "u_ptr": P("u"), "seed_ptr": P("seed"),
        "M": I("M", False), "K": I("K"), "R": I("R", False),
        "stride_xm": I("ldx"), "stride_xk": U, "stride_ar": I("lda"), "stride_ak": U,
        "stride_um": I("ldu", False), "stride_ur": U,
        "scaling": F("scaling"), "dropout_p": F("dropout_p"),
        "HAS_DROPOUT": C("flag"), "R_PAD": C("r_pad"), "DOT_PRECISION": C("precision"),
        "USE_TMA": C("tma"), "BLOCK_M": C("BLOCK_M"), "BLOCK_K": C("BLOCK_K"),
    },
    "forward": {
        "x_ptr": P("x"), "w_ptr": P("w"), "bias_ptr": P("bias"), "u_ptr": P("u"),
        "b_ptr": P("b"), "y_ptr": P("y"), **Q_NONE,
        # DoRA's operands: the C API builds LoRA only (ADAPTER "lora"), None as LoRA passes
        "z_ptr": C("none"), "mag_ptr": C("none"), "norm_ptr": C("none"), "seed_ptr": P("seed"),
        "dropout_p": F("dropout_p"), "ADAPTER": C("lora"), "HAS_DROPOUT": C("off"),
        "WARP_SPEC": C("off"),  # the "warp_spec" candidate's build: not in the C API
        "M": I("M", False), "N": I("N"), "K": I("K"), "R": I("R", False),
        "stride_xm": I("ldx"), "stride_xk": U, "stride_wn": I("ldw"), "stride_wk": U,
        "stride_um": I("ldu", False), "stride_ur": U, "stride_bn": I("ldb", False),
        "stride_br": U, "stride_ym": I("ldy"), "stride_yn": U,
        "NUM_PROGS": I("num_progs", False),
        "HAS_BIAS": C("flag"), "R_PAD": C("r_pad"), "DOT_PRECISION": C("precision"),
        "USE_TMA": C("tma"), "BASE": C("base"),
        "BLOCK_M": C("BLOCK_M"), "BLOCK_N": C("BLOCK_N"), "BLOCK_K": C("BLOCK_K"),
        "GROUP_M": C("GROUP_M"), "FLATTEN": C("flatten"), "EPI_SPLIT": C("epi_split"),
    },
    "dy": {
        "dy_ptr": P("dy"), "b_ptr": P("b"), "u_ptr": P("u"), "g_ptr": P("g"),
        "ws_ptr": P("ws_b"),
        "z_ptr": C("none"), "mag_ptr": C("none"), "norm_ptr": C("none"), "wsm_ptr": C("none"),
        "stride_zm": I("lddy"), "ADAPTER": C("lora"), "NEED_DM": C("off"),
        "M": I("M", False), "N": I("N"), "R": I("R", False),
        "stride_dym": I("lddy"), "stride_dyn": U, "stride_bn": I("ldb", False), "stride_br": U,
        "stride_um": I("ldu", False), "stride_ur": U, "stride_gm": I("ldg", False),
        "stride_gr": U, "stride_wsp": I("ws_b_split", False), "stride_wsn": I("ws_b_row", False),
        "scaling": F("scaling"),
        "WRITE_G": C("on"), "NEED_DB": C("on"), "R_PAD": C("r_pad"),
        "DOT_PRECISION": C("precision"), "USE_TMA": C("tma"),
        "BLOCK_M": C("BLOCK_M"), "BLOCK_N": C("BLOCK_N"),
    },
    "dx": {
        "dy_ptr": P("dy"), "w_ptr": P("w"), "g_ptr": P("g"), "a_ptr": P("a"), "x_ptr": P("x"),
        "seed_ptr": P("seed"), "dx_ptr": P("dx"), "ws_ptr": P("ws_a"), **Q_NONE,
        "mag_ptr": C("none"), "norm_ptr": C("none"), "ADAPTER": C("lora"),
        "M": I("M", False), "N": I("N"), "K": I("K"), "R": I("R", False),
        "stride_dym": I("lddy"), "stride_dyn": U, "stride_wn": I("ldw"), "stride_wk": U,
        "stride_gm": I("ldg", False), "stride_gr": U, "stride_ar": I("lda"), "stride_ak": U,
        "stride_xm": I("ldx"), "stride_xk": U, "stride_dxm": I("lddx"), "stride_dxk": U,
        "stride_wsp": I("ws_a_split", False), "stride_wsr": I("ws_a_row"),
        "dropout_p": F("dropout_p"), "NUM_PROGS": I("num_progs", False),
        "COMPUTE_DX": C("on"), "NEED_DA": C("on"), "HAS_DROPOUT": C("flag"),
        "R_PAD": C("r_pad"), "DOT_PRECISION": C("precision"), "USE_TMA": C("tma"),
        "BASE": C("base"), "BLOCK_M": C("BLOCK_M"), "BLOCK_N": C("BLOCK_N"),
        "BLOCK_K": C("BLOCK_K"), "GROUP_M": C("GROUP_M"), "FLATTEN": C("flatten"),
        "EPI_SPLIT": C("epi_split"),
    },
    "reduce": {
        "wsa_ptr": P("ws_a"), "da_ptr": P("da"), "wsb_ptr": P("ws_b"), "db_ptr": P("db"),
        "NA": I("na", False), "PA": I("pa", False), "NB": I("nb", False), "PB": I("pb", False),
        "PROGS_A": I("progs_a", False), "BLOCK": C("REDUCE_BLOCK"),
        "wsm_ptr": C("none"), "dm_ptr": C("none"), "norm_ptr": C("none"), "NM": I("nb", False),
        "PM": I("pb", False), "PROGS_AB": I("progs_a", False), "HAS_DM": C("off"),
    },
}  # fmt: skip
KERNEL_IDS = {k: i for i, k in enumerate(KERNEL_ARGS)}  # FL_K_<NAME> in fl_internal.h
M_TILED = ("shrink", "forward", "dy", "dx")
FLAG_NAME = {"shrink": "HAS_DROPOUT", "forward": "HAS_BIAS", "dx": "HAS_DROPOUT"}
ROLES = {"large": 0, "small": 1, "generic": 2}
DTYPES = {"fp16": 0, "bf16": 1}  # FASTLORA_FP16 / FASTLORA_BF16 in fastlora_kernels.h
KIND = "16bit"  # _configs.operand_kind of fp16/bf16 operands: their config table
# usable shared memory per block for archs _configs does not list (sm_86/89 class)
SMEM_DEFAULT = 99 * 1024
# TMA builds: a tensor descriptor built in the kernel takes 128 bytes of global scratch per
# CTA; the dx kernel builds four.  The C workspace reserves this much per CTA.
TMA_SCRATCH_PER_CTA = 512
TMA_SCRATCH_ALIGN = 256  # workspace sections are 256-aligned (fastlora_kernels.c)
# persistent grids (forward, dx on sm_90) are capped here, so the scratch bound does not
# depend on the device
MAX_PERSISTENT_CTAS = 1024
TMA_ARCH = 90
SOURCE_PACKAGE = "_fastlora_source_kernels"


def import_kernels(src: Path):
    """The kernels of the source tree being built (not whatever copy is installed), under a
    private package name: ``kernels/`` is a namespace portion, and an installed regular
    package named ``kernels`` would win over it."""
    package = types.ModuleType(SOURCE_PACKAGE)
    package.__path__ = [str(src / "kernels")]
    sys.modules[SOURCE_PACKAGE] = package
    _compile = importlib.import_module(SOURCE_PACKAGE + "._compile")
    _configs = importlib.import_module(SOURCE_PACKAGE + "._configs")
    # the C API's kernels; the composition's dropout pass is the Python backend's alone
    return {k: fn for k, fn in _compile.JIT_KERNELS.items() if k in KERNEL_ARGS}, _configs


def check_args(fns) -> None:
    for name, fn in fns.items():
        have, want = list(fn.arg_names), set(KERNEL_ARGS[name])
        if set(have) != want:
            raise SystemExit(
                f"aot/generate.py: kernel {name} ({fn.__name__}) changed its arguments: "
                f"new {sorted(set(have) - want)}, gone {sorted(want - set(have))}; "
                "update KERNEL_ARGS (and fl_launch in aot/src/fl_internal.h)"
            )


def runtime_args(fn, kernel):
    return [(n, KERNEL_ARGS[kernel][n]) for n in fn.arg_names if KERNEL_ARGS[kernel][n].kind
            in ("ptr", "i32", "f32")]  # fmt: skip


def min_block_m(cfg, kernel: str) -> int:
    """The smallest row tile any variant of ``kernel`` uses: bounds the partial counts."""
    return min(
        c.block_m
        for r_pad in cfg.R_PADS
        for tma in (False, True)
        for c in cfg.configs_for(kernel, KIND, r_pad, interpreter=False, tma=tma)
    )


# ---------------------------------------------------------------------------- pack


def write_pack(out: Path, fns, cfg) -> None:
    lines = [
        "/* generated by aot/generate.py pack: do not edit */",
        "#ifndef FL_PACK_H", "#define FL_PACK_H", '#include "fl_internal.h"', "",
        "/* mirrored from kernels/_configs.py and aot/generate.py */",
        f"#define FL_MAX_R {cfg.MAX_R}",
        f"#define FL_MMA_MIN_R {cfg.MMA_MIN_R}",
        f"#define FL_REDUCE_BLOCK {cfg.REDUCE_BLOCK}",
        f"#define FL_MIN_BM_SHRINK {min_block_m(cfg, 'shrink')}",
        f"#define FL_MIN_BM_DY {min_block_m(cfg, 'dy')}",
        f"#define FL_MIN_BM_DX {min_block_m(cfg, 'dx')}",
        f"#define FL_TMA_SCRATCH_PER_CTA {TMA_SCRATCH_PER_CTA}",
        f"#define FL_MAX_PERSISTENT_CTAS {MAX_PERSISTENT_CTAS}",
        f"#define FL_TMA_ARCH {TMA_ARCH}",
        "",
    ]  # fmt: skip
    for kernel, fn in fns.items():
        args = runtime_args(fn, kernel)
        names = ", ".join(n for n, _ in args)
        lines.append(f"/* {fn.__name__}: {names} */")
        lines.append(f"static int fl_aligned_{kernel}(const fl_launch* L) {{")
        conds = [f"FL_DIV16(L->{a.field})" for _, a in args if a.div and a.kind != "f32"]
        lines.append("    return " + (" &&\n           ".join(conds) or "1") + ";")
        lines.append("}")
        lines.append(f"static int fl_pack_{kernel}(const fl_launch* L, fl_params* P) {{")
        lines.append("    P->n = 0;")
        for n, a in args:
            macro = {"ptr": "FL_PUT_PTR", "i32": "FL_PUT_I32", "f32": "FL_PUT_F32"}[a.kind]
            lines.append(f'    {macro}(P, L->{a.field}, "{n}");')
        lines.append("    return fl_put_scratch(P);")
        lines.append("}")
        lines.append("")
    lines.append("typedef int (*fl_pack_fn)(const fl_launch*, fl_params*);")
    lines.append("static const fl_pack_fn fl_packers[FL_K_COUNT] = {")
    lines += [f"    fl_pack_{k}," for k in fns]
    lines.append("};")
    lines.append("static int (*const fl_aligned_checks[FL_K_COUNT])(const fl_launch*) = {")
    lines += [f"    fl_aligned_{k}," for k in fns]
    lines.append("};")
    lines.append("#endif")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- cubins


def compile_one(fn, kernel, dtype, arch, r_pad, tile, flag, aligned, tma, cfg):
    import triton
    from triton.backends.compiler import GPUTarget

    consts = {
        "flag": flag, "r_pad": r_pad, "precision": "ieee", "on": True, "tma": tma, "none": None,
        "off": False, "lora": "lora",
        "base": "dense_tma" if tma else "dense", "GROUP_M": cfg.GROUP_M,
        "flatten": bool(tma and tile is not None and tile.flatten), "epi_split": 2 if tma else 1,
        "REDUCE_BLOCK": cfg.REDUCE_BLOCK,
    }  # fmt: skip
    if tile is not None:
        consts.update({"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        a = KERNEL_ARGS[kernel][name]
        if a.kind == "const":
            signature[name], constexprs[name] = "constexpr", consts[a.field]
        elif a.kind == "unit":
            signature[name], constexprs[name] = "constexpr", 1
        elif a.kind == "ptr":
            special = {"seed_ptr": "*i64", "ws_ptr": "*fp32", "wsa_ptr": "*fp32",
                       "wsb_ptr": "*fp32"}  # fmt: skip
            signature[name] = special.get(name, "*" + dtype)
        else:
            signature[name] = a.kind.replace("f32", "fp32")
        if aligned and a.div and a.kind in ("ptr", "i32"):
            attrs[(i,)] = [["tt.divisibility", ALIGN]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    warps, stages = (tile.num_warps, tile.num_stages) if tile else (REDUCE_NUM_WARPS, 1)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})  # fmt: skip


REDUCE_NUM_WARPS = 4


def scratch_params(md) -> tuple[int, int]:
    """(trailing pointer parameters Triton's launcher appends: global and profile scratch;
    global scratch bytes per CTA).  Only TMA descriptor scratch is supported."""
    if getattr(md, "profile_scratch_size", 0):
        raise SystemExit("aot: kernels needing profile scratch memory are not supported")
    size = int(getattr(md, "global_scratch_size", 0))
    if size > TMA_SCRATCH_PER_CTA or int(getattr(md, "global_scratch_align", 1)) > \
            TMA_SCRATCH_ALIGN:  # fmt: skip
        raise SystemExit(f"aot: {md.name} needs {size} B of scratch per CTA (aligned "
                         f"{md.global_scratch_align}); the C workspace reserves "
                         f"{TMA_SCRATCH_PER_CTA} B, {TMA_SCRATCH_ALIGN}-aligned")  # fmt: skip
    n = int(hasattr(md, "global_scratch_size")) + int(hasattr(md, "profile_scratch_size"))
    return n, size


def write_cubins(out: Path, fns, cfg, arch: int, dtype: str) -> None:
    tag = f"sm{arch}_{dtype}"
    bindir = out / tag
    bindir.mkdir(parents=True, exist_ok=True)
    limit = cfg.SMEM_LIMIT.get(arch, SMEM_DEFAULT)
    entries, blobs, manifest, t0 = [], [], [], time.time()
    cache: dict = {}
    has_tma = arch >= TMA_ARCH

    def emit(kernel, r_pad, role, flag, tile, aligned, tma):
        key = (kernel, r_pad, flag, tile, aligned, tma)
        if key not in cache:
            ck = compile_one(fns[kernel], kernel, dtype, arch, r_pad, tile, flag, aligned, tma,
                             cfg)  # fmt: skip
            if ck.metadata.shared > limit:
                return None
            sym = f"fl_cubin_{tag}_{len(blobs)}"
            path = bindir / f"{kernel}_r{r_pad}_{role}_{flag}.cubin"
            path.write_bytes(ck.asm["cubin"])
            blobs.append((sym, path))
            md = ck.metadata
            nscratch, scratch = scratch_params(md)
            cache[key] = (sym, len(ck.asm["cubin"]), md.shared, md.name, nscratch, scratch)
            sizes = [PARAM_BYTES[a.kind] for _, a in runtime_args(fns[kernel], kernel)]
            manifest.append({"cubin": str(path.resolve()), "function": md.name, "arch": arch,
                             "params": sizes + [8] * nscratch})  # fmt: skip
        sym, size, shared, name, nscratch, scratch = cache[key]
        bm, bn, bk, warps = (tile.block_m, tile.block_n, tile.block_k, tile.num_warps) if tile \
            else (0, cfg.REDUCE_BLOCK, 0, REDUCE_NUM_WARPS)  # fmt: skip
        entries.append(
            f"    {{FL_K_{kernel.upper()}, {r_pad}, {ROLES[role]}, {int(flag)}, {bm}, {bn}, {bk}, "
            f'{warps}, {shared}, {int(tma)}, {scratch}, {nscratch}, "{name}", {sym}, {size}}},'
        )
        return True

    for r_pad in cfg.R_PADS:
        for kernel in M_TILED:
            fast = cfg.configs_for(kernel, KIND, r_pad, interpreter=False, tma=has_tma)
            ptr = cfg.configs_for(kernel, KIND, r_pad, interpreter=False)
            if not fast or not ptr:
                raise SystemExit(f"aot: no config for {kernel} r_pad={r_pad}")
            flags = (False, True) if kernel in FLAG_NAME else (False,)
            for role, order in (("large", fast), ("small", fast[::-1])):
                for flag in flags:
                    if not any(emit(kernel, r_pad, role, flag, t, True, has_tma) for t in order):
                        raise SystemExit(f"aot: no {kernel} r_pad={r_pad} tile fits sm_{arch}")
            # generic: the smallest pointer-build tile that fits, no alignment hints
            for flag in flags:
                if not any(emit(kernel, r_pad, "generic", flag, t, False, False)
                           for t in ptr[::-1]):  # fmt: skip
                    raise SystemExit(f"aot: no generic {kernel} r_pad={r_pad} fits sm_{arch}")
    emit("reduce", 0, "generic", False, None, False, False)

    c = [f"/* generated by aot/generate.py cubins --arch {arch} --dtype {dtype}: do not edit */",
         '#include "fl_internal.h"', ""]  # fmt: skip
    for sym, path in blobs:
        p = str(path.resolve()).replace("\\", "\\\\").replace('"', '\\"')
        asm = f'.section .rodata\\n.balign 16\\n{sym}:\\n.incbin \\"{p}\\"\\n.previous\\n'
        c.append(f'__asm__("{asm}");')
        c.append(f'extern const unsigned char {sym}[] __attribute__((visibility("hidden")));')
    c.append("")
    c.append("static const fl_variant variants[] = {")
    c += entries
    c.append("};")
    c.append(f"const fl_table fl_table_{tag} = {{{arch}, {DTYPES[dtype]}, variants, "
             f"sizeof(variants) / sizeof(variants[0])}};")  # fmt: skip
    (out / f"fl_{tag}.c").write_text("\n".join(c) + "\n")
    # what the launcher passes, per cubin: aot/tests/check_abi.py compares it with the cubin
    (out / f"fl_{tag}.json").write_text(json.dumps(manifest, indent=0) + "\n")
    print(f"aot: sm_{arch} {dtype}: {len(blobs)} cubins, {len(entries)} variants, "
          f"{sum(p.stat().st_size for _, p in blobs) / 1e6:.1f} MB, "
          f"{time.time() - t0:.0f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=("pack", "cubins"))
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", type=int)
    ap.add_argument("--dtype", choices=tuple(DTYPES))
    a = ap.parse_args()
    fns, cfg = import_kernels(a.src)
    check_args(fns)
    if cfg.operand_kind(2, "ieee") != KIND:
        raise SystemExit(f"aot: _configs.operand_kind(2, 'ieee') is no longer {KIND!r}")
    if a.what == "pack":
        write_pack(a.out, fns, cfg)
    else:
        if a.arch is None or a.dtype is None:
            ap.error("cubins needs --arch and --dtype")
        write_cubins(a.out, fns, cfg, a.arch, a.dtype)


if __name__ == "__main__":
    main()
