"""The mutation smoke's own machinery (tests/mutation_smoke.py): verdicts from the child's JUnit
report (a failure is a kill, set-up errors, crashes and silent runs are not), stale anchors
reported apart and never run, the child imports the mutated copy (package and kernels),
anything short of every mutant killed fails the run.

The listed anchors themselves are checked by the smoke when it runs (its "stale" count), not
here: a test that reads the package's source would fail on any edit of an anchored line, and
so report a bug it never ran as caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mutation_smoke import (
    MUTANTS, ROOT, Mutant, MutantError, Report, apply_mutant, child_env, classify, in_copy, main,
    make_copy, parse_junit, run_tests,
)


def test_listed_mutants_are_well_formed():
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names)
    for m in MUTANTS:
        assert m.old != m.new and m.tests, m.name
        assert (ROOT / m.path).is_file(), m.name
        for t in m.tests:
            assert (ROOT / t.split("::")[0]).is_file(), (m.name, t)


def test_missing_or_ambiguous_anchor_is_an_error(tmp_path):
    (tmp_path / "f.py").write_text("a = 1\na = 1\n")
    with pytest.raises(MutantError, match=r"'gone': anchor found 0 times in f.py"):
        apply_mutant(tmp_path, Mutant("gone", "f.py", "b = 2\n", "b = 3\n", ("t",)))
    with pytest.raises(MutantError, match=r"'twice': anchor found 2 times"):
        apply_mutant(tmp_path, Mutant("twice", "f.py", "a = 1\n", "a = 2\n", ("t",)))
    with pytest.raises(MutantError, match="no file nope.py"):
        apply_mutant(tmp_path, Mutant("nofile", "nope.py", "x", "y", ("t",)))


def test_main_reports_a_stale_anchor_apart_and_fails(capsys):
    stale = Mutant("stale", "fastlora/dropout.py", "no such line\n", "x\n", ("tests/test_dropout.py",))
    assert main(["--no-baseline"], mutants=[stale]) == 1
    out = capsys.readouterr()
    assert "'stale': anchor found 0 times" in out.err
    assert "killed 0, survived 0, crashed 0, stale 1 (of 1 mutants)" in out.out


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok" time="0.1" />
<testcase classname="tests.test_a" name="test_assert" time="0.1"><failure message="assert 1 == 2">
E   assert 1 == 2

tests/test_a.py:5: AssertionError</failure></testcase>
<testcase classname="tests.test_a" name="test_raises" time="0.1"><failure message="ValueError: x">
E   ValueError: x

tests/test_a.py:8: ValueError</failure></testcase>
<testcase classname="tests.test_a" name="test_setup" time="0.1"><error message="failed on setup">
E   RuntimeError: fixture

tests/test_a.py:2: RuntimeError</error></testcase>
<testcase classname="tests.test_a" name="test_skip" time="0.1"><skipped message="no gpu" /></testcase>
</testsuite></testsuites>"""


def test_junit_report_is_parsed_into_passes_failures_and_errors(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    passed, failures, errors = parse_junit(tmp_path / "r.xml")
    assert passed == 1
    assert failures == [("tests.test_a::test_assert", "AssertionError"),
                        ("tests.test_a::test_raises", "ValueError")]
    assert errors == [("tests.test_a::test_setup", "RuntimeError")]


@pytest.mark.parametrize("report, verdict", [
    (Report(1, 0, [("t", "AssertionError")]), "killed"),
    (Report(1, 2, [("t", "InterpreterError")]), "killed"),
    (Report(0, 3), "survived"),
    (Report(-11, 0, [("t", "AssertionError")]), "crashed"),  # SIGSEGV: no kill, whatever ran
    (Report(None), "crashed"),  # timeout
    (Report(2, 0, [], [("t", "ImportError")]), "crashed"),  # collection error
    (Report(3), "crashed"),  # pytest internal error
    (Report(5), "crashed"),  # no test collected
    (Report(0, 0), "crashed"),  # everything skipped: nothing ran
    (Report(1, 0, [], [("t", "RuntimeError")]), "crashed"),  # set-up errors only
    (Report(1, 0, [("t", "MemoryError")]), "crashed"),
], ids=["assert", "exception", "pass", "signal", "timeout", "collection", "internal",
        "no-tests", "all-skipped", "setup-error", "memory"])
def test_verdicts(report, verdict):
    assert classify(report)[0] == verdict


@pytest.mark.slow
def test_child_imports_the_copy(tmp_path):
    """The editable install maps fastlora.kernels to the checkout; the copy must win."""
    root = make_copy(tmp_path)
    code = ("import fastlora, fastlora.kernels.api; print(fastlora.__file__); "
            "print(fastlora.kernels.api.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=child_env(root),
                         capture_output=True, text=True, check=True)
    files = out.stdout.split()
    assert files == [str(root / "fastlora" / "__init__.py"),
                     str(root / "fastlora" / "kernels" / "api.py")], files
    assert ROOT not in [root, *root.parents]


@pytest.mark.slow
def test_child_runs_a_kill_and_a_crash_apart(tmp_path):
    """A real child pytest: an assertion is a kill; a test that dies by a signal is a crash."""
    root = make_copy(tmp_path)
    (root / "tests" / "test_smoke_probe.py").write_text(
        "import os, signal\n"
        "def test_assert():\n    assert 1 == 2\n"
        "def test_signal():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    kill = run_tests(root, ("tests/test_smoke_probe.py::test_assert",))
    assert classify(kill)[0] == "killed", kill.log
    crash = run_tests(root, ("tests/test_smoke_probe.py::test_signal",))
    assert crash.returncode < 0 and classify(crash)[0] == "crashed", crash.log


@pytest.mark.slow
def test_a_surviving_mutant_fails_the_run(capsys):
    """An equivalent mutant (a comment edit) survives its test: the run must say so and fail."""
    harmless = Mutant("comment edit", "fastlora/dropout.py", "_BITS = 8\n", "_BITS = 8  # same\n",
                      ("tests/test_dropout.py::test_keep_scale_is_the_closed_form_of_the_drawn_rate",))
    assert main(["--no-baseline", "-j", "1"], mutants=[harmless]) == 1
    out = capsys.readouterr()
    assert "| comment edit | fastlora/dropout.py | survived |" in out.out
    assert "killed 0, survived 1, crashed 0, stale 0 (of 1 mutants)" in out.out


def test_in_copy_places_kernels_inside_the_package():
    assert in_copy("kernels/lora_forward.py") == "fastlora/kernels/lora_forward.py"
    assert in_copy("fastlora/layer.py") == "fastlora/layer.py"
    assert Path(in_copy("tests/x.py")) == Path("tests/x.py")
