"""LoRA over an FP8 base on the CPU: ``python -m benchmarks.fp8``.

One interleaved run (``timing.cpu_interleaved``) of fwd+bwd (x requires grad) for
- ``linear``: the frozen nn.Linear with the dense weight (the floor),
- ``fastlora_fp8``: FastLoRALinear over ``Fp8Linear.from_linear`` of it (torch backend: W
  decoded into the workspace in forward and again in backward),
- ``peft``: PEFT's LoRA layer over an nn.Linear holding the dequantized FP8 weight (the same
  values fastlora computes with, kept dense),
- ``fastlora_dense``: fastlora's torch path over that dense weight (what the decode adds is
  the difference to ``fastlora_fp8``),
at dropout p = 0 and p = 0.1. Printed: each ratio as the median over rounds of the ratio
within a round (``timing.paired_ratio``); lower is better. A shared machine moves them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

import fastlora
from benchmarks import cases as C
from benchmarks.run import timing_jobs
from benchmarks.timing import cpu_interleaved, paired_ratio
from fastlora import fp8

# the goals: fwd+bwd of fastlora_fp8 over the frozen linear at p = 0, and over PEFT at 0.1
GOALS = {("fastlora_fp8", 0.0, "linear"): 1.25, ("fastlora_fp8", 0.1, "peft"): 0.90}
# context, no goal: the decode's share
CONTEXT = {("fastlora_fp8", 0.0, "fastlora_dense"), ("fastlora_dense", 0.0, "linear")}


def _setups(spec: C.Spec) -> dict:
    inp = C.make_inputs(spec)
    q = fp8.Fp8Linear.from_linear(inp.linear)
    dequant = copy.deepcopy(inp.linear)
    with torch.no_grad():
        dequant.weight.copy_(fp8.dequantize(q.weight, q.weight_scale_inv, q.block_size, spec.dtype))
    fp8_inp = copy.copy(inp)
    fp8_inp.linear = q
    peft_inp = copy.copy(inp)
    peft_inp.linear = dequant
    layer = C._fastlora_layer(fp8_inp)
    cases = {
        "linear": (C.setup_linear(inp), inp),
        "fastlora_fp8": (C.Case("fastlora_fp8", C._WithBackend(layer, "torch"),
                                [layer.lora_A, layer.lora_B]), inp),
        "peft": (C.setup_peft(peft_inp), peft_inp),
        "fastlora_dense": (C.setup_fastlora_torch(peft_inp), peft_inp),
    }  # fmt: skip
    return {name: timing_jobs(case, i)[1]["fwd+bwd"] for name, (case, i) in cases.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    jobs = {}
    for p in (0.0, 0.1):
        spec = C.Spec(args.M, args.K, args.N, args.r, p, torch.float32, "cpu")
        for name, job in _setups(spec).items():
            jobs[(name, p)] = job
    started = time.time()
    res = cpu_interleaved(jobs, reps=args.reps, group=lambda key: key)
    out = {"shape": f"M={args.M} K={args.K} N={args.N} r={args.r} fp32 cpu",
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "fastlora": fastlora.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
           "median_ms": {f"{n} p={p}": round(r["median"], 2) for (n, p), r in res.items()},
           "ratios": {}}  # fmt: skip
    for (name, p, base), goal in GOALS.items():
        ratio = paired_ratio(res[(name, p)], res[(base, p)])
        out["ratios"][f"{name}/{base} p={p}"] = {"ratio": round(ratio, 3), "goal": goal,
                                                 "met": ratio <= goal}  # fmt: skip
    for name, p, base in sorted(CONTEXT):
        ratio = paired_ratio(res[(name, p)], res[(base, p)])
        out["ratios"][f"{name}/{base} p={p}"] = {"ratio": round(ratio, 3)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
