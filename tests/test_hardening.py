"""Determinism, threads and offsets past 2**31."""

import threading

import pytest
import torch

import fastlora
from fastlora.reference import lora_linear_reference
from helpers import available_backends, make_inputs, max_err, reference_grads


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


def _run_threads(work, n):
    errors = []

    def guarded(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _mask_readable_layer(device, p):
    """K = r = 16, N = 24, A = I, B = [I; C]: y[:, :K] = x W[:K]^T + b[:K] + s D(x), so the
    keep mask is readable from y (test-side), and every gradient has a reference with it."""
    K, N, r = 16, 24, 16
    layer = fastlora.FastLoRALinear(K, N, r=r, lora_alpha=r, lora_dropout=p, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
        layer.bias.copy_(torch.randn(N, generator=g))
        layer.lora_A.copy_(torch.eye(K))
        layer.lora_B.copy_(torch.cat([torch.eye(K), torch.randn(N - K, K, generator=g)]))
    return layer


def _check_call(layer, x, dy, p):
    """One training call: the mask read from y explains y and all three gradients (float64
    reference fed with that mask; fp32 error bound from the accumulation length)."""
    xg = x.clone().requires_grad_()
    y = layer(xg)
    dA, dB, dx = torch.autograd.grad(y, (layer.lora_A, layer.lora_B, xg), dy)
    W, b, A, B = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    x64, dy64, K = x.double(), dy.double(), x.shape[1]
    base = x64 @ W.t() + b
    keep = ((y.detach().double() - base)[:, :K].abs() > 1e-3).double()
    y64, dx64, dA64, dB64 = reference_grads(x64, W, b, A, B, layer.scaling, dy64, keep, p)
    tol = 64 * 2.0**-24 * (1 + 1 / (1 - p)) * 8  # (K + r + N)-term fp32 sums of O(1) terms
    for got, want in ((y, y64), (dx, dx64), (dA, dA64), (dB, dB64)):
        assert max_err(got, want) <= tol * max(1.0, want.abs().max().item())


def test_threads_train_with_dropout(backend, device):
    """Forward and backward with dropout from two threads at once: each call's gradients use
    that call's mask (a mask or a saved tensor shared across threads would break this)."""
    p = 0.3
    layer = _mask_readable_layer(device, p).train()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.rand(12 + i, 16, generator=gen).add_(0.5).to(device),
             torch.randn(12 + i, 24, generator=gen).to(device)) for i in range(2)]

    def work(i):
        for _ in range(2 if backend == "triton" else 10):
            _check_call(layer, *data[i], p)

    _run_threads(work, 2)


def test_set_backend_while_other_threads_compute(device):
    """One thread flips the backend while two others run forward and backward: every call
    runs on one backend or the other, whole, and gives the reference's numbers."""
    names = available_backends() if len(available_backends()) > 1 else ["torch", "auto"]
    layer = _mask_readable_layer(device, 0.0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 16, generator=gen).to(device)
    dy = torch.randn(10, 24, generator=gen).to(device)
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            fastlora.set_backend(names[i % len(names)])
            i += 1
            stop.wait(1e-4)  # yield the GIL: a spinning flipper starves the workers

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        _run_threads(lambda i: [_check_call(layer, x, dy, 0.0) for _ in range(4)], 2)
    finally:
        stop.set()
        flipper.join()


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
