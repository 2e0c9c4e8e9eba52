"""Where ``fastlora.kernels`` comes from.

The design card keeps the Triton kernels in the top-level ``kernels/`` directory, installed as
``fastlora.kernels`` (pyproject's package-dir). A wheel copies it to ``fastlora/kernels/``; an
editable install or a bare checkout leaves it beside ``fastlora/``, where setuptools' editable
finder cannot map a package without ``__init__.py``. ``kernels/`` has none on purpose: run
from a checkout's root, a regular package there would shadow the unrelated ``kernels``
package that transformers and bitsandbytes import, and a namespace portion yields to it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "fastlora.kernels"


def register() -> None:
    """Make ``fastlora.kernels`` importable from a checkout (a no-op once installed)."""
    if NAME in sys.modules:
        return
    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or importlib.util.find_spec(NAME) is not None:
        return  # installed layout: an implicit namespace package under fastlora
    source = here.parent / "kernels"
    if not (source / "api.py").is_file():
        return  # nothing to map: the Triton backend reports it when asked for
    package = ModuleType(NAME)
    package.__path__ = [str(source)]
    package.__package__ = NAME
    sys.modules[NAME] = package
