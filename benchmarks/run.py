"""The benchmark suite's entry point: ``python -m benchmarks [--quick] [options]``.

For every case (shape K x N, tokens M, rank r, dropout p) it builds each provider on the
same inputs (``cases.py``), checks that each computes the same function as the reference,
measures the bytes saved for backward (and the CUDA peak), times fwd, bwd and fwd+bwd, and
reports every time as a ratio to the frozen ``nn.Linear`` of the same run. Writes
``results_<device>.json``, ``table_<device>.md`` and three PNGs into ``--out`` (default: a
fresh ``benchmarks/runs/<device>-<time>/``); prints the
table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

import torch

from benchmarks import cases as C
from benchmarks import report
from benchmarks.memory import cuda_peak_bytes, saved_bytes
from benchmarks.timing import cpu_interleaved, gpu_time, paired_ratio

LLAMA_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "14336x4096"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# relative max error (|got - ref| / max|ref|) against the fp32 reference that counts as a match
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def preset(device: str, quick: bool) -> dict:
    """Case lists, in run order (the cases the goals read come first, so a run cut short
    by ``--budget-s`` still has them)."""
    if device.startswith("cuda"):
        if quick:  # ~3 min on an H200; M=2048 only if the budget allows
            return dict(shapes=LLAMA_SHAPES[:3], m=[8192, 2048], r=[16], dropout=[0.0, 0.1],
                        budget_s=170, qlora=[])  # QLoRA rows: their own step in gpu_check.sh
        return dict(shapes=LLAMA_SHAPES, m=[8192, 512, 1024, 2048, 4096, 16384],
                    r=[16, 8, 64], dropout=[0.0, 0.1], budget_s=None,
                    qlora=[(s, 8192) for s in LLAMA_SHAPES[:3]])
    if quick:  # the foundation issue's shape first; < 5 min on a 2-core CPU
        return dict(cases=[("1024x1024", 2048), ("1024x1024", 512), ("1024x1024", 4096),
                           ("2048x2048", 2048)], r=[16], dropout=[0.0, 0.1], budget_s=240,
                    qlora=[("1024x1024", 2048)])
    return dict(shapes=["1024x1024", "2048x2048", "4096x4096"], m=[2048, 512, 1024, 4096],
                r=[16, 8, 64], dropout=[0.0, 0.1], budget_s=None,
                qlora=[("1024x1024", 2048), ("2048x2048", 2048)])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shape(text: str) -> tuple[int, int]:
    k, n = text.lower().split("x")
    return int(k), int(n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="the short preset (see preset())")
    ap.add_argument("--providers", default="all",
                    help="comma list of: linear, fastlora (= every backend), "
                         + ", ".join(C.PROVIDERS) + " (linear is always added)")
    ap.add_argument("--shapes", help="comma list of KxN (in x out), e.g. 4096x11008")
    ap.add_argument("--m", help="comma list of M (tokens)")
    ap.add_argument("--r", help="comma list of ranks")
    ap.add_argument("--dropout", help="comma list of dropout rates")
    ap.add_argument("--bias", action="store_true", help="give the base a bias (Llama has none)")
    ap.add_argument("--base", choices=["all", "dense", "nf4"], default=None,
                    help="the frozen base: dense nn.Linear, bitsandbytes NF4 Linear4bit (QLoRA "
                         "rows: linear is then the frozen Linear4bit, peft PEFT's QLoRA), or "
                         "all (both for every case).  Default: the preset's dense cases, then "
                         "its QLoRA cases; dense only with --shapes/--m")
    ap.add_argument("--reps", type=int, default=15, help="CPU: timed rounds (after 2 warm-up)")
    ap.add_argument("--warmup-ms", type=float, default=25, help="GPU: do_bench warm-up")
    ap.add_argument("--rep-ms", type=float, default=100, help="GPU: do_bench repetition time")
    ap.add_argument("--budget-s", type=float,
                    help="start no case after this many seconds, and on the CPU cut a case's "
                         "rounds (to >= 3) 20 s after it (default with --quick: 170 GPU, 240 "
                         "CPU; none otherwise)")
    ap.add_argument("--out", help="output directory (default: a fresh benchmarks/runs/<device>-"
                                  "<UTC time>/, so a run never overwrites the committed "
                                  "benchmarks/results/; pass --out benchmarks/results to update those)")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads(N) first (default: leave torch's setting; "
                         "1 steadies CPU timings on an oversubscribed machine)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--multi-adapter", type=int, metavar="E",
                    help="instead of the suite: mixed-adapter batches over E adapters against "
                         "PEFT's adapter_names forward and fastlora's single adapter "
                         "(benchmarks/multi_adapter.py)")
    return ap.parse_args(argv)


def fresh_dir(parent: str, device: str) -> str:
    """``parent/<device>-<UTC yyyymmdd-HHMMSS>``, with ``-2``, ``-3``, ... if that exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = os.path.join(parent, f"{device}-{stamp}")
    n = 1
    while os.path.exists(path if n == 1 else f"{path}-{n}"):
        n += 1
    return path if n == 1 else f"{path}-{n}"


def build_specs(args: argparse.Namespace) -> tuple[list[C.Spec], float | None]:
    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pre = preset(device, args.quick)
    if args.shapes or args.m or "cases" not in pre:
        shapes = args.shapes.split(",") if args.shapes else pre.get("shapes", ["1024x1024"])
        ms = _ints(args.m) if args.m else pre.get("m", sorted({m for _, m in pre.get("cases", [])}))
        pairs = [(m, s) for m in ms for s in shapes]  # M-major: the largest-priority M first
    else:
        pairs = [(m, s) for s, m in pre["cases"]]
    ranks = _ints(args.r) if args.r else pre["r"]
    ps = [float(v) for v in args.dropout.split(",")] if args.dropout else pre["dropout"]
    explicit = bool(args.shapes or args.m)
    runs = []  # (pairs, base)
    if args.base in (None, "all", "dense"):
        runs.append((pairs, "dense"))
    if args.base in ("all", "nf4"):
        runs.append((pairs, "nf4"))
    elif args.base is None and not explicit:
        runs.append(([(m, s) for s, m in pre["qlora"]], "nf4"))
    specs = []
    for run_pairs, base in runs:
        for (m, shape), r, p in itertools.product(run_pairs, ranks, ps):
            k, n = _shape(shape)
            specs.append(C.Spec(M=m, K=k, N=n, r=r, p=p, dtype=dtype, device=device,
                                bias=args.bias, base=base))
    budget = args.budget_s if args.budget_s is not None else pre["budget_s"]
    return specs, budget


# --------------------------------------------------------------------------- one case


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reference(inp: C.Inputs, dora: bool = False) -> dict:
    """y, dx, dA, dB (and dm for DoRA) of the unfused reference in float32 (p = 0)."""
    from fastlora.reference import dora_linear_reference, lora_linear_reference

    s = inp.spec
    f = [t.detach().float().requires_grad_()
         for t in (inp.x, inp.lora_A, inp.lora_B, inp.magnitude)[: 4 if dora else 3]]
    w = C.reference_weight(inp.linear)
    b = None if inp.linear.bias is None else inp.linear.bias.float()
    if dora:
        y = dora_linear_reference(f[0], w, b, f[1], f[2], f[3], s.scaling)
    else:
        y = lora_linear_reference(f[0], w, b, f[1], f[2], s.scaling)
    grads = torch.autograd.grad(y, f, inp.dy.float())
    return {"y": y.detach(), **dict(zip(("dx", "dA", "dB", "dm"), grads))}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_outputs(case: C.Case, inp: C.Inputs, ref: dict | None) -> dict:
    """One fwd+bwd; at p = 0, the relative max error of y, dx, dA, dB against the reference."""
    for t in [inp.x, *case.trainable]:
        t.grad = None
    y = case.module(inp.x)
    y.backward(inp.dy)
    _sync(inp.spec.device)
    got = {"y": y.detach(), "dx": inp.x.grad}
    if case.trainable:
        got["dA"], got["dB"] = case.trainable[0].grad, case.trainable[1].grad
    if len(case.trainable) > 2:
        got["dm"] = case.trainable[2].grad
    finite = all(bool(torch.isfinite(t).all()) for t in got.values() if t is not None)
    out: dict = {"finite": finite}
    if ref is not None and case.provider != "linear":
        errs = {k: _rel_err(v, ref[k]) for k, v in got.items() if v is not None}
        out["rel_err"] = {k: float(f"{v:.3g}") for k, v in errs.items()}
        out["ok"] = out["finite"] and max(errs.values()) <= CHECK_TOL[inp.spec.dtype]
    else:
        out["ok"] = out["finite"]
    for t in [inp.x, *case.trainable]:
        t.grad = None
    return out


def timing_jobs(case: C.Case, inp: C.Inputs):
    """mode -> (setup, fn) (see timing.py); setup also drops the gradients of the last call."""
    x, dy, m = inp.x, inp.dy, case.module
    grads = [x, *case.trainable]

    def reset():
        for t in grads:
            t.grad = None

    return grads, {
        "fwd": (reset, lambda _: m(x)),
        "bwd": (lambda: (reset(), m(x))[1], lambda y: y.backward(dy)),
        "fwd+bwd": (reset, lambda _: m(x).backward(dy)),
    }


def run_case(spec: C.Spec, providers: list[str], args, deadline: float | None, bar=None,
             modes: tuple[str, ...] = report.MODES) -> dict:
    """Set up, check, measure memory and time every provider on one spec (see module doc)."""
    inp = C.make_inputs(spec)
    refs = {} if spec.p else {False: _reference(inp)}
    if spec.p == 0 and any(p in C.DORA_PROVIDERS for p in providers):
        refs[True] = _reference(inp, dora=True)
    entries: dict[str, dict] = {}
    built: dict[str, C.Case] = {}
    for name in providers:
        if bar is not None:
            bar.set_postfix_str(f"{spec.label()}: set up {name}")
        try:
            case = C.SETUP[name](inp)
            check = check_outputs(case, inp, refs.get(name in C.DORA_PROVIDERS))
            if name == "fastlora_triton":
                case.info.update(_strategy(spec))
            entry = {"status": "ok", "check": check, "info": case.info,
                     "saved": saved_bytes(case.module, inp.x)}
            if spec.device.startswith("cuda"):
                grads, jobs = timing_jobs(case, inp)
                setup, fn = jobs["fwd+bwd"]
                entry["peak_bytes"] = cuda_peak_bytes(lambda: fn(setup()), spec.device)
                for t in grads:
                    t.grad = None
            entries[name], built[name] = entry, case
        except C.NotApplicable as exc:
            entries[name] = {"status": "n/a", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 (one broken provider must not end the run)
            entries[name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(limit=6)}
    if bar is not None:
        bar.set_postfix_str(f"{spec.label()}: timing")
    if spec.device.startswith("cuda"):
        for name, case in built.items():
            grads, jobs = timing_jobs(case, inp)
            try:
                entries[name]["ms"] = {
                    mode: gpu_time(None if mode != "bwd" else setup, fn, grads,
                                   args.warmup_ms, args.rep_ms)
                    for mode, (setup, fn) in jobs.items() if mode in modes
                }
            except Exception as exc:  # noqa: BLE001
                entries[name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=6)}
    else:
        flat = {(name, mode): job for name, case in built.items()
                for mode, job in timing_jobs(case, inp)[1].items() if mode in modes}
        stats = cpu_interleaved(flat, reps=args.reps, deadline=deadline)
        for (name, mode), st in stats.items():
            entries[name].setdefault("ms", {})[mode] = st
    lin = entries.get("linear", {})
    for name, e in entries.items():
        if e["status"] == "ok" and lin.get("status") == "ok":
            e["ratio"] = {mode: paired_ratio(e["ms"][mode], lin["ms"][mode]) for mode in modes}
    return {"M": spec.M, "K": spec.K, "N": spec.N, "r": spec.r, "p": spec.p,
            "dtype": str(spec.dtype).replace("torch.", ""), "bias": spec.bias,
            "base": spec.base, "providers": entries}


def _strategy(spec: C.Spec) -> dict:
    try:
        from fastlora import triton_backend

        return {"strategy": triton_backend.strategy_for(
            spec.M, spec.K, spec.N, spec.r, spec.dtype, spec.p, torch.device(spec.device),
            backward=True)}
    except Exception as exc:  # noqa: BLE001 (informational only)
        return {"strategy": f"unknown ({type(exc).__name__})"}


# --------------------------------------------------------------------------- outputs


def _write_json(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _order(results: dict, shapes: list[str]) -> None:
    """Present cases by shape (in the given order), rank, dropout, M."""
    rank = {s: i for i, s in enumerate(shapes)}
    results["cases"].sort(key=lambda c: (c.get("base", "dense") != "dense",
                                         rank.get(f"{c['K']}x{c['N']}", 99), c["r"], c["p"], c["M"]))


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.multi_adapter is not None:
        from benchmarks.multi_adapter import run_multi_adapter

        return run_multi_adapter(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available to torch")
    specs, budget = build_specs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):
        # Inductor's default pool of compile workers warms up in the background and would
        # share the cores with the timing; compile in-process instead (CPU only)
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    names = list(C.PROVIDERS) if args.providers == "all" else args.providers.split(",")
    providers = C.expand_providers(names)
    if not args.device.startswith("cuda"):
        providers = [p for p in providers if p not in ("fastlora_triton", "fastlora_fused")] \
            if args.providers == "all" else providers
    dev = args.device.split(":")[0]
    if args.out is None:
        args.out = fresh_dir(os.path.join("benchmarks", "runs"), dev)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"results_{dev}.json")
    meta = report.environment(args.device)
    meta.update(
        dtype=str(specs[0].dtype).replace("torch.", ""), providers=providers,
        timing=("do_bench method (warm-up, L2 flush, CUDA events), median of "
                f"{args.rep_ms:g} ms of repeats" if dev == "cuda" else
                f"perf_counter, providers interleaved, {args.reps} rounds; a ratio is the median "
                "over rounds of the two times taken in one round"),
        memory=("saved_tensors_hooks (distinct storages) + torch.cuda.max_memory_allocated"
                if dev == "cuda" else "saved_tensors_hooks (distinct storages)"),
        budget_s=budget, reps=args.reps if dev != "cuda" else None,
    )
    results = {"meta": meta, "cases": [], "skipped": []}
    busy = busy_warning()
    meta["busy_at_start"] = busy
    if busy:
        print(busy, file=sys.stderr)
    start = time.monotonic()
    deadline = None if budget is None else start + budget
    hard_deadline = None if budget is None else deadline + 20
    # every case counts once, measured or skipped; the postfix says how many were skipped
    with tqdm(total=len(specs), desc="benchmarks", unit="case", file=sys.stderr,
              mininterval=0.1 if sys.stderr.isatty() else 15) as bar:
        for spec in specs:
            if deadline is not None and time.monotonic() > deadline:
                results["skipped"].append(spec.label())
                bar.set_postfix_str(f"budget reached: {len(results['skipped'])} skipped",
                                    refresh=False)
                bar.update(1)
                continue
            results["cases"].append(run_case(spec, providers, args, hard_deadline, bar))
            meta["elapsed_s"] = round(time.monotonic() - start, 1)
            _write_json(results, json_path)  # a run cut short still leaves its cases
            bar.update(1)
    shapes = list(dict.fromkeys(f"{s.K}x{s.N}" for s in specs))
    _order(results, shapes)
    results["goals"] = report.goals(results)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    _write_json(results, json_path)
    table = report.markdown(results)
    with open(os.path.join(args.out, f"table_{dev}.md"), "w") as f:
        f.write(table)
    if not args.no_plots and results["cases"]:
        try:
            from benchmarks.plots import write_plots
        except ImportError as exc:  # e.g. a GPU image without matplotlib: JSON and table stand
            print(f'no plots: {exc} (pip install -e ".[bench]")', file=sys.stderr)
        else:
            write_plots(results, args.out)
    print(table)
    if results["skipped"]:
        print(f"budget of {budget:g} s reached: skipped {len(results['skipped'])} case(s): "
              + "; ".join(results["skipped"]))
    bad = [f"{c['K']}x{c['N']} M={c['M']} r={c['r']} p={c['p']:g} {n}: "
           f"{e['status']} {e.get('reason', '')}"
           for c in results["cases"] for n, e in c["providers"].items()
           if e["status"] == "error" or (e["status"] == "ok" and not e["check"]["ok"])]
    for line in bad:
        print("problem:", line)
    busy = busy or busy_warning()
    if busy:
        print(busy)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")
    return results


def busy_warning() -> str | None:
    """The demo's warning (``fastlora.demo.machine_load``) when the load average exceeds the
    cores: ratios from such a run are unreliable."""
    from fastlora.demo import machine_load

    load = machine_load()
    if load is None or load[0] <= load[1]:
        return None
    return (f"WARNING: the machine is busy (load average {load[0]:.1f} on {load[1]} cores): "
            "these figures are unreliable; quote figures from a quiet machine")


if __name__ == "__main__":
    main()
