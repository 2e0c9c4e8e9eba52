"""The mutation smoke's own machinery (tests/mutation_smoke.py): stale anchors fail loudly,
the child imports the mutated copy (package and kernels), a survivor fails the run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mutation_smoke import (
    MUTANTS, ROOT, Mutant, MutantError, apply_mutant, child_env, in_copy, main, make_copy,
)


def test_every_listed_anchor_matches_once(tmp_path):
    make_copy(tmp_path)
    for m in MUTANTS:
        assert (tmp_path / in_copy(m.path)).read_text().count(m.old) == 1, m.name
        assert m.old != m.new and m.tests, m.name


def test_missing_or_ambiguous_anchor_is_an_error(tmp_path):
    (tmp_path / "f.py").write_text("a = 1\na = 1\n")
    with pytest.raises(MutantError, match=r"'gone': anchor found 0 times in f.py"):
        apply_mutant(tmp_path, Mutant("gone", "f.py", "b = 2\n", "b = 3\n", ("t",)))
    with pytest.raises(MutantError, match=r"'twice': anchor found 2 times"):
        apply_mutant(tmp_path, Mutant("twice", "f.py", "a = 1\n", "a = 2\n", ("t",)))
    with pytest.raises(MutantError, match="no file nope.py"):
        apply_mutant(tmp_path, Mutant("nofile", "nope.py", "x", "y", ("t",)))


def test_main_fails_on_a_stale_anchor(capsys):
    stale = Mutant("stale", "fastlora/dropout.py", "no such line\n", "x\n", ("tests/test_dropout.py",))
    assert main(["--no-baseline"], mutants=[stale]) == 1
    assert "'stale': anchor found 0 times" in capsys.readouterr().err


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
def test_a_surviving_mutant_fails_the_run(capsys):
    """An equivalent mutant (a comment edit) survives its test: the run must say so and fail."""
    harmless = Mutant("comment edit", "fastlora/dropout.py", "_BITS = 8\n", "_BITS = 8  # same\n",
                      ("tests/test_dropout.py::test_keep_scale_is_the_closed_form_of_the_drawn_rate",))
    assert main(["--no-baseline", "-j", "1"], mutants=[harmless]) == 1
    out = capsys.readouterr()
    assert "| comment edit | fastlora/dropout.py | SURVIVED |" in out.out
    assert "0/1 mutants killed" in out.out
