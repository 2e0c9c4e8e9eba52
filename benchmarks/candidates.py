"""Every dispatch candidate timed per direction, the pick, and the ratios of the pick to the
frozen cuBLAS layer and to PEFT: ``python -m benchmarks.candidates`` (run by
benchmarks/gpu_check.sh on a lent GPU).

For each case the dispatcher's own measurement runs (``triton_backend._time_candidates``:
``BENCH_ROUNDS`` interleaved ``do_bench`` medians per candidate, each direction alone) and
its own rule chooses (``triton_backend.choose``: the fastest fused candidate unless within
``TIE_MARGIN`` of the composition).  The frozen layer is ``x W^T`` forward and ``dy W``
backward; PEFT is its LoRA layer (eager) forward and forward+backward, the backward taken
as the difference.  Without a GPU (``--device cpu`` under ``TRITON_INTERPRET=1``, tiny
shapes) it runs the same code with a wall-clock timer: a check of the table, not timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import cases as C

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # K x N
MS = (2048, 8192)
R = 16
PS = (0.0, 0.1)


def _wall_ms(run: Callable[[], object], reps: int = 2) -> float:
    """Median wall-clock ms (CPU; ``do_bench`` on CUDA)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bench(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type != "cuda":
        return _wall_ms
    import triton.testing

    def bench(run):
        torch.cuda.synchronize()
        return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")

    return bench


def baselines(spec: C.Spec, bench) -> dict[str, dict[str, float]]:
    """ms of the frozen layer (fwd: x W^T, bwd: dy W) and PEFT's layer (fwd, bwd = fwd+bwd
    minus fwd)."""
    inp = C.make_inputs(spec)
    W, x, dy = inp.linear.weight, inp.x.detach(), inp.dy
    out = {"frozen": {"forward": bench(lambda: torch.mm(x, W.t())),
                      "backward": bench(lambda: torch.mm(dy, W))}}
    case = C.setup_peft(inp)
    xg = inp.x

    def fwd():
        with torch.no_grad():
            case.module(xg)

    def step():
        y = case.module(xg)
        torch.autograd.grad(y, [xg, *case.trainable], dy)

    f, both = bench(fwd), bench(step)
    out["peft"] = {"forward": f, "backward": max(both - f, 0.0)}
    return out


def run_case(K: int, N: int, M: int, p: float, dtype: torch.dtype,
             device: torch.device) -> dict:  # fmt: skip
    """One row: candidate times per direction, the picks, and the ratios."""
    from fastlora import triton_backend as tb

    bench = _bench(device)
    bucket = (M, K, N, R, dtype, dtype, False, p > 0, True, "dense")
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    times = tb._time_candidates(bucket, index, device=device, bench=bench, p=p or 0.1)
    picks = {d: tb.choose(t) for d, t in times.items()}
    base = baselines(C.Spec(M, K, N, R, p, dtype, str(device)), bench)
    pick_ms = sum(times[d][picks[d]] for d in times)
    return {
        "K": K, "N": N, "M": M, "r": R, "p": p, "dtype": str(dtype).removeprefix("torch."),
        "times": times, "picks": picks, "baselines": base,
        "vs_frozen": pick_ms / sum(base["frozen"].values()),
        "vs_peft": pick_ms / sum(base["peft"].values()),
    }


def table(rows: list[dict]) -> list[str]:
    """Markdown: one line per case and candidate with its fwd and bwd ms, then the pick and
    its fwd+bwd ratios to the frozen layer and to PEFT."""
    head = ["K x N", "M", "p", "candidate", "fwd ms", "bwd ms", "pick", "pick / frozen",
            "pick / PEFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        fwd, bwd = row["times"]["forward"], row["times"].get("backward", {})
        pick = f"forward={row['picks']['forward']},backward={row['picks'].get('backward')}"
        for name in dict.fromkeys([*fwd, *bwd]):
            f = f"{fwd[name]:.4f}" if name in fwd else "-"
            b = f"{bwd[name]:.4f}" if name in bwd else "-"
            lines.append(f"| {row['K']}x{row['N']} | {row['M']} | {row['p']:g} | {name} | {f} | "
                         f"{b} | | | |")
        fr, pe = row["baselines"]["frozen"], row["baselines"]["peft"]
        lines.append(f"| {row['K']}x{row['N']} | {row['M']} | {row['p']:g} | frozen cuBLAS | "
                     f"{fr['forward']:.4f} | {fr['backward']:.4f} | | | |")
        lines.append(f"| {row['K']}x{row['N']} | {row['M']} | {row['p']:g} | PEFT | "
                     f"{pe['forward']:.4f} | {pe['backward']:.4f} | | | |")
        lines.append(f"| {row['K']}x{row['N']} | {row['M']} | {row['p']:g} | **pick** | | | "
                     f"{pick} | {row['vs_frozen']:.3f} | {row['vs_peft']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.candidates", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--p", default=",".join(map(str, PS)))
    ap.add_argument("--out", default=None, help="folder for candidates.json and candidates.md")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for kn in args.shapes.split(","):
        K, N = (int(v) for v in kn.lower().split("x"))
        for M in (int(v) for v in args.m.split(",")):
            for p in (float(v) for v in args.p.split(",")):
                rows.append(run_case(K, N, M, p, dtype, device))
                print(f"candidates: {K}x{N} M={M} p={p:g} pick {rows[-1]['picks']} "
                      f"{rows[-1]['vs_frozen']:.3f}x frozen, {rows[-1]['vs_peft']:.3f}x PEFT",
                      flush=True)
    text = "\n".join([f"Candidates per direction ({args.dtype}, r={R}, {device}; ms, median of "
                      "the dispatcher's rounds); the pick by the dispatcher's rule", "",
                      *table(rows)])  # fmt: skip
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "candidates.json").write_text(json.dumps(rows, indent=1, default=str))
        (out / "candidates.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
