"""A batch long enough that the kernels' grouped tile order has a partial last group (more
than GROUP_M row tiles, not a multiple of it) and several column tiles: every output tile is
computed once. A 293-token batch: 8 * 32 + 37 rows, so 10 row tiles of 32 under the
interpreter, 3 column tiles for N = 72.

Yardstick: fastlora.reference in float64; budget twice plain PyTorch's float32 error."""

from __future__ import annotations

import torch

import fastlora
from helpers import assert_matches_reference, make_inputs, reference_grads

M, K, N, R, S = 293, 40, 72, 3, 1.5


def test_long_batch_matches_reference(backend, device):
    x, w, b, A, B = make_inputs(M, K, N, R, torch.float32, device)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(device)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    y = fastlora.lora_linear(xg, w, b, Ag, Bg, S)
    y.backward(dy)
    got = (y.detach(), xg.grad, Ag.grad, Bg.grad)
    want = reference_grads(*(t.double() for t in (x, w, b, A, B)), S, dy.double())
    same = reference_grads(x, w, b, A, B, S, dy)
    for name, g, t, sd in zip(("y", "dx", "dA", "dB"), got, want, same):
        assert_matches_reference(g, t, sd, torch.float32, name)
