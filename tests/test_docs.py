"""The user docs as a user meets them: every ```python block of README.md and docs/*.md runs as
written, on the CPU, with nothing downloaded (HF_HUB_OFFLINE=1).

A page's blocks run in page order in one fresh interpreter and one namespace (a later block may
use what an earlier one made, as a reader running them in turn would), in a scratch directory.
A block fenced ```python gpu needs a GPU: it is compiled (no syntax rot) but not run here.
Besides: every relative link resolves, the quick start holds the two commands CI reads, and the
user docs carry no development history (issue numbers, commit hashes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USER_DOCS = [*PAGES, ROOT / "examples" / "README.md", ROOT / "benchmarks" / "README.md"]
# pages whose blocks take tens of seconds on 2 cores (Trainer and TRL runs); the README's own
# blocks must stay in the fast selection
SLOW_PAGES = {"docs/trainer.md"}
# what a page's blocks must leave in the scratch directory (present) and must not (absent)
PRODUCES = {
    "README.md": (["adapter/adapter_config.json", "adapter/adapter_model.safetensors"], []),
    "docs/models.md": (["adapter/adapter_config.json", "adapter/adapter_model.safetensors"], []),
    "docs/qlora.md": (["qlora-adapter/adapter_model.safetensors"], []),
    # adapter-only checkpoints: the adapter beside the optimizer state, never the full model
    "docs/trainer.md": (["out/checkpoint-2/adapter_model.safetensors",
                         "out/checkpoint-2/optimizer.pt",
                         "out/checkpoint-4/adapter_config.json",
                         "sft-out/checkpoint-4/adapter_model.safetensors"],
                        ["out/checkpoint-2/model.safetensors",
                         "sft-out/checkpoint-4/model.safetensors"]),
}
PAGE_TIMEOUT_S = 900


@dataclass
class Block:
    page: str  # relative to ROOT
    line: int  # 1-based line of the first code line
    info: str  # the fence's words after the language, e.g. "gpu"
    code: str


def blocks_of(path: Path, lang: str = "python") -> list[Block]:
    """The fenced blocks of ``path`` whose language is ``lang`` (indented fences dedented)."""
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    found, inside, start, words, body, ticks = [], False, 0, [], [], ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = line.strip()
        # CommonMark: an opening fence's info string holds no backtick (else it is inline
        # code), and the closing fence is at least as long as the opening one
        opening = re.fullmatch(r"(`{3,})([^`]*)", fence)
        if not inside and opening:
            ticks, info = opening.groups()
            inside, start, words, body = True, number + 1, info.split(), []
        elif inside and re.fullmatch(f"{ticks}`*", fence):
            inside = False
            if words and words[0] == lang:
                code = textwrap.dedent("\n".join(body))
                found.append(Block(rel, start, " ".join(words[1:]), code))
        elif inside:
            body.append(line)
    assert not inside, f"{rel}: a fence opened at line {start - 1} is never closed"
    return found


# runs in the child: each block compiled under its page's name and line numbers, so a traceback
# points at the page
_RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
for block in json.loads(sys.stdin.read()):
    code = "\\n" * (block["line"] - 1) + block["code"]
    exec(compile(code, block["page"], "exec"), ns)
"""


def run_blocks(blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``blocks`` (one page's, in order) in a fresh CPU-only interpreter inside ``cwd``,
    importing fastlora as a user does (the installed package, not the checkout on sys.path)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    payload = json.dumps([{"page": b.page, "line": b.line, "code": b.code} for b in blocks])
    return subprocess.run([sys.executable, "-c", _RUNNER], input=payload, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)


def _page_params():
    for path in PAGES:
        rel = path.relative_to(ROOT).as_posix()
        if any(b.info != "gpu" for b in blocks_of(path)):
            marks = [pytest.mark.slow] if rel in SLOW_PAGES else []
            yield pytest.param(path, id=rel, marks=marks)


@pytest.mark.parametrize("path", list(_page_params()))
def test_page_snippets_run_as_written(path, tmp_path):
    blocks = [b for b in blocks_of(path) if b.info != "gpu"]
    unknown = sorted({b.info for b in blocks} - {""})
    assert not unknown, f"{path.name}: unknown fence words {unknown}; use python or python gpu"
    result = run_blocks(blocks, tmp_path)
    assert result.returncode == 0, (f"{path.relative_to(ROOT)}: a snippet failed\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    present, absent = PRODUCES.get(path.relative_to(ROOT).as_posix(), ([], []))
    assert [f for f in present if not (tmp_path / f).is_file()] == []
    assert [f for f in absent if (tmp_path / f).exists()] == []


def test_readme_has_snippets_in_the_fast_selection():
    """The README's own examples run in every quick test run, not only in the slow one."""
    assert "README.md" not in SLOW_PAGES
    assert [b for b in blocks_of(ROOT / "README.md") if b.info != "gpu"]


def test_gpu_snippets_compile():
    gpu = [b for path in PAGES for b in blocks_of(path) if b.info == "gpu"]
    for b in gpu:
        compile("\n" * (b.line - 1) + b.code, b.page, "exec")


def test_runner_reports_a_failing_snippet_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n```python gpu\nraise SystemExit(3)\n```\n\n"
                    "```python\nassert x == 2, 'x is one'\n```\n")
    blocks = blocks_of(page)
    assert [(b.line, b.info) for b in blocks] == [(4, ""), (8, "gpu"), (12, "")]
    inline = tmp_path / "inline.md"  # a line that opens with inline code is not a fence
    inline.write_text("```` ```python gpu ```` is inline\n\n````python\ny = 1\n```\n````\n")
    assert [(b.line, b.code) for b in blocks_of(inline)] == [(4, "y = 1\n```")]
    ok = run_blocks(blocks[:1], tmp_path)
    assert ok.returncode == 0, ok.stderr
    failed = run_blocks([blocks[0], blocks[2]], tmp_path)  # the namespace carries x over
    assert failed.returncode != 0
    assert "x is one" in failed.stderr and "line 12" in failed.stderr


def test_runner_is_offline_and_on_the_cpu(tmp_path):
    probe = Block("probe.md", 1, "", "import os, torch\n"
                  "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
                  "assert not torch.cuda.is_available()\n"
                  "import fastlora; print(fastlora.__file__)")
    result = run_blocks([probe], tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve().is_relative_to(ROOT)


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in _LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = path.parent / file if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files or headings {broken}"


def test_anchor_slugs_follow_github():
    page = ROOT / "docs" / "api.md"
    expected = {"backends-and-the-gpu-strategy", "the-math", "torchcompile-autocast-checkpointing"}
    assert expected <= anchors(page)


def test_quick_start_holds_the_two_commands_ci_runs():
    """.ci/run reads the fenced block after '## Quick start' verbatim and runs each line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1]
    block = section.split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert commands == ['pip install "torch==2.13.0" -e ".[test]" && python -m fastlora.demo',
                        "python -m pytest"]


_HISTORY = [
    (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
    (re.compile(r"(?<![\w/])#\d+\b"), "an issue number"),
    (re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"), "a commit hash"),
    (re.compile(r"\bwhat was tried\b", re.I), "development history"),
    # fastlora installs from the checkout; there is no "fastlora" on a package index
    (re.compile(r"pip install (?:-\S+ )*fastlora"), "an install from an index, not the checkout"),
]


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_user_docs_carry_no_development_history(path):
    found = [f"line {n}: {why}: {m.group(0)!r}"
             for n, line in enumerate(path.read_text().splitlines(), start=1)
             for pattern, why in _HISTORY for m in pattern.finditer(line)]
    assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)
