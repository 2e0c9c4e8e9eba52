"""The main job: ``python -m fastlora.demo``.

Builds a FastLoRALinear, checks it against the unfused reference, trains a few steps, and
prints a speed table (fwd+bwd, ratios to the frozen nn.Linear and to PEFT, same run).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import fastlora
from fastlora.reference import lora_linear_reference


def check_against_reference() -> float:
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(96, 80, r=7, lora_alpha=14, init_lora_weights=False, dtype=torch.float64)
    x = torch.randn(4, 33, 96, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    err = (y - ref).abs().max().item()
    if err > 1e-10:
        raise SystemExit(f"FAILED: forward differs from the reference by {err:.2e}")
    return err


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


def speed_table(M: int, K: int, N: int, r: int, reps: int) -> list[tuple[str, float, float, float | None]]:
    """Median fwd+bwd times, interleaved; rows of (name, ms, ratio to linear, ratio to PEFT)."""
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    impls: dict[str, nn.Module] = {"nn.Linear (frozen)": nn.Linear(K, N).requires_grad_(False)}
    for p in (0.0, 0.1):
        impls[f"FastLoRALinear p={p}"] = fastlora.FastLoRALinear(K, N, r=r, lora_alpha=2 * r, lora_dropout=p,
                                                                  init_lora_weights=False)
        peft_layer = _peft_layer(nn.Linear(K, N), r, 2 * r, p)
        if peft_layer is not None:
            impls[f"PEFT LoRA p={p}"] = peft_layer.train()

    def step(m):
        m(x).backward(dy)
        x.grad = None

    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(2):
        for m in impls.values():
            step(m)
    for _ in range(reps):
        for name, m in impls.items():
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    floor = med["nn.Linear (frozen)"]
    rows = []
    for name, t in med.items():
        peft_name = name.replace("FastLoRALinear", "PEFT LoRA")
        vs_peft = t / med[peft_name] if name.startswith("Fast") and peft_name in med else None
        rows.append((name, t * 1e3, t / floor, vs_peft))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)

    print(f"fastlora {fastlora.__version__}, torch {torch.__version__}, backend '{fastlora.get_backend()}'")
    err = check_against_reference()
    print(f"1. forward vs unfused float64 reference: max |diff| = {err:.1e}  OK")
    first, last = train_a_few_steps()
    print(f"2. training a rank-4 update: loss {first:.4f} -> {last:.4f}")
    if not last < 0.1 * first:
        raise SystemExit("FAILED: training did not reduce the loss tenfold")
    print(f"3. fwd+bwd, float32, M={args.m} K={args.k} N={args.n} r={args.r}, "
          f"median of {args.reps} interleaved runs on {platform.machine()} ({torch.get_num_threads()} threads)")
    print(f"   {'implementation':<24}{'ms':>9}{'x linear':>10}{'x PEFT':>9}")
    for name, ms, vs_floor, vs_peft in speed_table(args.m, args.k, args.n, args.r, args.reps):
        peft_col = f"{vs_peft:9.2f}" if vs_peft is not None else f"{'':9}"
        print(f"   {name:<24}{ms:9.2f}{vs_floor:10.2f}{peft_col}")


if __name__ == "__main__":
    main()
