"""Three PNGs from a results dict (see ``report``), readable at a glance:

- ``time_vs_m_<device>.png``: fwd+bwd median time against M, one panel per (K x N, p);
- ``speedup_<device>.png``: time(linear) / time(provider) for fwd+bwd against M, same
  panels (1.0 is the floor; higher is better);
- ``memory_<device>.png``: bytes saved for backward beyond x and the parameters (and, on
  CUDA, the peak allocated during fwd+bwd), per provider, at each panel's largest M.

Panels use one rank (16 when measured, else the first); other ranks are in the JSON/tables.
Every figure has the same size (``FIGSIZE`` at ``DPI``) whatever the number of panels or of
skipped cases, with the legend in a column of its own on the right, outside every panel, and
one colour per provider.
"""

from __future__ import annotations

import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import MiB, _providers, machine_line  # noqa: E402

STYLE = {  # provider -> (color, marker); one colour each (tests/test_plots.py)
    "linear": ("black", "s"),
    "fastlora_triton": ("tab:red", "o"),
    "fastlora_fused": ("tab:pink", "v"),
    "fastlora_torch": ("tab:orange", "D"),
    "peft": ("tab:blue", "^"),
    "peft_compiled": ("tab:cyan", "<"),
    "unsloth_style": ("tab:green", ">"),
    "fastlora_dora": ("tab:purple", "P"),
    "peft_dora": ("tab:brown", "X"),
}
FIGSIZE = (12.0, 7.5)  # inches, every figure: 1320 x 825 px at DPI
DPI = 110
LEGEND_WIDTH = 0.16  # the right-hand fraction of the figure that holds the legend
TITLE_HEIGHT = 0.06  # the top fraction that holds the title and the machine line


def _rank(results: dict) -> int:
    ranks = sorted({c["r"] for c in results["cases"]})
    return 16 if 16 in ranks else ranks[0]


def _panels(results: dict) -> tuple[int, list[str], list[float], dict]:
    r = _rank(results)
    cases = [c for c in results["cases"] if c["r"] == r]
    shapes = list(dict.fromkeys(f"{c['K']}x{c['N']}" for c in cases))
    ps = sorted({c["p"] for c in cases})
    by = {}
    for c in cases:
        by.setdefault((f"{c['K']}x{c['N']}", c["p"]), []).append(c)
    for v in by.values():
        v.sort(key=lambda c: c["M"])
    return r, shapes, ps, by


def _grid(n_rows: int, n_cols: int, sharey: bool):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=FIGSIZE, squeeze=False, sharey=sharey)
    return fig, axes


def _finish(fig, axes, path: str) -> None:
    """The legend (every provider drawn in any panel, once) in its own column on the right,
    the panels laid out in the rest, saved at the fixed size (no tight bbox: it would crop)."""
    handles: dict = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="center left", fontsize=8,
               bbox_to_anchor=(1 - LEGEND_WIDTH + 0.01, 0.5), frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - LEGEND_WIDTH, 1 - TITLE_HEIGHT))
    fig.savefig(path, dpi=DPI)


def _title(fig, title: str, meta: dict) -> None:
    text = title + "\n" + "\n".join(textwrap.wrap(machine_line(meta), 110))
    fig.suptitle(text, fontsize=8, y=0.99, va="top")


def _lines(results: dict, value, ylabel: str, title: str, path: str, floor_line: bool,
           logy: bool = False) -> None:
    r, shapes, ps, by = _panels(results)
    providers = _providers(results)
    fig, axes = _grid(len(ps), len(shapes), sharey=floor_line)
    for i, p in enumerate(ps):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            cases = by.get((shape, p), [])
            if not cases:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{shape}, r={r}, p={p:g}", fontsize=9)
                ax.axis("off")
                continue
            for prov in providers:
                pts = [(c["M"], value(c, prov)) for c in cases]
                pts = [(m, v) for m, v in pts if v is not None]
                if not pts:
                    continue
                color, marker = STYLE.get(prov, ("gray", "."))
                ax.plot(*zip(*pts), marker=marker, color=color, label=prov,
                        linestyle="--" if prov == "linear" else "-")
            if floor_line:
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_ylim(bottom=0)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"{shape}, r={r}, p={p:g}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            if j == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    _title(fig, title, results["meta"])
    _finish(fig, axes, path)
    plt.close(fig)


def _ms(case: dict, prov: str, mode: str = "fwd+bwd"):
    e = case["providers"].get(prov)
    ok = e and e["status"] == "ok" and mode in e.get("ms", {})
    return e["ms"][mode]["median"] if ok else None


def _speedup(case: dict, prov: str, mode: str = "fwd+bwd"):
    e = case["providers"].get(prov)
    ok = e and e["status"] == "ok" and mode in e.get("ratio", {})
    return 1.0 / e["ratio"][mode] if ok else None


def memory_plot(results: dict, path: str) -> None:
    r, shapes, ps, by = _panels(results)
    providers = _providers(results)
    cuda = results["meta"]["device"].startswith("cuda")
    groups = [(s, p, by[(s, p)][-1]) for s in shapes for p in ps if (s, p) in by]
    metrics = [("saved for backward beyond x and params (MiB)",
                lambda e: e["saved"]["extra"] / MiB)]
    if cuda:
        metrics.append(("peak allocated during fwd+bwd (MiB)",
                        lambda e: (e.get("peak_bytes") or 0) / MiB))
    fig, axes = plt.subplots(len(metrics), 1, figsize=FIGSIZE, squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, (ylabel, get) in zip(axes[:, 0], metrics):
        for k, prov in enumerate(providers):
            xs, ys = [], []
            for g, (_, _, case) in enumerate(groups):
                e = case["providers"].get(prov)
                if e and e["status"] == "ok":
                    xs.append(g + (k - (len(providers) - 1) / 2) * width)
                    ys.append(get(e))
            bars = ax.bar(xs, ys, width=width, color=STYLE.get(prov, ("gray", "."))[0], label=prov)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.2g}" for v in ys],
                         fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\nM={c['M']} p={p:g}" for s, p, c in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    _title(fig, f"memory, r={r}", results["meta"])
    _finish(fig, axes, path)
    plt.close(fig)


def write_plots(results: dict, out_dir: str) -> list[str]:
    dev = results["meta"]["device"].split(":")[0]
    paths = [os.path.join(out_dir, f"{name}_{dev}.png")
             for name in ("time_vs_m", "speedup", "memory")]
    _lines(results, _ms, "fwd+bwd median (ms)", "fwd+bwd time vs M", paths[0],
           floor_line=False, logy=True)
    _lines(results, _speedup, "time(linear) / time(provider)",
           "fwd+bwd speedup over the floor (1 = frozen nn.Linear; higher is better)",
           paths[1], floor_line=True)
    memory_plot(results, paths[2])
    return paths
