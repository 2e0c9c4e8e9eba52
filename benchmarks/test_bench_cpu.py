"""The foundation issue's CPU benchmark and goals (fwd+bwd, M=2048, K=N=1024, r=16, fp32).

    python -m pytest benchmarks/test_bench_cpu.py                   # everything below
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only  # timings + goal ratios

Not collected by the repository's default ``python -m pytest`` (testpaths = ["tests"]).

- ``test_fwd_bwd``: pytest-benchmark timings of frozen nn.Linear, FastLoRALinear (torch
  backend) and PEFT's LoRA layer at dropout 0 and 0.1, grouped per dropout rate
  (``--benchmark-compare`` across commits works as usual).
- ``test_goal_ratios``: the goals as ratios from one interleaved run (the suite's timer),
  since separate pytest-benchmark tests run minutes apart on a shared machine:
  FastLoRALinear <= 1.10x the floor at p=0 (issue 14) and <= 0.90x PEFT at p=0.1. Timing: noisy on a
  busy machine; run it on a quiet one.
- ``test_saved_bytes_goal``: at p=0.1 the bytes saved for backward beyond x and the
  parameters are at most 0.15x PEFT's (deterministic: no timing).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases as C
from benchmarks import report, run
from benchmarks.memory import saved_bytes

FOUNDATION = dict(M=2048, K=1024, N=1024, r=16)
ROUNDS = 15
GOAL_REPS = 21


def _spec(p: float) -> C.Spec:
    return C.Spec(**FOUNDATION, p=p, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("provider", ["linear", "fastlora_torch", "peft"])
def test_fwd_bwd(benchmark, provider, p):
    inp = C.make_inputs(_spec(p))
    case = C.SETUP[provider](inp)
    _, jobs = run.timing_jobs(case, inp)
    reset, step = jobs["fwd+bwd"]  # reset() drops the last call's gradients, untimed
    benchmark.group = f"fwd+bwd 1024x1024 M=2048 r=16 fp32 p={p:g}"
    benchmark.extra_info["saved_extra_bytes"] = saved_bytes(case.module, inp.x)["extra"]
    benchmark.pedantic(lambda: step(None), setup=reset, rounds=ROUNDS, warmup_rounds=2,
                       iterations=1)


def test_goal_ratios(benchmark):
    args = run.parse_args(["--device", "cpu", "--reps", str(GOAL_REPS)])
    providers = ["linear", "fastlora_torch", "peft"]

    def measure():
        return [run.run_case(_spec(p), providers, args, deadline=None, modes=("fwd+bwd",))
                for p in (0.0, 0.1)]

    cases = benchmark.pedantic(measure, rounds=1, iterations=1)
    goals = report.goals({"meta": {"device": "cpu"}, "cases": cases})
    for g in goals:
        benchmark.extra_info[f"{g['goal']} ({g['where']})"] = g["value"]
    timing = [g for g in goals if g["goal"] != "saved extra bytes vs peft"]
    assert len(timing) == 2 and all(g["value"] is not None for g in timing), goals
    failed = [f"{g['goal']} at {g['where']}: {g['value']:.3f} (limit {g['op']} {g['limit']})"
              for g in timing if not g["passed"]]
    assert not failed, "; ".join(failed)


def test_saved_bytes_goal():
    inp = C.make_inputs(_spec(0.1))
    ours = saved_bytes(C.setup_fastlora_torch(inp).module, inp.x)
    peft = saved_bytes(C.setup_peft(inp).module, inp.x)
    assert peft["extra"] > 0, peft
    ratio = ours["extra"] / peft["extra"]
    assert ratio <= 0.15, (f"saved beyond x and params: {ours['extra']} B "
                           f"vs PEFT's {peft['extra']} B ({ratio:.3f}x)")
