"""What a run records beside its numbers (machine, date, versions), the markdown tables,
and the goals of the issues checked against a run's results.

Result layout (``results_<device>.json``): ``{"meta": {...}, "cases": [case, ...],
"goals": [...]}``; a case is ``{"M", "K", "N", "r", "p", "dtype", "providers": {name: entry}}``
and an entry is ``{"status": "ok", "ms": {mode: stats}, "ratio": {mode: t/t_linear},
"saved": saved_bytes(...), "peak_bytes": int | None, "check": {...}, "info": {...}}`` or
``{"status": "n/a" | "error", "reason": str}``. Modes: ``fwd``, ``bwd``, ``fwd+bwd``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata

import torch

from benchmarks.timing import paired_ratio

MODES = ("fwd", "bwd", "fwd+bwd")
MiB = 2**20


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def environment(device: str) -> dict:
    """Machine, date and versions, so that every ratio is read beside where it was taken."""
    import fastlora

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "fastlora": fastlora.__version__,
        "git": _git_commit(),
        "argv": " ".join(sys.argv),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return env


def machine_line(meta: dict) -> str:
    where = meta.get("gpu") or (f"{meta['cpu']}, {meta['cpu_cores']} cores "
                                f"({meta['torch_threads']} torch threads)")
    return (f"{where}; {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
            f"peft {meta['peft']}; fastlora {meta['fastlora']} ({meta['git']}); {meta['dtype']}")


# --------------------------------------------------------------------------- tables


def _providers(results: dict) -> list[str]:
    from benchmarks.cases import PROVIDERS

    seen = {p for case in results["cases"] for p in case["providers"]}
    return [p for p in PROVIDERS if p in seen]


def _label(case: dict) -> str:
    base = case.get("base", "dense")
    shape = f"{case['K']}x{case['N']}" + ("" if base == "dense" else f" {base}")
    return f"{shape} | {case['M']} | {case['r']} | {case['p']:g}"


def _ratio_cell(entry: dict | None, mode: str) -> str:
    if entry is None:
        return ""
    if entry["status"] != "ok":
        return "n/a" if entry["status"] == "n/a" else "error"
    if mode not in entry.get("ratio", {}):
        return "-"
    cell = f"{entry['ratio'][mode]:.3f}"
    check = entry.get("check") or {}
    return cell + (" (!)" if check.get("ok") is False else "")


def _table(results: dict, mode: str) -> list[str]:
    providers = [p for p in _providers(results) if p != "linear"]
    head = ["K x N", "M", "r", "p", f"linear {mode} ms", *providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in results["cases"]:
        lin = case["providers"]["linear"]
        ms = "error"
        if lin["status"] == "ok" and mode in lin.get("ms", {}):
            st = lin["ms"][mode]
            short = st["n"] is not None and st["n"] < results["meta"].get("reps", 0)
            ms = f"{st['median']:.3f}" + (f" (n={st['n']})" if short else "")
        cells = [_ratio_cell(case["providers"].get(p), mode) for p in providers]
        lines.append(f"| {_label(case)} | {ms} | " + " | ".join(cells) + " |")
    return lines


def _memory_table(results: dict) -> list[str]:
    providers = _providers(results)
    cuda = results["meta"]["device"].startswith("cuda")
    head = ["K x N", "M", "r", "p", *providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in results["cases"]:
        cells = []
        for p in providers:
            e = case["providers"].get(p)
            if e is None or e["status"] != "ok":
                cells.append("n/a" if e is not None else "")
                continue
            cell = f"{e['saved']['extra'] / MiB:.2f}"
            if cuda and e.get("peak_bytes") is not None:
                cell += f" / {e['peak_bytes'] / MiB:.0f}"
            cells.append(cell)
        lines.append(f"| {_label(case)} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    cuda = meta["device"].startswith("cuda")
    out = [
        f"**{meta['device']}** — {machine_line(meta)}",
        "",
        f"Timing: {meta['timing']}. Cells are time(provider) / time(linear) from the same run "
        "(lower is better; 1.000 is the frozen `nn.Linear`); (!) marks a provider whose "
        "output did not match the reference; (n=...) marks a case cut short by the time budget.",
        "",
        "fwd+bwd:",
        "",
        *_table(results, "fwd+bwd"),
        "",
        "fwd:",
        "",
        *_table(results, "fwd"),
        "",
        "bwd:",
        "",
        *_table(results, "bwd"),
        "",
        ("Memory, MiB: saved for backward beyond x and the parameters (saved_tensors_hooks, "
         "distinct storages)" + (" / peak allocated above the start during fwd+bwd "
                                 "(torch.cuda.max_memory_allocated)" if cuda else "") + ":"),
        "",
        *_memory_table(results),
    ]
    if cuda and results["cases"]:
        try:  # beside the measured tables: the model; it must never cost a GPU run its table
            from benchmarks.roofline import case_lines

            out += ["", *case_lines(results["cases"], meta.get("gpu"))]
        except Exception as exc:  # noqa: BLE001
            out += ["", f"(roofline model not printed: {type(exc).__name__}: {exc})"]
    if results.get("goals"):
        out += ["", "Goals:", "", "| goal | provider | where | value | limit | result |",
                "|---|---|---|---|---|---|"]
        for g in results["goals"]:
            value = "" if g["value"] is None else f"{g['value']:.3f}"
            result = {True: "pass", False: "FAIL", None: "not measured"}[g["passed"]]
            out.append(f"| {g['goal']} | {g['provider']} | {g['where']} | {value} | "
                       f"{g['op']} {g['limit']} | {result} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- goals


def _find(results: dict, **where) -> list[dict]:
    where.setdefault("base", "dense")
    return [c for c in results["cases"]
            if all(c.get(k, "dense" if k == "base" else None) == v for k, v in where.items())]


def _entry_ok(case: dict, provider: str) -> dict | None:
    """The provider's entry when it ran and was timed against a timed ``linear``."""
    e = case["providers"].get(provider)
    return e if e is not None and e["status"] == "ok" and "ratio" in e else None


def _goal(goal, provider, where, value, op, limit) -> dict:
    passed = None if value is None else (value <= limit if op == "<=" else
                                         value < limit if op == "<" else value >= limit)
    return {"goal": goal, "provider": provider, "where": where, "value": value, "op": op,
            "limit": limit, "passed": passed}


def _time_ratio(case, a, b, mode="fwd+bwd"):
    ea, eb = _entry_ok(case, a), _entry_ok(case, b)
    if ea is None or eb is None or mode not in ea["ms"] or mode not in eb["ms"]:
        return None
    return paired_ratio(ea["ms"][mode], eb["ms"][mode])


def goals(results: dict) -> list[dict]:
    """The issues' goals for fastlora (``fastlora_triton`` on CUDA, ``fastlora_torch`` on the
    CPU), each as pass / FAIL / not measured (a case or provider missing from the run)."""
    meta = results["meta"]
    measured = _providers(results)
    # the product on each device: the Triton backend on CUDA (the torch one where it is absent)
    fl = [p for p in ("fastlora_triton", "fastlora_torch") if p in measured][:1]
    out: list[dict] = []
    dtype = meta.get("dtype", "bfloat16" if meta["device"].startswith("cuda") else "float32")
    if meta["device"].startswith("cuda"):
        if dtype != "bfloat16":
            return out
        # benchmarks issue: GPU, bf16, M = 8192, r = 16
        for f in fl:
            for case in _find(results, M=8192, r=16):
                where = f"{case['K']}x{case['N']} M=8192 r=16 p={case['p']:g}"
                ratio = (_entry_ok(case, f) or {}).get("ratio", {})
                if case["p"] == 0:
                    out.append(_goal("fwd vs linear", f, where, ratio.get("fwd"), "<=", 1.05))
                    out.append(_goal("fwd+bwd vs linear", f, where, ratio.get("fwd+bwd"),
                                     "<=", 1.10))
                    out.append(_goal("fwd+bwd vs unsloth_style", f, where,
                                     _time_ratio(case, f, "unsloth_style"), "<", 1.0))
                else:
                    out.append(_goal("peft fwd+bwd / fastlora's", f, where,
                                     _time_ratio(case, "peft", f), ">=", 1.4))
                out.append(_goal("fwd+bwd vs peft_compiled", f, where,
                                 _time_ratio(case, f, "peft_compiled"), "<", 1.0))
            worst, where = None, "every case"
            for case in results["cases"]:
                v = _time_ratio(case, f, "unsloth_style")
                if v is not None and (worst is None or v > worst):
                    worst, where = v, (f"worst: {case['K']}x{case['N']} M={case['M']} "
                                       f"r={case['r']} p={case['p']:g}")
            out.append(_goal("fwd+bwd never slower than unsloth_style", f, where, worst, "<=", 1.0))
    elif dtype == "float32":
        # foundation issue: CPU, fp32, M = 2048, K = N = 1024, r = 16; issue 14 set the p=0
        # limit to 1.10 (1.05 was below what the six skinny MKL GEMMs allow)
        base = dict(M=2048, K=1024, N=1024, r=16)
        for f in fl:
            for case in _find(results, p=0.0, **base):
                e = _entry_ok(case, f)
                out.append(_goal("fwd+bwd vs linear", f, "1024x1024 M=2048 r=16 p=0",
                                 e and e["ratio"].get("fwd+bwd"), "<=", 1.10))
            for case in _find(results, p=0.1, **base):
                where = "1024x1024 M=2048 r=16 p=0.1"
                out.append(_goal("fwd+bwd vs peft", f, where, _time_ratio(case, f, "peft"),
                                 "<=", 0.90))
                e, ep = _entry_ok(case, f), _entry_ok(case, "peft")
                mem = None if e is None or ep is None or not ep["saved"]["extra"] else (
                    e["saved"]["extra"] / ep["saved"]["extra"])
                out.append(_goal("saved extra bytes vs peft", f, where, mem, "<=", 0.15))
        out += _dora_goals(results)
        out += _qlora_goals(results, fl)
    return out


def _dora_goals(results: dict) -> list[dict]:
    """DoRA issue: CPU, fp32, M = 2048, K = N = 1024, r = 16."""
    out: list[dict] = []
    f = "fastlora_dora"
    for case in _find(results, M=2048, K=1024, N=1024, r=16):
        where = f"1024x1024 M=2048 r=16 p={case['p']:g}"
        if case["p"] == 0:
            e = _entry_ok(case, f)
            out.append(_goal("fwd+bwd vs linear", f, where, e and e["ratio"].get("fwd+bwd"),
                             "<=", 1.25))
        elif case["p"] == 0.1:
            out.append(_goal("fwd+bwd vs peft_dora", f, where,
                             _time_ratio(case, f, "peft_dora"), "<=", 0.75))
        e, ep = _entry_ok(case, f), _entry_ok(case, "peft_dora")
        mem = None if e is None or ep is None or not ep["saved"]["extra"] else (
            e["saved"]["extra"] / ep["saved"]["extra"])
        out.append(_goal("saved extra bytes vs peft_dora", f, where, mem, "<=", 1.0))
    return out


def _qlora_goals(results: dict, fl: list[str]) -> list[dict]:
    """QLoRA issue: CPU, fp32, NF4 base, M = 2048, K = N = 1024, r = 16; there ``linear`` is
    the frozen ``Linear4bit`` and ``peft`` PEFT's QLoRA layer."""
    out = []
    base = dict(M=2048, K=1024, N=1024, r=16, base="nf4")
    for f in fl:
        for case in _find(results, p=0.0, **base):
            e = _entry_ok(case, f)
            out.append(_goal("QLoRA fwd+bwd vs frozen Linear4bit", f, "1024x1024 nf4 M=2048 r=16 p=0",
                             e and e["ratio"].get("fwd+bwd"), "<=", 1.20))
        for case in _find(results, p=0.1, **base):
            where = "1024x1024 nf4 M=2048 r=16 p=0.1"
            out.append(_goal("QLoRA fwd+bwd vs peft QLoRA", f, where,
                             _time_ratio(case, f, "peft"), "<=", 0.85))
            e, ep = _entry_ok(case, f), _entry_ok(case, "peft")
            mem = None if e is None or ep is None or not ep["saved"]["extra"] else (
                e["saved"]["extra"] / ep["saved"]["extra"])
            out.append(_goal("QLoRA saved extra bytes vs peft QLoRA", f, where, mem, "<=", 0.15))
    return out
