"""The compile report's reading of the cubins and its candidate list (no GPU, no compile:
cuobjdump's output and the build results are canned here; CI runs the real report)."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from fastlora.kernels import _compile, _configs  # noqa: E402


@pytest.fixture
def report(monkeypatch):
    """kernels.report, imported without leaking its import-time switch (it turns the
    interpreter off for the compiles it runs) into the rest of the session."""
    import os

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(_configs, "_INTERPRETING", _configs._INTERPRETING)
    from fastlora.kernels import report

    return report

# what cuobjdump --dump-resource-usage prints for one Triton kernel that spills
CUOBJDUMP_OUT = """
Resource usage:
 Common:
  GLOBAL:0
 Function _lora_dx_kernel:
  REG:255 STACK:80 SHARED:1024 LOCAL:8 CONSTANT[0]:680 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_spills_are_read_from_the_cubin(monkeypatch, report):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(stdout=CUOBJDUMP_OUT, stderr="", returncode=0)

    monkeypatch.setattr(_compile, "cuobjdump_path", lambda: "/triton/bin/cuobjdump")
    monkeypatch.setattr(subprocess, "run", run)
    compiled = SimpleNamespace(asm={"cubin": b"\x7fELF", "ptx": "wgmma.mma_async "
                                    "wgmma.wait_group.sync.aligned 1; cp.async.bulk.tensor"},
                               metadata=SimpleNamespace(shared=4096))  # fmt: skip
    res = _compile.resources(compiled, 90, 8, True)
    assert calls and calls[0][0].endswith("cuobjdump") and "--dump-resource-usage" in calls[0]
    assert res.registers == 255 and res.spill_bytes == 88  # stack frame + local memory
    assert res.wgmma and res.tma and res.wait_depth == 1 and res.shared == 4096
    job = (90, "bf16", 64, "dx", None, "tma", "dense", "lora")
    assert report.problems_of(job, res) == ["spills 88 B"]


_WS_PTX = """
    setmaxnreg.inc.sync.aligned.u32 256;
    mbarrier.init.shared::cta.b64 [%r1], 1;
    setmaxnreg.dec.sync.aligned.u32 40;
    @%p1 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r2], [%rd1, {%r3, %r4}], [%r5];
    @%p2 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r6], [%rd2, {%r3, %r4}], [%r5];
    setmaxnreg.dec.sync.aligned.u32 120;
    setmaxnreg.inc.sync.aligned.u32 232;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r7}, %rd3, %rd4, %p3, 1, 1, 0, 0;
    wgmma.wait_group.sync.aligned 0;
    @%p4 cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd5, {%r8, %r9}], [%r10];
"""


def test_producer_split_is_read_from_the_ptx():
    """The loads in the lowest-budget setmaxnreg.dec region, the MMAs after an .inc (the TMA
    store of y may stay with the consumers); a load beside the MMAs, an MMA in the producer
    or no specialization at all is not a split."""
    assert _compile.producer_split(_WS_PTX)
    load = "cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r1];"
    assert not _compile.producer_split(_WS_PTX + "    " + load + "\n")
    mma = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r7};"
    assert not _compile.producer_split(_WS_PTX.replace(
        "setmaxnreg.dec.sync.aligned.u32 40;", "setmaxnreg.dec.sync.aligned.u32 40;\n" + mma))
    plain = "\n".join(line for line in _WS_PTX.splitlines() if "setmaxnreg" not in line)
    assert not _compile.producer_split(plain)


def test_depth_zero_passes_only_a_warp_specialized_build_with_a_producer():
    from fastlora.kernels import report

    def res(split, depth=0):
        return _compile.Resources(1024, 168, 0, True, True, depth, True, 1, split)

    cfg = _configs.TileConfig(128, 128, 64, 4, 3, "test")
    ws = (90, "bf16", 16, "forward_ws", cfg, "tma", "dense", "lora")
    plain = (90, "bf16", 16, "forward", cfg, "tma", "dense", "lora")
    assert report.problems_of(ws, res(True)) == []
    assert any("not warp-specialized" in p for p in report.problems_of(ws, res(False)))
    assert any("depth 0" in p for p in report.problems_of(ws, res(False)))
    assert any("depth 0" in p for p in report.problems_of(plain, res(True)))
    assert report.problems_of(plain, res(False, depth=1)) == []


def test_cuobjdump_without_usage_is_an_error(monkeypatch):
    monkeypatch.setattr(_compile, "cuobjdump_path", lambda: "/triton/bin/cuobjdump")
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: SimpleNamespace(stdout="nothing", stderr=""))
    with pytest.raises(RuntimeError, match="cuobjdump printed no resource usage"):
        _compile.cubin_usage(b"")


def test_every_candidate_is_listed_with_its_worst_build(monkeypatch, capsys, report):
    from fastlora.kernels import api

    worst = {"shrink": [120, 0, 0], "forward": [200, 0, 0], "dy": [90, 0, 0],
             "dx": [255, 16, 1], "reduce": [40, 0, 0], "dropout": [52, 0, 0]}
    failed = report.candidate_summary(worst)
    out = capsys.readouterr().out
    assert "forward/fused" in out and "backward/composition" in out
    line = next(l for l in out.splitlines() if l.startswith("backward/fused "))
    assert "255" in line and "16" in line and "FAIL" in line
    assert failed >= 1
    monkeypatch.setitem(api.BACKWARD_CANDIDATES, "unlisted", api.lora_backward)
    assert report.candidate_summary(worst) == failed + 1
    assert "backward/unlisted" in capsys.readouterr().out


def test_fp8_builds_are_in_the_default_report_without_sm90_pointer_or_fp32(report):
    """CI's report (``--arch 80 90``, default bases) compiles the FP8 loader: every sm_90
    FP8 build it makes is a TMA build, and none is made for IEEE fp32 (those calls decode W
    once and run the dense kernels: ``lora_forward.fp8_fused_ok``)."""
    assert "e4m3" in report.DEFAULT_BASES and "dense" in report.DEFAULT_BASES
    todo = list(report.jobs([80, 90], list(_compile.DTYPES), None, ("forward", "dx"),
                            report.DEFAULT_BASES, ("lora",)))  # fmt: skip
    fp8 = [j for j in todo if j[6] == "e4m3"]
    assert {(j[0], j[3]) for j in fp8} == {(a, k) for a in (80, 90) for k in ("forward", "dx")}
    assert all(j[5] == "tma" for j in fp8 if j[0] == 90)
    assert {j[1] for j in fp8} == set(_compile.DTYPES) - {"fp32"}
    # the dense builds are the same as with the dense base alone
    dense = list(report.jobs([80, 90], list(_compile.DTYPES), None, ("forward", "dx"),
                             ("dense",), ("lora",)))  # fmt: skip
    assert [j for j in todo if j[6] == "dense"] == dense
