"""Backend selection: names, the environment default, errors instead of silent fallbacks."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import fastlora
from fastlora import backend as backend_mod


def test_set_backend_returns_previous_and_validates():
    prev = fastlora.set_backend("torch")
    assert fastlora.get_backend() == "torch"
    assert fastlora.set_backend(prev) == "torch"
    with pytest.raises(ValueError, match=r"set_backend\(name\): expected one of 'auto', 'torch', 'triton', got 'cuda'"):
        fastlora.set_backend("cuda")


def test_auto_picks_torch_for_cpu_tensors():
    fastlora.set_backend("auto")
    assert backend_mod.resolve(torch.randn(2, 2)) == "torch"
    assert backend_mod.resolve(torch.randn(2, 2, dtype=torch.float64)) == "torch"


def test_set_backend_triton_where_it_cannot_run_names_the_reason(monkeypatch):
    monkeypatch.setattr(backend_mod, "_triton_status", lambda device: (False, "no GPU and no interpreter"))
    before = fastlora.get_backend()
    with pytest.raises(RuntimeError, match=r"set_backend\('triton'\): the Triton kernels cannot "
                       r"run here \((cpu|cuda)\): no GPU and no interpreter"):
        fastlora.set_backend("triton")
    assert fastlora.get_backend() == before  # unchanged by the refusal


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case: this machine has a GPU")
def test_set_backend_triton_on_a_cpu_without_interpreter(monkeypatch):
    """The real probe (triton_backend.available), as a CPU machine without TRITON_INTERPRET=1
    sees it."""
    from fastlora import triton_backend

    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    backend_mod._triton_status_of.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"cannot run here \(cpu\): .*TRITON_INTERPRET=1"):
            fastlora.set_backend("triton")
    finally:
        backend_mod._triton_status_of.cache_clear()


def test_explicit_triton_that_cannot_run_is_an_error(monkeypatch):
    fastlora.set_backend("triton")  # runs here (interpreter); the device may still refuse
    monkeypatch.setattr(backend_mod, "_triton_status", lambda device: (False, "no GPU and no interpreter"))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on device cpu: no GPU and no interpreter"):
        fastlora.lora_linear(x, torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), 1.0)


def test_explicit_triton_refuses_float64():
    fastlora.set_backend("triton")
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton': x.dtype must be one of"):
        fastlora.lora_linear(x, x.new_ones(5, 4), None, x.new_ones(2, 4), x.new_ones(5, 2), 1.0)


@pytest.mark.slow  # a fresh Python process imports torch, triton and fastlora
def test_environment_sets_the_default():
    code = "import fastlora; print(fastlora.get_backend())"
    env = {**os.environ, "FASTLORA_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["FASTLORA_BACKEND"] = "gpu"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTLORA_BACKEND: expected one of" in bad.stderr


def test_concurrent_calls_from_threads_agree():
    layer = fastlora.FastLoRALinear(32, 16, r=4, init_lora_weights=False)
    x = torch.randn(64, 32)
    want = layer(x)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(torch.equal(layer(x), want))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results) and len(results) == 80
