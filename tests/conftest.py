"""Test set-up: without a GPU, the Triton backend runs its real @triton.jit code on CPU
tensors under Triton's interpreter, so the env var must be set before triton is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlora  # noqa: E402  (after the interpreter switch)
import fastlora.kernels.api  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from helpers import available_backends  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not os.environ.get("FASTLORA_NO_BOUNDS_CHECK"):
    # a kernel's out-of-bounds access fails its test with a message instead of killing pytest
    import interpreter_bounds  # noqa: E402

    interpreter_bounds.install()

# tests.mutation_smoke runs the suite on a mutated copy of the package: refuse to run if the
# copy is not what was imported (the editable install maps fastlora.kernels to the checkout)
_expect_root = os.environ.get("FASTLORA_EXPECT_ROOT")
if _expect_root:
    for _module in (fastlora, fastlora.kernels.api):
        if not os.path.realpath(_module.__file__).startswith(os.path.realpath(_expect_root) + os.sep):
            raise RuntimeError(
                f"FASTLORA_EXPECT_ROOT={_expect_root}: {_module.__name__} was imported from "
                f"{_module.__file__}"
            )

# hypothesis: "ci" (set by CI=1) is a fixed, derandomized set of examples; property tests
# split their cases so each backend gets examples with dropout active (tests/test_properties.py)
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = fastlora.get_backend()
    yield
    fastlora.set_backend(previous)


@pytest.fixture(params=available_backends())
def backend(request):
    """Each backend that can run here: "torch" always, "triton" on CUDA or under the interpreter."""
    with fastlora.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
