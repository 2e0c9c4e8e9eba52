"""Test set-up: without a GPU, the Triton backend runs its real @triton.jit code on CPU
tensors under Triton's interpreter, so the env var must be set before triton is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlora  # noqa: E402  (after the interpreter switch)

from helpers import available_backends  # noqa: E402


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
