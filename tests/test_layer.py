"""FastLoRALinear as a drop-in nn.Linear."""

import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora import FastLoRALinear
from fastlora.model import lora_layers
from fastlora.reference import lora_linear_reference
from helpers import half_ulp, max_err


def test_is_a_linear_with_frozen_base_and_lora_params():
    layer = FastLoRALinear(20, 12, r=4, lora_alpha=8)
    assert isinstance(layer, nn.Linear)
    assert layer.weight.shape == (12, 20) and layer.bias.shape == (12,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0
    assert (layer.r, layer.lora_alpha, layer.lora_dropout) == (4, 8, 0.0)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    assert "r=4" in repr(layer)


def test_rslora_scaling():
    assert FastLoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)


def test_base_checkpoint_loads_and_fresh_layer_equals_base():
    base = nn.Linear(24, 10)
    layer = FastLoRALinear(24, 10, r=4)
    missing, unexpected = layer.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init


def test_default_init_is_peft_default():
    torch.manual_seed(0)
    layer = FastLoRALinear(256, 64, r=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound


def test_gaussian_and_false_inits():
    torch.manual_seed(0)
    g = FastLoRALinear(512, 32, r=8, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 8) < 0.01 and torch.count_nonzero(g.lora_B) == 0
    f = FastLoRALinear(16, 16, r=4, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B) > 0


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init_lora_weights"):
        FastLoRALinear(8, 8, r=2, init_lora_weights="svd-ish")


def test_from_linear_shares_tensors_and_keeps_device_dtype():
    lin = nn.Linear(16, 8, dtype=torch.float64)
    layer = FastLoRALinear.from_linear(lin, r=2, lora_alpha=4, lora_dropout=0.1)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.device == lin.weight.device
    assert layer.lora_dropout == 0.1 and layer.scaling == 2.0
    nobias = FastLoRALinear.from_linear(nn.Linear(4, 4, bias=False), r=1)
    assert nobias.bias is None
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        FastLoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="linear: expected a plain torch.nn.Linear, got a FastLoRALinear"):
        FastLoRALinear.from_linear(layer)


def test_forward_matches_reference_with_leading_dims_and_empty_batch():
    layer = FastLoRALinear(20, 14, r=3, lora_alpha=6, init_lora_weights=False, dtype=torch.float64)
    for shape in [(2, 5, 20), (20,), (0, 20), (1, 20)]:
        x = torch.randn(*shape, dtype=torch.float64)
        ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
        y = layer(x)
        assert y.shape == (*shape[:-1], 14)
        assert max_err(y, ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_float_dtypes_run(dtype):
    layer = FastLoRALinear(32, 16, r=4, init_lora_weights=False, dtype=dtype)
    x = torch.randn(3, 32, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == dtype and layer.lora_A.grad.dtype == dtype and x.grad.dtype == dtype


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    layer = FastLoRALinear(24, 16, r=4, init_lora_weights=False)
    x = torch.randn(6, 24)
    y = layer(x)
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    w_merged = layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, w_merged)  # a second merge adds nothing
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_merge_rounds_once_unmerge_within_two_roundings(dtype, adapter_dtype):
    """merge() stores W + s B A computed in fp32 and rounded once to the weight's dtype;
    unmerge() comes back to W within two roundings. Yardstick: the exact value in float64;
    the fp32 computation of s B A (r-term dot products, the scaling, the sum with W) is off by
    at most (r + 2) 2**-24 (s |B| |A| + |W|) (gamma_n bound), far below one rounding."""
    torch.manual_seed(0)
    K, N, r = 64, 32, 8
    layer = FastLoRALinear(K, N, r=r, lora_alpha=16, init_lora_weights=False, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    factors = torch.float32 if adapter_dtype == "float32" else dtype
    with torch.no_grad():  # s B A of the size of W, so the rounding of the sum matters
        layer.lora_A = torch.nn.Parameter((torch.randn(r, K, generator=g) * 0.3).to(factors))
        layer.lora_B = torch.nn.Parameter((torch.randn(N, r, generator=g) * 0.3).to(factors))
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    s = layer.scaling
    exact = W + s * B @ A
    fp32 = (r + 2) * 2.0**-24 * (s * B.abs() @ A.abs() + W.abs())
    layer.merge()
    merged = layer.weight.detach().double()
    assert layer.weight.dtype == dtype
    err = (merged - exact).abs()
    bound = half_ulp(exact.abs() + fp32, dtype) + fp32
    assert (err <= bound).all(), f"merge: {int((err > bound).sum())} elements off by more than one rounding"
    layer.unmerge()
    back = layer.weight.detach().double()
    err = (back - W).abs()
    bound = half_ulp(exact.abs() + fp32, dtype) + half_ulp(W.abs() + 2 * fp32, dtype) + 2 * fp32
    assert (err <= bound).all(), f"unmerge: {int((err > bound).sum())} elements off by more than two roundings"


def test_training_step_moves_only_lora_params():
    torch.manual_seed(0)
    layer = FastLoRALinear(16, 8, r=2, lora_dropout=0.1)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    w0, A0 = layer.weight.clone(), layer.lora_A.clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.weight, w0)
    assert not torch.equal(layer.lora_A, A0)
    assert torch.count_nonzero(layer.lora_B) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r: expected an integer >= 1"),
        ({"r": 2.5}, "r: expected an integer >= 1"),
        ({"lora_dropout": 1.0}, r"lora_dropout: expected a float in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout: expected a float in \[0, 1\)"),
        ({"lora_alpha": float("inf")}, "lora_alpha: expected a finite number"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastLoRALinear(8, 8, **kwargs)


def test_wrong_input_width_names_in_features():
    layer = FastLoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"x: expected last dimension in_features=8.*got shape \(3, 9\)"):
        layer(torch.randn(3, 9))


def test_dtype_mismatch_is_refused_like_linear():
    layer = FastLoRALinear(8, 4, r=2)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))


def test_eval_disables_dropout():
    torch.manual_seed(0)
    layer = FastLoRALinear(16, 8, r=4, lora_dropout=0.5, init_lora_weights=False).eval()
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer(x))
    fastlora.set_backend("torch")
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert max_err(layer(x), ref) < 1e-5


def test_merge_lora_rounds_once():
    """fastlora.merge_lora (whole models) stores the same rounded-once W + s B A as merge()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24)).to(torch.bfloat16)
    fastlora.apply_lora(model, ["0", "2"], r=4, lora_alpha=8, init_lora_weights=False)
    exact, fp32 = {}, {}
    for name, layer in lora_layers(model).items():
        W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
        exact[name] = W + layer.scaling * B @ A
        fp32[name] = (layer.r + 2) * 2.0**-24 * (layer.scaling * B.abs() @ A.abs() + W.abs())
    fastlora.merge_lora(model)
    for name, want in exact.items():
        got = model.get_submodule(name).weight.detach()
        assert got.dtype == torch.bfloat16
        err = (got.double() - want).abs()
        assert (err <= half_ulp(want.abs() + fp32[name], torch.bfloat16) + fp32[name]).all(), name
