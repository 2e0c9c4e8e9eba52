"""Named adapters and mixed-adapter batches against PEFT (``adapter_names``) on the same
weights, in float64, so any difference beyond rounding is a routing or math error."""

from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
from torch import nn

import fastlora
from fastlora.layer import FastLoRALinear
from fastlora.model import lora_layers

BASE = "__base__"
TOL = dict(rtol=1e-10, atol=1e-10)  # float64; the two sides differ by summation order only

# name -> (apply_lora kwargs): different r, alpha, rsLoRA and target modules
SPECS = {
    "default": dict(target_modules=["fc1", "fc2"], r=4, lora_alpha=8),
    "b": dict(target_modules=["fc1"], r=2, lora_alpha=3, use_rslora=True),
    "c": dict(target_modules=["fc2", "fc3"], r=6, lora_alpha=4),
}
NAMES = ["default", BASE, "b", "c", "default", "b", "c"]


class Tiny(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10, bias=bias)
        self.fc2 = nn.Linear(10, 9, bias=bias)
        self.fc3 = nn.Linear(9, 7, bias=False)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def base_model(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(bias).double().eval()


def fl_model(base: nn.Module, specs=SPECS, dropout: float = 0.0) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    for name, kw in specs.items():
        fastlora.apply_lora(model, init_lora_weights=False, adapter_name=name,
                            lora_dropout=dropout, **kw)
    return model


def peft_twin(base: nn.Module, model: nn.Module, specs=SPECS) -> nn.Module:
    """A PEFT model over a copy of ``base`` holding the same factors as ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = None
        for name, kw in specs.items():
            cfg = peft.LoraConfig(init_lora_weights=False, **kw)
            if pm is None:
                pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    with torch.no_grad():
        for lname, layer in lora_layers(model).items():
            peft_layer = pm.base_model.model.get_submodule(lname)
            for name in layer.adapter_names():
                peft_layer.lora_A[name].weight.copy_(layer.adapter(name).lora_A)
                peft_layer.lora_B[name].weight.copy_(layer.adapter(name).lora_B)
    return pm.eval()


def inputs(S: int = len(NAMES), T: int = 5, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, T, 12, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_mixed_inference_matches_peft(bias):
    base = base_model(bias)
    model = fl_model(base)
    pm = peft_twin(base, model)
    x = inputs()
    with torch.no_grad():
        expected = pm(x, adapter_names=NAMES)
        with fastlora.adapter_batch(model, NAMES):
            got = model(x)
    torch.testing.assert_close(got, expected, **TOL)
    # and the rows differ from the base where an adapter applies (the test can fail)
    assert not torch.allclose(got[0], base(x)[0])
    torch.testing.assert_close(got[1], base(x)[1], **TOL)


def test_mixed_2d_input_and_decode_shape():
    base = base_model()
    model = fl_model(base)
    pm = peft_twin(base, model)
    x = inputs()[:, 0]  # [S, K]: one token per sample
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        got = model(x)
    torch.testing.assert_close(got, pm(x, adapter_names=NAMES), **TOL)


def _grads(model_or_layers) -> dict:
    return {n: p.grad.clone() for n, p in model_or_layers.named_parameters() if p.grad is not None}


# every adapter of the same rank: the path with no padded rank slots
SPECS_EQUAL_R = {name: {**kw, "r": 4} for name, kw in SPECS.items()}


@pytest.mark.parametrize("specs", [SPECS, SPECS_EQUAL_R], ids=["ranks-differ", "ranks-equal"])
def test_mixed_training_grads_equal_each_adapter_alone(specs):
    """p = 0: adapter i's gradients in the mixed batch are those of i trained alone on its rows
    (PEFT, adapter i active, on those rows only); x's gradient likewise, row by row."""
    base = base_model()
    model = fl_model(base, specs).train()
    pm = peft_twin(base, model, specs).train()
    x = inputs().requires_grad_(True)
    w = torch.randn(len(NAMES), 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with fastlora.adapter_batch(model, NAMES):
        (model(x) * w).sum().backward()
    for name in {*NAMES}:
        rows = [i for i, n in enumerate(NAMES) if n == name]
        xr = x.detach()[rows].clone().requires_grad_(True)
        pm.zero_grad()
        if name == BASE:
            with pm.disable_adapter():
                (pm(xr) * w[rows]).sum().backward()
        else:
            pm.base_model.set_adapter(name)
            for n_, p in pm.named_parameters():  # PEFT freezes inactive adapters: train all
                if "lora_" in n_:
                    p.requires_grad_(True)
            (pm(xr) * w[rows]).sum().backward()
            for lname, layer in lora_layers(model).items():
                ad = layer.adapter(name)
                if ad is None:
                    continue
                peft_layer = pm.base_model.model.get_submodule(lname)
                torch.testing.assert_close(ad.lora_A.grad, peft_layer.lora_A[name].weight.grad, **TOL)
                torch.testing.assert_close(ad.lora_B.grad, peft_layer.lora_B[name].weight.grad, **TOL)
        torch.testing.assert_close(x.grad[rows], xr.grad, **TOL)


def test_unused_adapter_gets_no_gradient_and_base_frozen():
    model = fl_model(base_model()).train()
    with fastlora.adapter_batch(model, ["b", BASE, "b"]):
        model(inputs(3)).sum().backward()
    layer = model.fc1
    assert layer.adapter("b").lora_A.grad is not None
    assert layer.lora_A.grad is None or not layer.lora_A.grad.any()
    assert model.fc2.lora_A.grad is None or not model.fc2.lora_A.grad.any()
    assert layer.weight.grad is None


def test_dropout_rate_is_each_adapters_own():
    """x = 1, A = 1, B = 1 (r = 1): the low-rank output of a row is s * kept / (1 - p), so each
    row's kept fraction is read off; backward's dx reveals the mask it used, which must be the
    forward's (same count per row)."""
    K, T = 2048, 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, 3, bias=False)).double()
    for name, p in (("p1", 0.1), ("p5", 0.5)):
        fastlora.apply_lora(model, ["0"], r=1, lora_alpha=1, lora_dropout=p, adapter_name=name)
    layer = model[0]
    with torch.no_grad():
        for name in ("p1", "p5"):
            layer.adapter(name).lora_A.fill_(1.0)
            layer.adapter(name).lora_B.fill_(1.0)
    names = ["p1", "p5", BASE, "p5", "p1", "p5"]
    x = torch.ones(len(names), T, K, dtype=torch.float64, requires_grad=True)
    model.train()
    with fastlora.adapter_batch(model, names):
        y = model(x)
        y.sum().backward()
    low = (y - x.detach() @ layer.weight.t())[..., 0]  # [S, T]: s * kept / (1 - p)
    dx_low = x.grad - (torch.ones_like(y) @ layer.weight)  # N * s * m / (1 - p) per element
    for s, name in enumerate(names):
        if name == BASE:
            assert not low[s].any() and not dx_low[s].any()
            continue
        p = {"p1": 0.1, "p5": 0.5}[name]
        kept = low[s] * (1 - p)
        frac = (kept / K).mean().item()
        assert abs(frac - (1 - p)) < 0.02, (name, frac)
        mask = dx_low[s] * (1 - p) / 3
        assert set(mask.unique().round().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(mask.sum(-1), kept, rtol=1e-6, atol=1e-6)
    # dA = s (dy B)^T D(x) sums the same masked rows dx shows; dB = dy^T u sums their outputs
    for name in ("p1", "p5"):
        rows = [s for s, n in enumerate(names) if n == name]
        ad = layer.adapter(name)
        torch.testing.assert_close(ad.lora_A.grad[0], dx_low[rows].sum((0, 1)), **TOL)
        torch.testing.assert_close(ad.lora_B.grad[:, 0], low[rows].sum().expand(3), **TOL)


def test_single_adapter_model_is_unchanged():
    model = fastlora.apply_lora(base_model(), ["fc1", "fc2"], r=4)
    keys = [k for k in model.state_dict() if "lora" in k]
    assert keys == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    assert model.fc1._route is None
    assert model.fastlora_configs == {"default": model.fastlora_config}


def test_two_adapters_state_dict_keys():
    model = fl_model(base_model())
    keys = sorted(k for k in model.state_dict() if "lora" in k)
    assert "fc1.lora_adapters.b.lora_A" in keys and "fc2.lora_adapters.c.lora_B" in keys
    assert "fc3.lora_A" in keys  # fc3's first adapter is "c"
    assert model.fc3.adapter_name == "c"
    assert sorted(model.fastlora_configs) == ["b", "c", "default"]
    assert model.fastlora_config is model.fastlora_configs["default"]


@pytest.mark.parametrize("name", ["default", "b", "c"])
def test_set_adapter_matches_peft(name):
    base = base_model()
    model = fl_model(base)
    pm = peft_twin(base, model)
    x = inputs()
    fastlora.set_adapter(model, name)
    pm.base_model.set_adapter(name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), **TOL)
    assert model.fastlora_config is model.fastlora_configs[name]


def test_delete_adapter():
    base = base_model()
    model = fl_model(base)
    pm = peft_twin(base, model)
    fastlora.delete_adapter(model, "default")
    pm.delete_adapter("default")
    assert "default" not in model.fastlora_configs
    assert not any("default" in n for layer in lora_layers(model).values() for n in layer.adapter_names())
    assert type(model.fc1) is FastLoRALinear and model.fc1.adapter_name == "b"
    x = inputs(4)
    names = ["b", "c", BASE, "c"]
    with torch.no_grad(), fastlora.adapter_batch(model, names):
        torch.testing.assert_close(model(x), pm(x, adapter_names=names), **TOL)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['default'\]"):
        with fastlora.adapter_batch(model, ["default"] * 4):
            pass
    fastlora.delete_adapter(model, "b")
    assert type(model.fc1) is nn.Linear  # its only adapter is gone


@pytest.mark.parametrize("name", ["default", "b", "c"])
def test_merge_by_name_matches_peft(name):
    base = base_model()
    model = fl_model(base)
    pm = peft_twin(base, model)
    x = inputs()
    with torch.no_grad():
        pm.base_model.set_adapter(name)
        expected = pm(x)
        fastlora.merge_lora(model, adapter_name=name)
        got = model(x)
    assert not lora_layers(model) and not hasattr(model, "fastlora_configs")
    torch.testing.assert_close(got, expected, **TOL)


def test_save_multi_layout_loads_in_peft(tmp_path):
    base = base_model()
    model = fl_model(base)
    fastlora.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "c" / "adapter_config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        pm.load_adapter(os.path.join(tmp_path, "b"), adapter_name="b")
        pm.load_adapter(os.path.join(tmp_path, "c"), adapter_name="c")
    x = inputs()
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        torch.testing.assert_close(model(x), pm(x, adapter_names=NAMES), **TOL)


def test_save_one_adapter_by_name(tmp_path):
    base = base_model()
    model = fl_model(base)
    fastlora.save_adapter(model, tmp_path, adapter_name="c")
    again = fastlora.load_adapter(copy.deepcopy(base), tmp_path, adapter_name="c")
    fastlora.set_adapter(model, "c")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), **TOL)
    assert again.fc3.adapter_name == "c"


def test_peft_multi_save_loads_in_fastlora(tmp_path):
    base = base_model()
    pm = peft_twin(base, fl_model(base))
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    fastlora.load_adapter(model, tmp_path)
    fastlora.load_adapter(model, tmp_path / "b", adapter_name="b")
    fastlora.load_adapter(model, tmp_path / "c", adapter_name="c")
    x = inputs()
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        torch.testing.assert_close(model(x), pm(x, adapter_names=NAMES), **TOL)
    # loading again under a present name replaces its factors
    fastlora.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert sorted(model.fastlora_configs) == ["b", "c", "default"]


def test_from_peft_several_adapters():
    base = base_model()
    pm = peft_twin(base, fl_model(base))
    x = inputs()
    with torch.no_grad():
        expected = pm(x, adapter_names=NAMES)
    model = fastlora.from_peft(pm)
    assert sorted(model.fastlora_configs) == ["b", "c", "default"]
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        torch.testing.assert_close(model(x), expected, **TOL)
    assert model.fc1.adapter("b").lora_A.requires_grad


def test_errors():
    model = fl_model(base_model())
    with pytest.raises(ValueError, match="already has .* adapter named 'b'"):
        fastlora.apply_lora(model, ["fc1"], adapter_name="b")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        with fastlora.adapter_batch(model, ["zz", "b"]):
            pass
    with pytest.raises(ValueError, match="names has 3 entries, one per sample, but .* shape \\(4, 5, 12\\)"):
        with fastlora.adapter_batch(model, ["b", "c", "b"]):
            model(inputs(4))
    with pytest.raises(TypeError, match="names: expected a list"):
        with fastlora.adapter_batch(model, "b"):
            pass
    with pytest.raises(ValueError, match="set_adapter: unknown adapter 'zz'"):
        fastlora.set_adapter(model, "zz")
    with pytest.raises(ValueError, match="delete_adapter: unknown adapter 'zz'"):
        fastlora.delete_adapter(model, "zz")
    with pytest.raises(ValueError, match="merge_lora: unknown adapter 'zz'"):
        fastlora.merge_lora(model, adapter_name="zz")
    with pytest.raises(ValueError, match="adapter_name: expected a non-empty name"):
        fastlora.apply_lora(model, ["fc1"], adapter_name="__base__")
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        fastlora.apply_lora(model, ["fc1"], adapter_name="p", init_lora_weights="pissa")
    fastlora.apply_lora(model, ["fc1"], adapter_name="d", use_dora=True)
    with pytest.raises(ValueError, match="adapter 'd' is a DoRA adapter"):
        with fastlora.adapter_batch(model, ["d", "b"]):
            pass


def test_autocast_bf16_close_to_fp32():
    model = fl_model(base_model()).float()
    x = inputs().float()
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)


def test_activation_checkpointing_same_grads():
    from torch.utils.checkpoint import checkpoint

    model = fl_model(base_model()).train()
    x = inputs()
    with fastlora.adapter_batch(model, NAMES):
        model(x).pow(2).sum().backward()
        plain = _grads(model)
        model.zero_grad()
        checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
    torch.testing.assert_close(_grads(model), plain, **TOL)


def test_compile_fullgraph_fixed_names():
    """One frame for eval, no recompile when the same names come back in a new block; the
    compiled mixed batch equals PEFT's, in eval and (with dropout off) its gradients eager's."""
    from torch._dynamo.testing import CompileCounter

    base = base_model()
    model = fl_model(base)
    pm = peft_twin(base, model)
    x = inputs()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = pm(x, adapter_names=NAMES)
        for _ in range(2):
            with fastlora.adapter_batch(model, NAMES):
                torch.testing.assert_close(compiled(x), expected, **TOL)
    assert counter.frame_count == 1
    model.train()
    with fastlora.adapter_batch(model, NAMES):
        compiled(x).pow(2).sum().backward()
        got = _grads(model)
        model.zero_grad()
        model(x).pow(2).sum().backward()
    torch.testing.assert_close(got, _grads(model), **TOL)


def test_compile_with_dropout_draws_a_mask():
    model = fl_model(base_model(), dropout=0.5).train()
    x = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with fastlora.adapter_batch(model, NAMES):
        torch.manual_seed(0)
        a = compiled(x)
        torch.manual_seed(0)
        b = model(x)
    torch.testing.assert_close(a, b, **TOL)  # the same draw from torch's generator
    model.eval()
    with torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        assert not torch.allclose(a, model(x))  # dropout was applied in training


def test_mixed_batch_over_a_4bit_base():
    """QLoRA: the mixed batch over a bitsandbytes NF4 base equals a float64 per-row computation
    on bitsandbytes' own decode of the weight, outputs and each adapter's gradients."""
    pytest.importorskip("bitsandbytes")
    from qlora_helpers import dequantized, linear4bit

    from helpers import ATOL

    model = nn.Sequential(linear4bit(64, 24, bias=True))
    torch.manual_seed(0)
    fastlora.apply_lora(model, ["0"], r=4, lora_alpha=8, init_lora_weights=False, adapter_name="a")
    fastlora.apply_lora(model, ["0"], r=2, lora_alpha=3, init_lora_weights=False, adapter_name="b")
    layer = model[0]
    names = ["a", "b", BASE, "a"]
    x = torch.randn(len(names), 3, 64)
    model.train()
    with fastlora.adapter_batch(model, names):
        y = model(x)
        y.pow(2).sum().backward()
    W = dequantized(layer.weight).double()
    params = {n: (layer.adapter(n).lora_A.detach().double().requires_grad_(True),
                  layer.adapter(n).lora_B.detach().double().requires_grad_(True),
                  layer.adapter(n).scaling) for n in ("a", "b")}
    rows = []
    for s, n in enumerate(names):
        row = x[s].double() @ W.t() + layer.bias.double()
        if n != BASE:
            A, B, scale = params[n]
            row = row + scale * (x[s].double() @ A.t()) @ B.t()
        rows.append(row)
    ref = torch.stack(rows)
    ref.pow(2).sum().backward()
    tol = dict(rtol=1e-4, atol=ATOL[torch.float32] * 10)  # fp32 compute over K = 64
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    for n in ("a", "b"):
        torch.testing.assert_close(layer.adapter(n).lora_A.grad.double(), params[n][0].grad, **tol)
        torch.testing.assert_close(layer.adapter(n).lora_B.grad.double(), params[n][1].grad, **tol)


def test_triton_backend_dispatch_matches_peft():
    """On the Triton backend the mixed batch goes to fastlora.multi_triton (under the
    interpreter on a CPU); its output equals PEFT's and its gradients the torch path's."""
    from helpers import triton_runs_here

    if not triton_runs_here():
        pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)")
    pytest.importorskip("fastlora.multi_triton")
    model = fl_model(base_model()).float()
    base = base_model().float()
    pm = peft_twin(base, model)
    x = inputs().float()
    with torch.no_grad():
        expected = pm(x, adapter_names=NAMES)
    with fastlora.use_backend("triton"), torch.no_grad(), fastlora.adapter_batch(model, NAMES):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    model.train()
    grads = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        with fastlora.use_backend(backend), fastlora.adapter_batch(model, NAMES):
            model(x).pow(2).sum().backward()
        grads[backend] = _grads(model)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-5)
