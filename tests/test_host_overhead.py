"""The host-overhead benchmark's instruments: the launch counter on known op sequences, the
stub Triton driver on a real compiled kernel, and the benchmark's output format.

The stub and the benchmark run in subprocesses without ``TRITON_INTERPRET`` (this test
process imported Triton in interpreter mode, where ``@triton.jit`` never compiles)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import host_overhead as H

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^host fwd\+bwd: fastlora (\d+) us, nn\.Linear (\d+) us, ratio (\d+\.\d\d); "
    r"launches fwd (\d+) bwd (\d+)$"
)


def _names(fn) -> list[str]:
    log = H.LaunchLog()
    with H.counting(log):
        fn()
    return [launch.name for launch in log.launches]


def test_counter_counts_a_known_sequence_exactly():
    x = torch.randn(4, 6)
    xt = x.t()

    def seq():
        torch.empty(3)  # allocation: none
        x.view(24)  # views: none
        x.t()
        x.reshape(2, 12)
        x.to(torch.float32)  # same dtype: a no-op, none
        y = x + 1  # 1
        y.mul_(2)  # 1 (in place still launches)
        x.sum()  # 1
        x.to(torch.bfloat16)  # 1 (a cast is a copy kernel)
        xt.contiguous()  # 1 (a transposed copy)
        torch.zeros(5)  # 1 (a fill)
        torch.randint(0, 7, (1,))  # 1 (an RNG draw)

    assert _names(seq) == [
        "torch:aten::add.Tensor", "torch:aten::mul_.Tensor", "torch:aten::sum",
        "torch:aten::_to_copy", "torch:aten::clone", "torch:aten::zeros",
        "torch:aten::randint.low",
    ]  # fmt: skip


def test_counter_sees_casts_below_autograd():
    # a custom op's body runs below autograd, where ``to`` reaches the mode whole and
    # would be taken for a view: it must still count as the copy it is
    A = torch.nn.Parameter(torch.randn(3, 4))
    with torch._C._AutoDispatchBelowAutograd():
        assert _names(lambda: A.to(torch.bfloat16)) == ["torch:aten::_to_copy"]
        assert _names(lambda: A.to(torch.float32)) == []


@torch.library.custom_op("hostbench_test::scaled_cast", mutates_args=())
def _scaled_cast(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).to(torch.bfloat16)


def test_counter_runs_custom_op_bodies():
    # a custom op is not one launch: the two ops inside it are
    x = torch.randn(3, 4)
    assert _names(lambda: _scaled_cast(x)) == ["torch:aten::mul.Tensor", "torch:aten::_to_copy"]


def test_counter_on_frozen_linear_fwd_and_bwd():
    lin = torch.nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    dy = torch.ones(4, 8)
    log = H.LaunchLog()
    fwd, bwd = H._count((lambda: lin(x), lambda y: torch.autograd.grad(y, (x,), dy)), log)
    assert [launch.name for launch in fwd] == ["torch:aten::addmm"]
    assert [launch.name for launch in bwd] == ["torch:aten::mm"]


def test_profile_lists_where_the_time_goes():
    lin = torch.nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    dy = torch.ones(4, 8)
    text = H._profile((lambda: lin(x), lambda y: torch.autograd.grad(y, (x,), dy)), 5)
    assert "function calls" in text and "tottime" in text
    assert "run_backward" in text  # the autograd engine ran 5 times under the profiler


def test_format_line():
    assert H.format_line(731.4, 82.2, 3, 6) == (
        "host fwd+bwd: fastlora 731 us, nn.Linear 82 us, ratio 8.90; launches fwd 3 bwd 6"
    )
    assert LINE.match(H.format_line(1000.0, 100.0, 2, 3))


def test_measure_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set"):
        H.measure(reps=1, warmup=1)


def _run_compiled(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


STUB_SCRIPT = textwrap.dedent('''
    import json, torch, triton, triton.language as tl
    from triton.runtime import driver
    from benchmarks.host_overhead import LaunchLog, stub_driver

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.zeros(40)
    log = LaunchLog()
    before = driver._active
    with stub_driver(log) as stub:
        target = str(driver.active.get_current_target())
        compiled = _add_one[(3,)](x, 40, BLOCK=16)
        _add_one[(2, 1, 1)](x, 40, BLOCK=16)
    print(json.dumps({
        "launches": [[l.name, list(l.grid)] for l in log.launches],
        "ran": float(x.abs().sum()),
        "target": target,
        "ptx_has_sm90": ".target sm_90" in compiled.asm["ptx"],
        "cubin_bytes": len(compiled.asm["cubin"]),
        "restored": driver._active is before,
    }))
''')


@pytest.mark.slow
def test_stub_driver_compiles_for_sm90_and_records_launches(tmp_path):
    script = tmp_path / "stub_check.py"
    script.write_text(STUB_SCRIPT)
    out = _run_compiled([str(script)], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["launches"] == [["_add_one", [3, 1, 1]], ["_add_one", [2, 1, 1]]]
    assert got["ran"] == 0.0  # nothing executed: only the launch was skipped
    assert "cuda" in got["target"] and "90" in got["target"]
    assert got["ptx_has_sm90"] and got["cubin_bytes"] > 0  # a real sm_90 build
    assert got["restored"]


@pytest.mark.slow
def test_benchmark_end_to_end():
    out = _run_compiled(["-m", "benchmarks.host_overhead", "--reps", "5", "--warmup", "2",
                         "--check-launches"])
    lines = out.stdout.strip().splitlines()
    m = LINE.match(lines[-1])
    assert m, out.stdout[-2000:] + out.stderr[-3000:]
    fl_us, lin_us, ratio, fwd, bwd = float(m[1]), float(m[2]), float(m[3]), int(m[4]), int(m[5])
    assert fl_us > 0 and lin_us > 0 and ratio > 0
    # the Triton path ran (not the torch fallback): fastlora kernels reached the stub
    fwd_line = next(line for line in lines if line.startswith("fastlora fwd launches"))
    bwd_line = next(line for line in lines if line.startswith("fastlora bwd launches"))
    assert f"({fwd})" in fwd_line and f"({bwd})" in bwd_line
    assert re.search(r"(^|, )_\w+_kernel", fwd_line.split(":", 1)[1]), fwd_line
    assert re.search(r"(^|, )_\w+_kernel", bwd_line.split(":", 1)[1]), bwd_line
    assert "torch:aten::randint" in fwd_line  # dropout 0.1 draws its seed
    assert "nn.Linear launches: fwd 1 (torch:aten::addmm), bwd 1 (torch:aten::mm)" in out.stdout
    # --check-launches fails exactly when the counts exceed the goal
    within = fwd <= H.GOAL_FWD_LAUNCHES + 1 and bwd <= H.GOAL_BWD_LAUNCHES
    assert out.returncode == (0 if within else 1), out.stderr[-3000:]


def test_launch_goals_per_layer_kind():
    assert H.Case().goals() == (H.GOAL_FWD_LAUNCHES + 1, H.GOAL_BWD_LAUNCHES)  # dropout's draw
    assert H.Case(dropout=0.0).goals() == (H.GOAL_FWD_LAUNCHES, H.GOAL_BWD_LAUNCHES)
    assert H.Case(adapter="dora").goals() == (4, 4)
    assert H.Case(base="nf4", K=64).goals() == (4, 4)
    assert "nf4 base" in H.Case(base="nf4", K=64).describe()
    assert "dora r=8" in H.Case(adapter="dora").describe()


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--adapter", "dora"], ["--base", "nf4"]], ids=["dora", "nf4"])
def test_variant_layers_print_the_same_last_line(flag):
    out = _run_compiled(["-m", "benchmarks.host_overhead", "--reps", "3", "--warmup", "2",
                         *flag])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert LINE.match(lines[-1]), lines[-1]
    assert flag[1] in lines[0]  # the case line names the layer
