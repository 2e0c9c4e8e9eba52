"""The checkout's ``kernels/`` directory is ``fastlora.kernels``, and never shadows the unrelated
``kernels`` package (Hugging Face's hub kernels) that transformers and bitsandbytes import."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_directory_is_a_namespace_portion():
    assert (ROOT / "kernels" / "api.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the checkout's kernels/ a regular package that shadows the "
        "installed 'kernels' package when run from the repository root"
    )


def test_installed_kernels_package_wins_from_the_repository_root(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("def get_kernel(*args, **kwargs):\n    return 'hub'\n")
    code = (
        "import kernels; print(kernels.__file__); from kernels import get_kernel; "
        "print(get_kernel()); import fastlora.kernels.api as api; print(api.__file__); "
        "from fastlora.triton_backend import _kernels; print(callable(_kernels.lora_forward))"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TRITON_INTERPRET="1")
    # "-c" puts the working directory (the repository root) first on sys.path, as a user's
    # script or `python -m pytest` there does
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(other / "__init__.py")
    assert lines[1] == "hub"
    assert Path(lines[2]).resolve() == (ROOT / "kernels" / "api.py").resolve() or lines[2].endswith(
        os.path.join("fastlora", "kernels", "api.py"))
    assert lines[3] == "True"
