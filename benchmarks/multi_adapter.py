"""``python -m benchmarks --multi-adapter E``: mixed-adapter batches on one layer.

One ``K x N`` layer, ``S`` samples of ``T`` tokens, E adapters of rank r sharing the samples
equally (sample s uses adapter s mod E), p = 0. Providers, timed interleaved in one run:

- ``linear``: the frozen ``nn.Linear`` (the floor);
- ``single``: fastlora with one adapter on the same rows;
- ``mixed``: fastlora with E adapters in ``adapter_batch``;
- ``peft_mixed``: PEFT's LoRA layer with the same E adapters, ``adapter_names=...``;
- ``single_fb`` / ``mixed_fb``: forward + backward (x needs its gradient too).

Forwards run under ``torch.no_grad()`` (serving). Each ratio is the median over rounds of the
two times taken in one round (``timing.paired_ratio``); lower is better.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from torch import nn

import fastlora
from benchmarks import report
from benchmarks.timing import cpu_interleaved, paired_ratio

# the setting: 2 threads, fp32, K = N = 1024, 16 samples of 128 tokens, r = 16
K = N = 1024
SAMPLES, TOKENS, RANK = 16, 128, 16
# (name, numerator, denominator, goal): ratios printed, with the goals they must meet
RATIOS = [
    ("mixed fwd / peft mixed fwd", "mixed", "peft_mixed", 0.75),
    ("mixed fwd / fastlora single fwd", "mixed", "single", 1.15),
    ("mixed fwd+bwd / single fwd+bwd", "mixed_fb", "single_fb", 1.15),
    ("mixed fwd / frozen linear fwd", "mixed", "linear", None),
    ("peft mixed fwd / frozen linear fwd", "peft_mixed", "linear", None),
    ("single fwd / frozen linear fwd", "single", "linear", None),
]


def setup_layers(adapters: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The frozen base, the single- and multi-adapter fastlora layers and PEFT's layer, all on
    the same weights; returns (x, dy, names, layers: dict)."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N, bias=False)).to(device, dtype).eval()
    names = [f"a{s % adapters}" for s in range(SAMPLES)]
    multi = fastlora.apply_lora(_copy(base), ["0"], r=RANK, lora_alpha=RANK,
                                init_lora_weights=False, adapter_name="a0")
    for e in range(1, adapters):
        fastlora.apply_lora(multi, ["0"], r=RANK, lora_alpha=RANK, init_lora_weights=False,
                            adapter_name=f"a{e}")
    single = fastlora.apply_lora(_copy(base), ["0"], r=RANK, lora_alpha=RANK,
                                 init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"], init_lora_weights=False)
        pm = peft.get_peft_model(_copy(base), cfg, adapter_name="a0")
        for e in range(1, adapters):
            pm.add_adapter(f"a{e}", cfg)
    peft_layer = pm.base_model.model[0]
    with torch.no_grad():
        for e in range(adapters):
            ad = multi[0].adapter(f"a{e}")
            peft_layer.lora_A[f"a{e}"].weight.copy_(ad.lora_A)
            peft_layer.lora_B[f"a{e}"].weight.copy_(ad.lora_B)
    x = torch.randn(SAMPLES, TOKENS, K, device=device, dtype=dtype)
    dy = torch.randn(SAMPLES, TOKENS, N, device=device, dtype=dtype)
    return x, dy, names, {"linear": base[0], "single": single[0], "multi": multi, "peft": peft_layer}


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def check(x, names, layers) -> float:
    """Max abs difference between fastlora's and PEFT's mixed forward (must be rounding)."""
    with torch.no_grad(), fastlora.adapter_batch(layers["multi"], names):
        ours = layers["multi"](x)
        theirs = layers["peft"](x, adapter_names=names)
    return (ours - theirs).abs().max().item()


def jobs(x, dy, names, layers) -> dict:
    multi, single, peft_layer, linear = layers["multi"], layers["single"], layers["peft"], layers["linear"]
    xg = x.clone().requires_grad_(True)

    def fwd(fn):
        def timed(_):
            with torch.no_grad():
                return fn()
        return (lambda: None), timed

    def mixed():
        with fastlora.adapter_batch(multi, names):
            return multi(x)

    def fwd_bwd(module, routed: bool):
        def setup():
            xg.grad = None
            for p in module.parameters():
                p.grad = None

        def timed(_):
            if routed:
                with fastlora.adapter_batch(module, names):
                    module(xg).backward(dy)
            else:
                module(xg).backward(dy)
        return setup, timed

    return {
        ("linear",): fwd(lambda: linear(x)),
        ("single",): fwd(lambda: single(x)),
        ("mixed",): fwd(mixed),
        ("peft_mixed",): fwd(lambda: peft_layer(x, adapter_names=names)),
        ("single_fb",): fwd_bwd(single, False),
        ("mixed_fb",): fwd_bwd(multi, True),
    }


def run_multi_adapter(args: argparse.Namespace) -> dict:
    if args.multi_adapter < 1:
        raise SystemExit(f"--multi-adapter: expected a number of adapters >= 1, got {args.multi_adapter}")
    torch.set_num_threads(args.threads or 2)
    fastlora.set_backend("torch")
    x, dy, names, layers = setup_layers(args.multi_adapter)
    diff = check(x, names, layers)
    timings = cpu_interleaved(jobs(x, dy, names, layers), reps=args.reps)
    timings = {k[0]: v for k, v in timings.items()}
    lines, goals = [], {}
    for label, a, b, goal in RATIOS:
        ratio = paired_ratio(timings[a], timings[b])
        met = None if goal is None else ratio <= goal
        if goal is not None:
            goals[label] = {"ratio": ratio, "goal": goal, "met": met}
        verdict = "" if goal is None else f"  goal <= {goal:.2f}: {'met' if met else 'NOT met'}"
        lines.append(f"{label:38s} {ratio:6.3f}{verdict}")
    meta = report.environment("cpu")
    results = {
        "meta": {**meta, "adapters": args.multi_adapter, "K": K, "N": N, "samples": SAMPLES,
                 "tokens": TOKENS, "r": RANK, "dtype": "float32", "reps": args.reps},
        "max_abs_diff_vs_peft": diff,
        "timings_ms": {k: {s: v[s] for s in ("median", "p20", "p80", "n")} for k, v in timings.items()},
        "goals": goals,
    }
    print(f"mixed-adapter batch: {args.multi_adapter} adapters, {SAMPLES} x {TOKENS} tokens, "
          f"K = N = {K}, r = {RANK}, fp32, {torch.get_num_threads()} threads, p = 0")
    print(f"max |fastlora - PEFT| on the mixed forward: {diff:.2e}")
    for k, v in results["timings_ms"].items():
        print(f"  {k:11s} median {v['median']:8.2f} ms  (p20 {v['p20']:.2f}, p80 {v['p80']:.2f})")
    print("ratios (lower is better):")
    for line in lines:
        print("  " + line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results_multi_adapter.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results
