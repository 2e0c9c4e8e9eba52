"""Determinism, threads and offsets past 2**31."""

import threading

import pytest
import torch

import fastlora
from fastlora.reference import lora_linear_reference
from helpers import make_inputs, max_err


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_is_bitwise_reproducible(backend, device, deterministic, p):
    x, w, b, A, B = make_inputs(70, 40, 24, 5, torch.float32, device)
    dy = torch.randn(70, 24, generator=torch.Generator().manual_seed(1)).to(device)

    def grads():
        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(5)
        fastlora.lora_linear(xg, w, b, Ag, Bg, 0.8, dropout_p=p, training=True).backward(dy)
        return xg.grad, Ag.grad, Bg.grad

    first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_two_threads_share_a_layer(backend, device):
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(24, 16, r=4, init_lora_weights=False, device=device)
    inputs = [torch.randn(9 + i, 24, device=device) for i in range(2)]
    want = [layer(x) for x in inputs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                got.setdefault(i, []).append(layer(inputs[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(torch.equal(y, want[i]) for y in got[i])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (about 5 GB)")
def test_offsets_past_two_to_the_31():
    """M * K > 2**31 in bf16: the last rows are right, so no offset wrapped."""
    K, N, r = 4096, 64, 16
    M = 2**31 // K + 96
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K**-0.5
    A = torch.randn(r, K, device=dev, dtype=torch.bfloat16) * K**-0.5
    B = torch.randn(N, r, device=dev, dtype=torch.bfloat16) * r**-0.5
    with fastlora.use_backend("triton"):
        y = fastlora.lora_linear(x, w, None, A, B, 2.0)
    tail = slice(M - 200, M)
    ref = lora_linear_reference(x[tail].double(), w.double(), None, A.double(), B.double(), 2.0)
    assert max_err(y[tail], ref) < 0.05
