"""Dropout: PEFT's semantics (on the low-rank input only), seeded, unbiased, one mask per
call shared by forward and backward, off in eval."""

import pytest
import torch

import fastlora
from fastlora.dropout import draw_packed_mask, keep_scale, pack_mask, unpack_mask
from fastlora.reference import lora_linear_reference
from helpers import make_inputs, max_err


def _identity_lora(M, K, device, dtype=torch.float32):
    """W = 0, no bias, A = B = I (r = K = N), s = 1: y = D(x), so the mask is readable."""
    x = torch.rand(M, K, generator=torch.Generator().manual_seed(3)).add_(0.5).to(device, dtype)
    eye = torch.eye(K, device=device, dtype=dtype)
    return x, torch.zeros(K, K, device=device, dtype=dtype), eye.clone(), eye.clone()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_bernoulli_and_output_unbiased(backend, p, device):
    M, K = 256, 32
    x, w, A, B = _identity_lora(M, K, device)
    torch.manual_seed(0)
    y = fastlora.lora_linear(x, w, None, A, B, 1.0, dropout_p=p, training=True)
    kept = y != 0
    frac = kept.double().mean().item()
    n = M * K
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, frac
    # kept elements are scaled by 1/(1-p); dropped ones are zero
    assert max_err(y[kept], (x / (1 - p))[kept]) < 1e-4 * (1 / (1 - p))
    # unbiased: the mean over many draws approaches x
    acc = torch.zeros_like(x, dtype=torch.float64)
    draws = 64
    for _ in range(draws):
        acc += fastlora.lora_linear(x, w, None, A, B, 1.0, dropout_p=p, training=True).double()
    rel = ((acc / draws).mean() - x.double().mean()).abs() / x.double().mean()
    assert rel < 0.01, rel


def test_seed_reproduces_and_eval_turns_dropout_off(backend, device):
    x, w, b, A, B = make_inputs(32, 24, 16, 4, torch.float32, device)
    torch.manual_seed(7)
    y1 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    torch.manual_seed(7)
    y2 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    y3 = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=True)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    ref = lora_linear_reference(x, w, b, A, B, 1.0)
    y_eval = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.3, training=False)
    assert max_err(y_eval, ref) < 1e-5
    assert max_err(y1, ref) > 1e-3  # dropout really acted in training


def test_forward_and_backward_see_one_mask(backend, device):
    """With the identity LoRA, y = D(x) and dx must be dy * m / (1-p) with the same m;
    dA and dB must match the reference evaluated with that mask."""
    M, K, p = 48, 16, 0.25
    x, w, A, B = _identity_lora(M, K, device)
    xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    torch.manual_seed(11)
    y = fastlora.lora_linear(xg, w, None, Ag, Bg, 1.0, dropout_p=p, training=True)
    mask = (y != 0).detach()
    dy = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).to(device)
    y.backward(dy)
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    ref = lora_linear_reference(x64, w.double(), None, A64, B64, 1.0, mask, p)
    ref.backward(dy.double())
    assert max_err(y, ref) < 1e-4
    for got, want in ((xg.grad, x64.grad), (Ag.grad, A64.grad), (Bg.grad, B64.grad)):
        assert max_err(got, want) < 1e-3 * max(1.0, want.abs().max().item())


def test_gradcheck_with_dropout_under_fixed_seed():
    """float64 gradcheck of the torch backend with dropout: re-seeding before every call fixes
    the mask, so the op is a smooth function of (x, A, B)."""
    with fastlora.use_backend("torch"):
        x, w, b, A, B = make_inputs(6, 10, 7, 3, torch.float64, "cpu")

        def f(x, A, B):
            torch.manual_seed(1234)
            return fastlora.lora_linear(x, w, b, A, B, 0.7, dropout_p=0.4, training=True)

        inputs = tuple(t.clone().requires_grad_() for t in (x, A, B))
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck is not None


def test_directional_derivative_with_dropout(backend, device):
    """For a fixed mask the op is linear in x: y(x + e v) - y(x) = e * J v; the backward's
    vector-Jacobian product must agree: <dy, J v> == <J^T dy, v>."""
    x, w, b, A, B = make_inputs(24, 20, 12, 5, torch.float32, device)
    v = torch.randn_like(x)
    dy = torch.randn(24, 12, device=device)

    def run(inp):
        torch.manual_seed(99)
        return fastlora.lora_linear(inp, w, b, A, B, 1.3, dropout_p=0.3, training=True)

    jv = run(x + v) - run(x)  # exact for a linear map (bias cancels)
    xg = x.clone().requires_grad_()
    run(xg).backward(dy)
    lhs = (dy.double() * jv.double()).sum()
    rhs = (xg.grad.double() * v.double()).sum()
    assert abs(lhs - rhs) <= 1e-3 * (abs(lhs) + 1), (lhs, rhs)


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_pack_unpack_round_trip(cols):
    keep = torch.rand(5, -(-cols // 8) * 8) < 0.5
    assert torch.equal(unpack_mask(pack_mask(keep), cols), keep[:, :cols])
    packed = draw_packed_mask(3, cols, 0.5, torch.device("cpu"))
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-cols // 8))


def test_keep_scale_is_exact_for_the_drawn_rate():
    assert keep_scale(0.0) == 1.0
    assert abs(keep_scale(0.1) - 1 / 0.9) < 1e-4
    assert abs(keep_scale(0.5) - 2.0) < 1e-12


def test_empty_batch_with_dropout(backend, device):
    x, w, b, A, B = make_inputs(0, 12, 8, 2, torch.float32, device, lead=(3,))
    x.requires_grad_()
    y = fastlora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.2, training=True)
    assert y.shape == (3, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
