"""The suite itself, on a tiny case: every output is written and every provider computes
the reference's function. Seconds on a CPU; ``python -m pytest benchmarks/test_suite.py``."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import cases as C
from benchmarks import run
from benchmarks.memory import saved_bytes


def test_run_writes_everything(tmp_path):
    results = run.main(["--device", "cpu", "--shapes", "64x96", "--m", "40", "--r", "4",
                        "--dropout", "0,0.1", "--reps", "2", "--out", str(tmp_path),
                        "--providers", "linear,fastlora_torch,peft,unsloth_style"])
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"results_cpu.json", "table_cpu.md", "time_vs_m_cpu.png",
                     "speedup_cpu.png", "memory_cpu.png"}
    on_disk = json.loads((tmp_path / "results_cpu.json").read_text())
    assert on_disk["meta"]["torch"] == torch.__version__
    assert len(on_disk["cases"]) == 2
    for case in results["cases"]:
        for name, e in case["providers"].items():
            if name == "unsloth_style" and case["p"] > 0:
                assert e["status"] == "n/a"
                continue
            assert e["status"] == "ok", e
            assert e["check"]["ok"], (name, e["check"])
            assert set(e["ratio"]) == {"fwd", "bwd", "fwd+bwd"}
        assert case["providers"]["linear"]["ratio"]["fwd+bwd"] == 1.0


def test_unknown_provider_is_named():
    with pytest.raises(ValueError, match="unknown provider 'pef'"):
        C.expand_providers(["pef"])


def test_saved_bytes_splits_x_and_params():
    inp = C.make_inputs(C.Spec(M=32, K=16, N=24, r=4, p=0.0, dtype=torch.float32, device="cpu"))
    lin = saved_bytes(inp.linear, inp.x)
    assert lin["extra"] == 0  # frozen nn.Linear saves only its weight (for dx)
    case = C.setup_unsloth_style(inp)
    got = saved_bytes(case.module, inp.x)
    # x, W, A, B are x/params; u = s x A^T [M, r] is the only extra
    assert got["extra"] == 32 * 4 * 4
    assert got["x_params"] == (32 * 16 + 24 * 16 + 4 * 16 + 24 * 4) * 4


def test_dora_rows(tmp_path):
    """The DoRA providers run beside LoRA, each checked against the DoRA reference (dm too)."""
    results = run.main(["--device", "cpu", "--shapes", "48x40", "--m", "24", "--r", "4",
                        "--dropout", "0,0.1", "--reps", "2", "--out", str(tmp_path),
                        "--providers", "dora", "--no-plots"])
    assert results["meta"]["providers"] == ["linear", "fastlora_torch", "fastlora_dora",
                                            "peft_dora"]
    for case in results["cases"]:
        for name, e in case["providers"].items():
            assert e["status"] == "ok", e
            assert e["check"]["ok"], (name, e["check"])
        if case["p"] == 0:
            assert set(case["providers"]["fastlora_dora"]["check"]["rel_err"]) == {
                "y", "dx", "dA", "dB", "dm"}
    goals = {(g["goal"], g["provider"]) for g in run.report.goals(results)}
    assert goals == set()  # the DoRA goals read 1024x1024 M=2048 only
    assert "| fastlora_dora | peft_dora |" in (tmp_path / "table_cpu.md").read_text()


def test_cpu_floor_prints_every_composition(capsys):
    from benchmarks import cpu_floor

    cpu_floor.main(["--shape", "64x48", "--m", "32", "--r", "4", "--rounds", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in rows[1:]]
    assert names == ["frozen", "small first", "big first", "merged W + BA"]
    assert float(rows[1].split("|")[3]) == 1.0  # the frozen GEMMs against themselves
    assert all(float(line.split("|")[3]) > 0 for line in rows[1:])
