"""The main job: ``python -m fastlora.demo``.

Three checks, each with a verdict: (1) a FastLoRALinear against the unfused float64
reference, (2) a few training steps that must cut the loss tenfold, (3) fwd+bwd time against
the frozen nn.Linear and PEFT's LoRA layer on the same machine; then (4) one training step of
a small Llama-shaped model against PEFT and the frozen model (``benchmarks.model_step``'s
measurement at a demo size; the full size is ``python -m benchmarks.model_step``). Timing: every implementation
runs once per round, the rounds interleave them (so all see the same load), and every ratio
is taken within a round; the table shows the median ratio and the 20-80% range over rounds.
Lower is better everywhere. A speed verdict says "faster"/"slower" only when at least 80% of
the rounds agree; otherwise it says the run could not tell. On a busy machine (load average
above the core count) it warns and keeps measuring, up to ``--max-seconds``, until the range
is narrow.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import fastlora
from fastlora.reference import lora_linear_reference

# a ratio range (20-80% of rounds) narrower than this fraction of the median counts as stable
STABLE_SPREAD = 0.10
FLOOR = "nn.Linear (frozen)"


def check_against_reference() -> float:
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(96, 80, r=7, lora_alpha=14, init_lora_weights=False,
                                    dtype=torch.float64)
    x = torch.randn(4, 33, 96, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                layer.scaling)
    return (y - ref).abs().max().item()


def train_a_few_steps(steps: int = 60) -> tuple[float, float]:
    """Fit a frozen random layer to a target that differs from it by a rank-4 update."""
    torch.manual_seed(0)
    K, N = 64, 48
    base = nn.Linear(K, N)
    target = nn.Linear(K, N)
    with torch.no_grad():
        target.weight.copy_(base.weight + 0.5 * torch.randn(N, 4) @ torch.randn(4, K) / K**0.5)
        target.bias.copy_(base.bias)
    layer = fastlora.FastLoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.05)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=2e-2)
    first = last = 0.0
    for step in range(steps):
        x = torch.randn(256, K)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    return first, last


def _peft_layer(base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module | None:
    try:
        import peft
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"],
                          init_lora_weights=False)
    return peft.get_peft_model(Holder(), cfg)


def machine_load() -> tuple[float, int] | None:
    """(1-minute load average, cores) where the OS reports a load average."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """20%, 50%, 80% (inclusive method; one value gives itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[1], statistics.median(values), q[7]


def time_rounds(M: int, K: int, N: int, r: int, min_rounds: int, max_seconds: float,
                max_rounds: int = 200) -> dict[str, list[float]]:
    """Seconds per fwd+bwd of each implementation, one entry per round. Runs ``min_rounds``
    rounds, then more while the ratio ranges are wide and ``max_seconds`` allow."""
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    impls: dict[str, nn.Module] = {FLOOR: nn.Linear(K, N).requires_grad_(False)}
    for p in (0.0, 0.1):
        impls[f"FastLoRALinear p={p}"] = fastlora.FastLoRALinear(
            K, N, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
        peft_layer = _peft_layer(nn.Linear(K, N), r, 2 * r, p)
        if peft_layer is not None:
            impls[f"PEFT LoRA p={p}"] = peft_layer.train()

    def step(m):
        m(x).backward(dy)
        x.grad = None

    names = list(impls)
    for _ in range(2):  # warm-up: allocator, thread pool, PEFT's first-call work
        for m in impls.values():
            step(m)
    times: dict[str, list[float]] = {name: [] for name in impls}
    start = time.monotonic()
    while True:
        n = len(times[FLOOR])
        # rotate the order every round so no implementation always runs first
        for name in names[n % len(names):] + names[: n % len(names)]:
            t0 = time.perf_counter()
            step(impls[name])
            times[name].append(time.perf_counter() - t0)
        n += 1
        if n < min_rounds:
            continue
        if n >= max_rounds or time.monotonic() - start > max_seconds or stable(times):
            return times


def ratios(times: dict[str, list[float]], name: str, ref: str) -> list[float]:
    return [a / b for a, b in zip(times[name], times[ref])]


def stable(times: dict[str, list[float]]) -> bool:
    for name in times:
        if name == FLOOR:
            continue
        lo, mid, hi = quantiles(ratios(times, name, FLOOR))
        if hi - lo > STABLE_SPREAD * mid:
            return False
    return True


def verdict(rs: list[float], what: str, against: str) -> str:
    """A claim only where at least 80% of the rounds agree on it."""
    lo, mid, hi = quantiles(rs)
    if hi < 1.0:
        return f"{what} is faster than {against}: {mid:.2f}x (80% of rounds below {hi:.2f}x)"
    if lo > 1.0:
        return f"{what} is slower than {against}: {mid:.2f}x (80% of rounds above {lo:.2f}x)"
    return (f"{what} vs {against}: {mid:.2f}x, rounds range {lo:.2f}-{hi:.2f}x: this run "
            "cannot tell which is faster")


def model_step_figure() -> None:
    """Check 4: ``benchmarks.model_step`` at the demo size (needs a checkout, transformers and
    PEFT), its last line printed as it is."""
    try:
        from benchmarks import model_step
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"4. whole-model step: skipped ({exc}; run from a checkout with "
              'pip install -e ".[peft]")')
        return
    cfg = model_step.DEMO
    print(f"4. one training step of a Llama-shaped model (hidden {cfg.hidden}, intermediate "
          f"{cfg.intermediate}, {cfg.layers} layers, batch {cfg.batch} x {cfg.seq}, LoRA r={cfg.r} "
          f"on all 7 projections), {cfg.rounds} interleaved rounds; per-round ratios, median:")
    print("   " + model_step.last_line(model_step.run(cfg, progress=False)["ratios"]))
    print("   (full size, hidden 1024 x 256 tokens x 4: python -m benchmarks.model_step)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlora.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15, help="rounds at least (default 15)")
    ap.add_argument("--max-seconds", type=float, default=45,
                    help="keep adding rounds while the ratios are unstable, up to this long")
    ap.add_argument("--model-step", action=argparse.BooleanOptionalAction, default=True,
                    help="4. time one training step of a small Llama-shaped model (default on)")
    args = ap.parse_args(argv)

    print(f"fastlora {fastlora.__version__}, torch {torch.__version__}, "
          f"backend '{fastlora.get_backend()}'")
    failed = False
    err = check_against_reference()
    ok = err <= 1e-10
    failed |= not ok
    print(f"1. forward vs the unfused float64 reference: max |diff| = {err:.1e} "
          f"(must be <= 1e-10): {'OK' if ok else 'FAILED'}")
    first, last = train_a_few_steps()
    ok = last < 0.1 * first
    failed |= not ok
    print(f"2. training a rank-4 update for 60 steps: loss {first:.4f} -> {last:.4f} "
          f"(must fall tenfold): {'OK' if ok else 'FAILED'}")

    load = machine_load()
    busy = load is not None and load[0] > load[1]
    print(f"3. speed: forward+backward, float32, M={args.m} K={args.k} N={args.n} r={args.r}, "
          f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    if busy:
        print(f"   WARNING: the machine is busy (load average {load[0]:.1f} on {load[1]} cores): "
              f"measuring longer (up to {args.max_seconds:g} s); quote figures from a quiet machine")
    times = time_rounds(args.m, args.k, args.n, args.r, args.reps, args.max_seconds)
    rounds = len(times[FLOOR])
    print(f"   {rounds} interleaved rounds. ms: median time of one call. 'x nn.Linear' and "
          "'x PEFT':\n   per-round time ratios, median [20%-80% of rounds]. Lower is better; "
          "1.00 x nn.Linear is the floor.")
    print(f"   {'implementation':<24}{'ms':>8}   {'x nn.Linear':<20}{'x PEFT (same p)':<20}")
    for name, ts in times.items():
        lo, mid, hi = quantiles(ratios(times, name, FLOOR))
        vs_floor = f"{mid:.2f} [{lo:.2f}-{hi:.2f}]" if name != FLOOR else "1.00"
        peft_name = name.replace("FastLoRALinear", "PEFT LoRA")
        vs_peft = ""
        if name.startswith("Fast") and peft_name in times:
            lo, mid, hi = quantiles(ratios(times, name, peft_name))
            vs_peft = f"{mid:.2f} [{lo:.2f}-{hi:.2f}]"
        print(f"   {name:<24}{1e3 * statistics.median(ts):8.2f}   {vs_floor:<20}{vs_peft:<20}")
    for p in ("0.0", "0.1"):
        fast, peft_name = f"FastLoRALinear p={p}", f"PEFT LoRA p={p}"
        if peft_name in times:
            print(f"   verdict, p={p}: " + verdict(ratios(times, fast, peft_name),
                                                   "FastLoRALinear", "PEFT's LoRA"))
        else:
            print(f"   verdict, p={p}: PEFT is not installed (pip install -e \".[peft]\"), no comparison")
    lo, mid, hi = quantiles(ratios(times, "FastLoRALinear p=0.0", FLOOR))
    print(f"   verdict, p=0.0: FastLoRALinear costs {mid:.2f}x the frozen nn.Linear "
          f"(rounds {lo:.2f}-{hi:.2f}x); the LoRA work it adds is {100 * (mid - 1):.0f}% here"
          + ("" if hi - lo <= STABLE_SPREAD * mid else
             "; the range is wide: the machine was too noisy for a precise figure"))
    if args.model_step:
        model_step_figure()
    if failed:
        print("FAILED: see the checks above")
        return 1
    print("checks 1 and 2 passed; check 3 is a measurement of this machine, not a pass/fail test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
