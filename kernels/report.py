"""Compile every launchable kernel config for GPU targets and report its resources.

    python -m fastlora.kernels.report --arch 80 90      (or ``-m kernels.report`` in a checkout)

Registers and spills are read from the cubins Triton builds (``cuobjdump
--dump-resource-usage``); after the builds, every dispatch candidate is listed with its
kernels' worst registers and spills.

One row per kernel / config / dtype / rank block / arch / build (sm_90: "tma", the
persistent tensor-descriptor build, and "ptr", its fallback for unaligned strides and
torch.compile; an FP8 base has no sm_90 "ptr" build: such calls decode W once and run the
dense kernels):
shared memory, registers, spill bytes, whether the PTX uses wgmma and TMA
(``cp.async.bulk.tensor``), the deepest ``wgmma.wait_group``, persistent or not, and
resident CTAs per SM.  Exit status 1 when a build fails to compile, needs more shared
memory than the arch has, spills, is an sm_90 TMA build that uses wgmma without TMA, or
is a GEMM main loop (forward, dx) on sm_90 whose wgmma waits only with depth 0 (a
warp-specialized build may: its loads run in a producer partition, checked from the PTX
by ``_compile.producer_split``, which it fails without), or an
sm_90 TMA build of an FP8 main loop whose PTX has no TMA load.  Every
kernel the launchers can start is built (``_configs.configs_for``), through
``triton.compile`` (so Triton's cache holds each build's PTX).  No GPU is needed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the interpreter cannot compile
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, minus its warning

from . import _compile, _configs  # noqa: E402
from .dequant_4bit import BASES_4BIT as _BASES_4BIT  # noqa: E402
from .dequant_fp8 import BASES_FP8  # noqa: E402

_configs._INTERPRETING = False  # the package may have been imported with the interpreter on
# the bases built by default (CI): dense, and the FP8 loader (its builds are few: no sm_90
# pointer build, no IEEE fp32 tiles); the 4-bit decode's builds are asked for by --base
DEFAULT_BASES = ("dense", "e4m3")


def jobs(archs, dtypes, r_pads, kernels=_configs.KERNELS, bases=("dense",), adapters=("lora",)):
    """(arch, dtype, r_pad, kernel, config, build, base, adapter variant) for every
    launchable config; with ``r_pads`` None, each config at the largest rank block it is
    launched with (the rank block only adds registers and shared memory, so that is its
    worst case).  The W mainloops (forward, dx) are built once per base kind in ``bases``;
    DoRA's variants (dense base: a 4-bit DoRA layer takes the torch path) for the kernels
    DoRA changes, "dora_dropout" for those with its second accumulator."""
    for arch in archs:
        for dtype in dtypes:
            kind = _compile.operand_kind(dtype)
            for kernel in kernels:
                if kernel in _configs.SGMV_KERNELS:
                    yield from _sgmv_jobs(arch, dtype, kind, r_pads, kernel)
                    continue
                if kernel in _compile.STANDALONE:  # one config, no rank, no adapter
                    if _compile.DTYPES[dtype][1] == _compile.DTYPES[dtype][0]:
                        yield (arch, dtype, _configs.MMA_MIN_R, kernel,
                               _compile.STANDALONE[kernel], "ptr", "dense", "lora")
                    continue
                # the reduce kernel has no TMA path: one build per arch
                builds = _compile.BUILDS[arch][-1:] if kernel == "reduce" else _compile.BUILDS[arch]
                for build, adapter in itertools.product(builds, adapters):
                    if adapter != "lora" and kernel not in _compile.DORA_KERNELS:
                        continue
                    if adapter == "dora_dropout" and kernel not in _configs.DROPOUT_ACC_KERNELS:
                        continue  # the same build as "dora"
                    kinds = bases if kernel in _compile.BASE_KERNELS and adapter == "lora" \
                        else ("dense",)
                    for base in kinds:  # a 4-bit base may launch its own tiles
                        if base in BASES_FP8 and arch >= 90 and build != "tma":
                            continue  # never launched: sm_90 FP8 calls off TMA decode once
                        seen = {}
                        for r_pad in _configs.R_PADS:
                            for cfg in _configs.configs_for(
                                kernel, kind, r_pad, interpreter=False, tma=build == "tma",
                                adapter=adapter, base=base,
                            ):  # fmt: skip
                                seen.setdefault(cfg, []).append(r_pad)
                        for cfg, pads in seen.items():
                            for r_pad in (pads if r_pads is None
                                          else [p for p in pads if p in r_pads]):
                                if r_pads is None and r_pad != max(pads):
                                    continue
                                yield arch, dtype, r_pad, kernel, cfg, build, base, adapter


def _sgmv_jobs(arch, dtype, kind, r_pads, kernel):
    """The multi-adapter kernels (lora_sgmv.py): pointer loads only (gathered rows), dense
    base, each config at its largest rank block (or at ``r_pads``)."""
    seen = {}
    for r_pad in _configs.R_PADS:
        for cfg in _configs.sgmv_configs(kernel, kind, r_pad, interpreter=False):
            seen.setdefault(cfg, []).append(r_pad)
    # the adapter column says which operand the kernel streams: "A" (the x side: u, the dx
    # expand, with dropout) or "B" (g, the y expand: B^T r-contiguous, row stride R)
    sides = ("A", "B") if kernel in ("sgmv_shrink", "sgmv_expand") else ("A",)
    for cfg, pads in seen.items():
        for r_pad in [max(pads)] if r_pads is None else [p for p in pads if p in r_pads]:
            for side in sides:
                yield arch, dtype, r_pad, kernel, cfg, "ptr", "dense", side


def problems_of(job, res) -> list[str]:
    """The failure rules (module docstring) applied to one build's resources."""
    arch, _, _, kernel, _, build, _, _ = job
    problems = []
    limit = _compile.SMEM_LIMIT[arch]
    if res.shared > limit:
        problems.append(f"shared {res.shared} > {limit}")
    if res.spill_bytes:
        problems.append(f"spills {res.spill_bytes} B")
    if arch >= 90 and build == "tma" and res.wgmma and not res.tma:
        problems.append("wgmma without TMA")
    if arch >= 90 and build == "tma" and job[6] == "e4m3" and not res.tma:
        problems.append("FP8 codes not loaded through TMA")
    specialized = kernel in _configs.WARP_SPEC_KERNELS and arch >= 90 and build == "tma"
    if specialized and not res.producer_split:
        problems.append("not warp-specialized: no producer partition holds the TMA loads")
    if arch >= 90 and kernel in _configs.GEMM_KERNELS and res.wgmma and res.wait_depth < 1 \
            and not (specialized and res.producer_split):
        problems.append(f"main loop waits with depth {res.wait_depth}")
    return problems


def check(job):
    arch, dtype, r_pad, kernel, cfg, build, base, adapter = job
    t0 = time.perf_counter()
    try:
        compiled = _compile.compile_kernel(kernel, dtype, cfg, arch, r_pad, build, base,
                                           adapter)
        persistent = build == "tma" and kernel in _configs.GEMM_KERNELS
        res = _compile.resources(compiled, arch, cfg.num_warps, persistent)
    except Exception as exc:  # a config that does not compile is a failure to report
        first_line = (str(exc).splitlines() or [""])[0][:120]
        return job, None, f"compile error: {type(exc).__name__}: {first_line}", 0.0
    return job, res, "; ".join(problems_of(job, res)), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                    choices=sorted(_compile.SMEM_LIMIT))  # fmt: skip
    ap.add_argument("--dtype", nargs="+", default=list(_compile.DTYPES),
                    choices=list(_compile.DTYPES))  # fmt: skip
    ap.add_argument("--r-pad", type=int, nargs="+", default=None, choices=_configs.R_PADS,
                    help="rank blocks to build (default: each config at its largest)")  # fmt: skip
    kernels = [*_configs.KERNELS, *_compile.STANDALONE, *_configs.SGMV_KERNELS]
    ap.add_argument("--kernel", nargs="+", default=kernels, choices=kernels)
    ap.add_argument("--base", nargs="+", default=list(DEFAULT_BASES),
                    choices=["dense", *_BASES_4BIT, "e4m3"],
                    help="base kinds of the forward/dx main loops (default: dense e4m3; "
                         "nf4_dq is QLoRA's default 4-bit base; FP4 and non-nested differ "
                         "only in the decode's constants and one load; e4m3: FP8 codes with "
                         "128x128 block scales)")  # fmt: skip
    ap.add_argument("--adapter", nargs="+", default=list(_compile.ADAPTERS),
                    choices=_compile.ADAPTERS)  # fmt: skip
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    todo = list(jobs(args.arch, args.dtype, args.r_pad, args.kernel, args.base, args.adapter))
    t0 = time.perf_counter()
    header = f"{'kernel':7} {'config (BM,BN,BK,w,s)':22} {'dtype':10} {'r_pad':>5} {'arch':>5} " \
             f"{'build':5} {'base':6} {'adapter':12} {'smem B':>7} {'regs':>4} {'spill B':>7} {'wgmma':>5} {'TMA':>3} " \
             f"{'wait':>4} {'pers':>4} {'CTA/SM':>6}  status"  # fmt: skip
    print(header)
    failed = 0
    worst: dict[str, list] = {}  # kernel -> [max registers, max spill bytes, failures]
    with ProcessPoolExecutor(args.jobs) as pool:
        for job, res, problem, _ in pool.map(check, todo):
            w = worst.setdefault(job[3], [0, 0, 0])
            if res:
                w[0], w[1] = max(w[0], res.registers), max(w[1], res.spill_bytes)
            w[2] += bool(problem)
            arch, dtype, r_pad, kernel, c, build, base, adapter = job
            cfg = f"{c.block_m},{c.block_n},{c.block_k},{c.num_warps},{c.num_stages}"
            yn = {True: "yes", False: "no"}
            if res:
                cols = f"{res.shared:7d} {res.registers:4d} {res.spill_bytes:7d} " \
                       f"{yn[res.wgmma]:>5} {yn[res.tma]:>3} {res.wait_depth:4d} " \
                       f"{yn[res.persistent]:>4} {res.ctas_per_sm:6d}"  # fmt: skip
            else:
                cols = f"{'-':>7} {'-':>4} {'-':>7} {'-':>5} {'-':>3} {'-':>4} {'-':>4} {'-':>6}"
            failed += bool(problem)
            print(f"{kernel:7} {cfg:22} {dtype:10} {r_pad:5d} sm_{arch:<2} {build:5} {base:6} "
                  f"{adapter:12} {cols}  "
                  f"{'FAIL ' + problem if problem else 'ok'}", flush=True)  # fmt: skip
    failed += candidate_summary(worst)
    print(f"{len(todo)} kernel builds, {failed} failing, {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def candidate_summary(worst: dict[str, list]) -> int:
    """Print each dispatch candidate (``fastlora.kernels.api``'s dicts and the composition)
    with its kernels' worst registers and spills over the builds made; returns the number
    of failures: a candidate with no kernels in ``_compile.CANDIDATE_KERNELS``, or one of
    whose kernels failed."""
    from . import api

    print("\ncandidate               kernels                      max regs  max spill B  status")
    failed = 0
    for direction, names in (("forward", api.FORWARD_CANDIDATES),
                             ("backward", api.BACKWARD_CANDIDATES)):
        for name in [*names, "composition"]:
            kernels = _compile.CANDIDATE_KERNELS.get((direction, name))
            if kernels is None:
                failed += 1
                print(f"{direction + '/' + name:23} FAIL no kernels listed in "
                      "kernels/_compile.py CANDIDATE_KERNELS")
                continue
            built = [worst[k] for k in kernels if k in worst]
            regs = max((w[0] for w in built), default=0)
            spill = max((w[1] for w in built), default=0)
            bad = sum(w[2] for w in built)
            failed += bool(bad)
            status = "not built (--kernel)" if not built else (
                f"FAIL ({bad} failing builds)" if bad else "ok")
            print(f"{direction + '/' + name:23} {','.join(kernels):28} {regs:8d} {spill:12d}  "
                  f"{status}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
