"""``python -m fastlora.demo``: a verdict for every check, numbers explained, a busy-machine
warning, and speed claims only where the rounds support them."""

from __future__ import annotations

import re

import pytest

from fastlora import demo

TINY = ["--m", "64", "--k", "32", "--n", "24", "--r", "4", "--reps", "3", "--max-seconds", "0",
        "--no-model-step"]


@pytest.mark.parametrize(
    "rs, expected",
    [
        ([0.7, 0.75, 0.8, 0.78, 0.72], "is faster than PEFT's LoRA: 0.75x"),
        ([1.2, 1.3, 1.25, 1.4, 1.22], "is slower than PEFT's LoRA: 1.25x"),
        ([0.8, 1.2, 0.9, 1.1, 1.0], "cannot tell which is faster"),
        # 3 of 5 rounds faster is not enough for a claim
        ([0.9, 0.9, 0.9, 1.1, 1.1], "cannot tell which is faster"),
    ],
    ids=["faster", "slower", "mixed", "majority-only"],
)
def test_verdict_claims_only_what_the_rounds_support(rs, expected):
    assert expected in demo.verdict(rs, "FastLoRALinear", "PEFT's LoRA")


def test_quantiles():
    assert demo.quantiles([2.0]) == (2.0, 2.0, 2.0)
    lo, mid, hi = demo.quantiles([float(v) for v in range(11)])
    assert (lo, mid, hi) == (2.0, 5.0, 8.0)


def test_demo_prints_a_verdict_for_every_check(capsys, monkeypatch):
    monkeypatch.setattr(demo, "machine_load", lambda: (0.0, 2))
    assert demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert "1. forward vs the unfused float64 reference" in out and out.count(": OK") == 2
    assert "Lower is better" in out and "median [20%-80% of rounds]" in out
    assert "interleaved rounds" in out
    for p in ("0.0", "0.1"):
        assert f"verdict, p={p}: " in out
    assert "costs" in out and "the frozen nn.Linear" in out
    assert "WARNING" not in out


def test_demo_warns_on_a_busy_machine(capsys, monkeypatch):
    monkeypatch.setattr(demo, "machine_load", lambda: (9.5, 2))
    demo.main(TINY)
    assert "WARNING: the machine is busy (load average 9.5 on 2 cores)" in capsys.readouterr().out


def test_demo_keeps_measuring_while_unstable(monkeypatch):
    """With a budget, rounds are added until the ratios settle or the budget ends."""
    monkeypatch.setattr(demo, "stable", lambda times: len(times[demo.FLOOR]) >= 7)
    times = demo.time_rounds(64, 32, 24, 4, min_rounds=3, max_seconds=60)
    assert len(times[demo.FLOOR]) == 7
    assert {len(v) for v in times.values()} == {7}


def test_demo_fails_loudly(capsys, monkeypatch):
    monkeypatch.setattr(demo, "check_against_reference", lambda: 1.0)
    assert demo.main(TINY) == 1
    out = capsys.readouterr().out
    assert "(must be <= 1e-10): FAILED" in out and out.rstrip().endswith("FAILED: see the checks above")


def test_demo_prints_the_model_step_figure(capsys, monkeypatch):
    """Check 4: the whole-model step's last line (at the quick size here)."""
    pytest.importorskip("peft")
    from benchmarks import model_step

    monkeypatch.setattr(demo, "machine_load", lambda: (0.0, 2))
    monkeypatch.setattr(model_step, "DEMO", model_step.QUICK)
    assert demo.main(TINY[:-1]) == 0
    out = capsys.readouterr().out
    assert "4. one training step of a Llama-shaped model" in out
    assert re.search(r"\n   model step: fastlora/peft \d+\.\d+ \(p=0\.05\), \d+\.\d+ \(p=0\); "
                     r"fastlora/frozen \d+\.\d+, \d+\.\d+\n", out), out
