"""Benchmark output a person reads: plots of one fixed size whatever was measured or skipped,
the legend outside every panel, one colour per provider; the busy-machine warning; a progress
bar that counts skipped cases; ``python -m benchmarks.model_step``'s last line."""

from __future__ import annotations

import re

import pytest

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

from benchmarks import cases as C  # noqa: E402
from benchmarks import plots, run  # noqa: E402


def _case(K, N, M, p, providers=("linear", "fastlora_torch", "peft", "fastlora_dora", "peft_dora")):
    entry = lambda t: {"status": "ok", "ms": {"fwd+bwd": {"median": t}},  # noqa: E731
                       "ratio": {"fwd+bwd": t / 1.0}, "saved": {"extra": 1000 * t}}
    return {"K": K, "N": N, "M": M, "r": 16, "p": p, "base": "dense",
            "providers": {name: entry(1.0 + i / 10) for i, name in enumerate(providers)}}


def _results(cases):
    meta = {"device": "cpu", "cpu": "test cpu", "cpu_cores": 2, "torch_threads": 2,
            "date": "today", "torch": "x", "triton": "x", "peft": "x", "fastlora": "x",
            "git": "abc", "dtype": "float32"}
    return {"meta": meta, "cases": cases, "skipped": []}


def test_every_provider_has_its_own_colour():
    colours = [plots.STYLE[p][0] for p in C.PROVIDERS]  # KeyError: a provider without a style
    assert len(set(colours)) == len(colours), colours


def test_plots_have_one_size_and_the_legend_outside(tmp_path, monkeypatch):
    boxes = []  # per figure: the figure's box, the legend's, the visible panels' (pixels)
    finish = plots._finish

    def spy(fig, axes, path):
        finish(fig, axes, path)
        renderer = fig.canvas.get_renderer()
        legends = [lg.get_window_extent(renderer) for lg in fig.legends]
        panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
        assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside a panel
        boxes.append((fig.bbox, legends, panels))

    monkeypatch.setattr(plots, "_finish", spy)
    many = [_case(K, N, M, p) for K, N in ((64, 96), (128, 64), (96, 96)) for p in (0.0, 0.1)
            for M in (32, 64, 128)]
    few = [_case(64, 96, 32, 0.0, providers=("linear", "peft"))]  # the rest skipped
    sizes = {}
    for name, cases in (("many", many), ("few", few)):
        out = tmp_path / name
        out.mkdir()
        for path in plots.write_plots(_results(cases), str(out)):
            sizes.setdefault(path.rsplit("/", 1)[1], set()).add(matplotlib.image.imread(path).shape)
    for name, shape in sizes.items():
        assert len(shape) == 1, (name, shape)  # the same pixels with 1 panel or 6
    assert {s for v in sizes.values() for s in v} == {(825, 1320, 4)}
    assert len(boxes) == 6
    for fig_box, legends, panels in boxes:
        (box,) = legends
        assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1, (box, fig_box)  # not clipped
        assert fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1, (box, fig_box)
        assert panels and not any(box.overlaps(p) for p in panels), "legend over a panel"


def test_busy_warning_and_skipped_cases_are_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fastlora.demo.machine_load", lambda: (9.0, 2))
    argv = ["--device", "cpu", "--shapes", "32x48,48x32", "--m", "8", "--r", "4", "--dropout",
            "0", "--reps", "2", "--providers", "linear,fastlora_torch", "--no-plots",
            "--budget-s", "0", "--out", str(tmp_path)]
    results = run.main(argv)
    captured = capsys.readouterr()
    assert "WARNING: the machine is busy (load average 9.0 on 2 cores)" in captured.out
    assert results["meta"]["busy_at_start"].startswith("WARNING")
    assert len(results["skipped"]) == 2  # budget 0: every case skipped, and counted
    assert re.search(r"2/2 .*budget reached: 2 skipped", captured.err), captured.err[-500:]
    monkeypatch.setattr("fastlora.demo.machine_load", lambda: (0.5, 2))
    assert run.busy_warning() is None
