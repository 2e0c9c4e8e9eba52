"""QLoRA: LoRA over a bitsandbytes 4-bit base (NF4/FP4, with and without double
quantization, several blocksizes, fp32/fp16/bf16 compute), on both backends.

Yardsticks: bitsandbytes' own ``dequantize_4bit`` (``qlora_helpers.dequantized``) fed to the
float64 reference, bitsandbytes' ``Linear4bit`` for the low-precision error budget, PEFT's
``lora.Linear4bit`` on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import fastlora  # noqa: E402
from benchmarks.memory import saved_bytes  # noqa: E402
from fastlora import bases  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402
from helpers import assert_matches_reference, compute_dtypes, max_err, triton_runs_here  # noqa: E402
from qlora_helpers import decode64, dequantized, linear4bit, params4bit  # noqa: E402

QUANT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
QUANT_IDS = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
# (K, N, blocksize): K a multiple of the blocksize, and K = 96 with blocks straddling rows
LAYER_SHAPES = [(128, 40, 64), (96, 33, 64), (64, 24, 32), (256, 20, 256)]
LAYER_IDS = ["K128-bs64", "K96-bs64-straddle", "K64-bs32", "K256-bs256"]


def _inputs(lin, M, r, dtype, seed=1):
    """x [M, K], A [r, K], B [N, r], dy [M, N] in float64 on the layer's device."""
    g = torch.Generator().manual_seed(seed)
    N, K = lin.out_features, lin.in_features
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) * K**-0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64) * r**-0.5
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    return tuple(t.to(lin.weight.device) for t in (x, A, B, dy))


def _grads(fn, x, A, B, dy):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = fn(x, A, B)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B), dy.to(y.dtype)))


# ------------------------------------------------------------------------------ functional


@pytest.mark.parametrize("K, N, blocksize", LAYER_SHAPES, ids=LAYER_IDS)
@pytest.mark.parametrize("quant_type, nested", QUANT, ids=QUANT_IDS)
def test_forward_and_grads_match_reference(backend, device, quant_type, nested, K, N, blocksize):
    """y, dx, dA, dB against the float64 reference on the test's own float64 decode of the
    codes (``decode64``); the error budget per dtype is twice that of bitsandbytes' own
    Linear4bit path (dequantize_4bit into the compute dtype, then the matmul) plus the unfused
    LoRA in that dtype. Where bitsandbytes' CPU decode is wrong (blocks straddling rows, see
    qlora_helpers.dequantized) its path would make an O(1) budget: there the budget is twice
    the error of the unfused reference run in the compute dtype on decode64's W rounded to it
    (the same roundings the layer makes: W, the operands and the matmul in that dtype)."""
    lin = linear4bit(K, N, quant_type, nested, blocksize, device=device)
    W64 = decode64(lin.weight)
    assert max_err(W64, dequantized(lin.weight)) <= 1e-6 * W64.abs().max().item()
    bnb_decode_wrong = K % blocksize != 0 and lin.weight.device.type == "cpu"
    b64 = lin.bias.detach().double()
    x, A, B, dy = _inputs(lin, 9, 4, torch.float64)
    s = 1.5
    truth = _grads(lambda x, A, B: lora_linear_reference(x, W64, b64, A, B, s), x, A, B, dy)
    dtypes = [d for d in compute_dtypes(backend) if d != torch.float64]
    for dtype in dtypes:
        def ours(x, A, B):
            return fastlora.lora_linear(x, lin.weight, lin.bias.to(dtype), A, B, s)

        def bnb_path(x, A, B):  # Linear4bit in this compute dtype, LoRA unfused
            if bnb_decode_wrong:
                return lora_linear_reference(x, W64.to(dtype), b64.to(dtype), A, B, s)
            ref = copy.deepcopy(lin)
            ref.compute_dtype = dtype
            zero = torch.zeros(N, K, dtype=dtype, device=device)
            return ref(x) + lora_linear_reference(x, zero, None, A, B, s)

        cast = [t.to(dtype) for t in (x, A, B)]
        got = _grads(ours, *cast, dy)
        same = _grads(bnb_path, *cast, dy)
        for name, g, t, sd in zip(("y", "dx", "dA", "dB"), got, truth, same):
            assert g.dtype == dtype, name
            assert_matches_reference(g, t, sd, dtype, f"{name} {dtype}")


@pytest.mark.parametrize("quant_type, nested", QUANT, ids=QUANT_IDS)
def test_dropout_uses_one_mask_and_saves_no_dense_weight(backend, device, quant_type, nested):
    """With dropout the 4-bit layer equals the same op on bitsandbytes' dense decode of W
    under the same seed (the mask comes from torch's generator), and autograd keeps x, the
    packed weight, u and the 1-bit mask: nothing [N, K] in a float dtype."""
    K, N, r = 64, 48, 4
    lin = linear4bit(K, N, quant_type, nested, 64, bias=False, device=device)
    W = dequantized(lin.weight)
    x, A, B, dy = (t.float() for t in _inputs(lin, 13, r, torch.float32))
    previous = None
    if backend == "triton":  # both through the kernels (their mask), not a per-shape pick
        from fastlora import triton_backend

        previous = triton_backend.set_strategy("fused")
    try:
        torch.manual_seed(7)
        got = _grads(lambda x, A, B: fastlora.lora_linear(x, lin.weight, None, A, B, 2.0, 0.3, True),
                     x, A, B, dy)  # fmt: skip
        torch.manual_seed(7)
        want = _grads(lambda x, A, B: fastlora.lora_linear(x, W, None, A, B, 2.0, 0.3, True),
                      x, A, B, dy)  # fmt: skip
    finally:
        if backend == "triton":
            triton_backend.set_strategy(previous)
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-4

    saved = []

    def pack(t):
        saved.append(t)
        return t

    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastlora.lora_linear(xg, lin.weight, None, Ag, Bg, 2.0, 0.1, True)
    dense = [t for t in saved if t.is_floating_point() and t.numel() >= N * K and t.shape != xg.shape]
    assert not dense, [tuple(t.shape) for t in dense]
    assert any(t.dtype == torch.uint8 and t.numel() == (N * K + 1) // 2 for t in saved)


def test_saved_for_backward_is_x_u_and_bits():
    """The layer over a Linear4bit keeps u [M, r] and M*K/8 mask bytes beyond x and its own
    parameters; PEFT's QLoRA keeps the dropped-out x and more."""
    peft = pytest.importorskip("peft")
    M, K, N, r = 64, 128, 96, 8
    lin = linear4bit(K, N)
    layer = fastlora.FastLoRALinear.from_linear(copy.deepcopy(lin), r=r, lora_alpha=16, lora_dropout=0.1)
    x = torch.randn(M, K, requires_grad=True)
    ours = saved_bytes(layer.train(), x)
    assert ours["extra"] == M * r * 4 + M * K // 8, ours

    holder = nn.Sequential()
    holder.proj = copy.deepcopy(lin)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1, target_modules=["proj"]))
    theirs = saved_bytes(pm.train(), x)
    assert ours["extra"] <= 0.15 * theirs["extra"], (ours, theirs)


# ------------------------------------------------------------------------------ layer


@pytest.mark.parametrize("quant_type, nested", QUANT, ids=QUANT_IDS)
def test_from_linear4bit_keeps_the_packed_weight(quant_type, nested):
    lin = linear4bit(64, 32, quant_type, nested, 64)
    weight, qs = lin.weight, lin.weight.quant_state
    before = {k: v.clone() for k, v in lin.state_dict().items() if isinstance(v, torch.Tensor)}
    layer = fastlora.FastLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    assert layer.weight is weight and layer.weight.quant_state is qs
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert (layer.in_features, layer.out_features) == (64, 32)
    # bitsandbytes' keys and values as Linear4bit writes them, plus the two factors
    state = layer.state_dict()
    assert set(state) == set(before) | {"lora_A", "lora_B"}
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    # B = 0 at init: the layer is its base
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)


def test_compute_dtype_is_kept_like_linear4bit():
    """A bf16-compute Linear4bit takes fp32 input, computes in bf16, answers in fp32: so
    does the layer over it (B = 0: it equals Linear4bit within bf16 rounding)."""
    lin = linear4bit(64, 32, compute_dtype=torch.bfloat16)
    layer = fastlora.FastLoRALinear.from_linear(copy.deepcopy(lin), r=4, lora_alpha=8)
    assert layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(6, 64)
    y, ref = layer(x), lin(x)
    assert y.dtype == torch.float32
    assert max_err(y, ref) <= 4 * 2**-8 * ref.abs().max().item()


def test_layer_matches_peft_qlora():
    """Outputs and gradients of A and B next to PEFT's lora.Linear4bit on the same base."""
    peft = pytest.importorskip("peft")
    # K a multiple of the blocksize: bitsandbytes' CPU kernel misdecodes straddling blocks
    lin = linear4bit(128, 40, "nf4", True, 64)
    holder = nn.Sequential()
    holder.proj = copy.deepcopy(lin)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    theirs = pm.base_model.model.proj
    ours = fastlora.FastLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    x = torch.randn(2, 5, 128)
    yp, yo = pm(x), ours(x)
    torch.testing.assert_close(yo, yp, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-4, rtol=1e-4)


def test_merge_in_place_is_refused():
    layer = fastlora.FastLoRALinear.from_linear(linear4bit(64, 32), r=4)
    with pytest.raises(ValueError, match="merge: a 4-bit weight cannot hold"):
        layer.merge()


def test_cpu_inference_packing_is_restored():
    """bitsandbytes repacks a Linear4bit that ran under no_grad in eval mode on an
    AVX512-BF16 CPU; from_linear restores the standard layout, the functional op refuses it."""
    lin = linear4bit(64, 32, compute_dtype=torch.bfloat16).eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = lin(x)
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    with pytest.raises(ValueError, match="CPU inference packing"):
        fastlora.lora_linear(x, lin.weight, None, torch.zeros(2, 64, dtype=torch.bfloat16),
                             torch.zeros(32, 2, dtype=torch.bfloat16), 1.0)
    with pytest.warns(UserWarning, match="lost precision"):  # the real repacking, here
        layer = fastlora.FastLoRALinear.from_linear(lin, r=2)
    with torch.no_grad():
        y = layer(x)
    assert max_err(y, ref) <= 4 * 2**-8 * ref.abs().max().item()


# ------------------------------------------------------------------------------ bad input


def _good4(**over):
    lin = linear4bit(16, 8)
    kw = dict(x=torch.randn(3, 16), weight=lin.weight, bias=lin.bias, lora_A=torch.randn(2, 16),
              lora_B=torch.randn(8, 2), scaling=1.0)  # fmt: skip
    kw.update(over)
    return kw


def _with_state(**changes):
    weight = linear4bit(16, 8).weight
    qs = copy.copy(weight.quant_state)
    for k, v in changes.items():
        setattr(qs, k, v)
    weight.quant_state = qs
    return weight


def test_4bit_weight_without_quant_state():
    weight = bnb.nn.Params4bit(torch.randn(8, 16), requires_grad=False)  # never quantized
    with pytest.raises(ValueError, match="weight: a bitsandbytes 4-bit weight needs its quant_state"):
        fastlora.lora_linear(**_good4(weight=weight))


def test_packed_bytes_without_quant_state():
    packed = linear4bit(16, 8).weight.data  # a plain uint8 tensor
    with pytest.raises(ValueError, match="weight: got a uint8 tensor .* without a quant_state"):
        fastlora.lora_linear(**_good4(weight=packed))


def test_unsupported_quant_type():
    with pytest.raises(ValueError, match=r"weight.quant_state.quant_type: expected one of \('nf4', 'fp4'\), got 'int4'"):
        fastlora.lora_linear(**_good4(weight=_with_state(quant_type="int4")))


def test_unsupported_blocksize():
    with pytest.raises(ValueError, match="weight.quant_state.blocksize: expected one of .* got 48"):
        fastlora.lora_linear(**_good4(weight=_with_state(blocksize=48)))


def test_packed_data_of_another_shape():
    with pytest.raises(ValueError, match=r"weight: a 4-bit \[8, 32\] weight packs into 128 bytes, got 64"):
        fastlora.lora_linear(**_good4(weight=_with_state(shape=torch.Size([8, 32])), x=torch.randn(3, 32),
                                      lora_A=torch.randn(2, 32)))


def test_absmax_of_another_size():
    w = _with_state(absmax=torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weight.quant_state.absmax: expected 2 scales .* got \(5,\)"):
        fastlora.lora_linear(**_good4(weight=w))


def test_compute_dtype_must_be_one_bitsandbytes_decodes_into():
    kw = _good4(x=torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: a 4-bit weight computes in x's dtype .* got torch.float64"):
        fastlora.lora_linear(**kw)


def test_bias_must_match_the_compute_dtype():
    kw = _good4(x=torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"bias: expected dtype torch.bfloat16 \(x's dtype, the 4-bit compute dtype\), got torch.float32"):
        fastlora.lora_linear(**kw)


def test_wrong_width_names_the_4bit_shape():
    with pytest.raises(ValueError, match=r"x: expected last dimension in_features=16 \(weight is \[8, 16\]\)"):
        fastlora.lora_linear(**_good4(x=torch.randn(3, 15)))


def test_layer_compute_dtype_must_be_a_float_bitsandbytes_decodes_into():
    lin = linear4bit(16, 8)
    lin.compute_dtype = torch.float64
    with pytest.raises(ValueError, match="compute_dtype: expected one of float16, bfloat16, float32, got torch.float64"):
        fastlora.FastLoRALinear.from_linear(lin, r=2)


# ------------------------------------------------------------------------------ decoder


def _decode_kernel():
    if not triton_runs_here():
        pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET is not 1)")
    from fastlora.triton_backend import _kernels

    return _kernels.dequantize_4bit


def _tiles_kernel():
    """A test kernel storing ``load_4bit_tile`` tiles [BN, BK] of W (module level: a
    @triton.jit function resolves names through its module's globals)."""
    global _TILES
    if _TILES is None:
        import triton
        import triton.language as tl

        from fastlora.kernels.dequant_4bit import load_4bit_tile

        globals()["load_4bit_tile"], globals()["tl"] = load_4bit_tile, tl

        @triton.jit
        def tiles(packed, absmax, code2, absmax2, offset, out, N, K, BASE: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr):
            n0 = tl.program_id(0) * BN
            k0 = tl.program_id(1) * BK
            w = load_4bit_tile(packed, absmax, code2, absmax2, offset, n0, k0, N, K, BASE, BN,
                               BK, BS, NBS)
            offs_n = n0 + tl.arange(0, BN)
            offs_k = k0 + tl.arange(0, BK)
            tl.store(out + offs_n[:, None] * K + offs_k[None, :], w,
                     mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))

        _TILES = tiles
    return _TILES


_TILES = None
DECODE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("blocksize", bases.BLOCKSIZES)
@pytest.mark.parametrize("quant_type, nested", QUANT, ids=QUANT_IDS)
def test_triton_decode_matches_bitsandbytes(quant_type, nested, blocksize):
    """The @triton.jit tile loader against bitsandbytes' dequantize_4bit, every blocksize,
    on a shape whose K is a multiple of the blocksize and on one whose blocks straddle rows;
    blocks are scaled far apart so a wrong absmax index cannot hide."""
    decode = _decode_kernel()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(blocksize)
    for N, K in [(5, max(blocksize, 64)), (7, 100)]:
        W = torch.randn(N, K, generator=g)
        W = (W.reshape(-1) * torch.logspace(-2, 2, N * K)).reshape(N, K).to(dev)
        w = params4bit(W, quant_type, nested, blocksize)
        want32 = dequantized(w)
        base = bases.base_of(w)
        for dtype in DECODE_DTYPES:
            got = decode(**base.kernel_args(), shape=(N, K), dtype=dtype)
            want = want32.to(dtype)
            # one rounding of the same fp32 products; the nested absmax may take an FMA on a GPU
            rtol = 0.0 if dev == "cpu" else torch.finfo(dtype).eps
            torch.testing.assert_close(got, want, rtol=rtol, atol=0.0, msg=f"{N}x{K} {dtype}")


def test_dora_on_a_4bit_base_matches_peft():
    """The adapter axis over the base axis: DoRA (use_dora=True) on a Linear4bit against
    PEFT's DoRA on the same 4-bit base: outputs and gradients of A, B and the magnitude, and
    the merged dense layer."""
    peft = pytest.importorskip("peft")
    lin = linear4bit(128, 40, "nf4", True, 64)
    holder = nn.Sequential()
    holder.proj = copy.deepcopy(lin)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                     use_dora=True, init_lora_weights=False))
    theirs = pm.base_model.model.proj
    ours = fastlora.FastLoRALinear.from_linear(lin, r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.reset_magnitude()
    torch.testing.assert_close(ours.lora_magnitude_vector,
                               theirs.lora_magnitude_vector["default"].weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(6, 128)
    yp, yo = pm(x), ours(x)
    torch.testing.assert_close(yo, yp, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    for mine, peft_p in ((ours.lora_A, theirs.lora_A["default"].weight),
                         (ours.lora_B, theirs.lora_B["default"].weight),
                         (ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, peft_p.grad, atol=1e-4, rtol=1e-3)
    # merge_lora: a dense layer holding (m / ||W + s B A||) (W + s B A), as PEFT merges
    model = nn.Sequential()
    model.proj = ours
    model.fastlora_config = None
    merged = fastlora.merge_lora(model).proj
    assert type(merged) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x), yp.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("quant_type, nested", QUANT, ids=QUANT_IDS)
def test_gemm_tile_loader_matches_bitsandbytes(quant_type, nested, blocksize):
    """The GEMMs' tile loader (``load_4bit_tile``: packed bytes per row, one absmax per row
    and block) at the launch tile width BLOCK_K = 64: blocksize 32 takes its several-scales-
    per-row branch, 64 and up the one-scale branch; edge tiles masked (N, K not multiples
    of the tile)."""
    _decode_kernel()
    import triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, K = 19, max(blocksize, 64) * 3 if blocksize < 4096 else 4096
    g = torch.Generator().manual_seed(blocksize)
    W = (torch.randn(N, K, generator=g).reshape(-1) * torch.logspace(-2, 2, N * K)).reshape(N, K)
    w = params4bit(W.to(dev), quant_type, nested, blocksize)
    args = bases.base_of(w).kernel_args()
    out = torch.full((N, K), float("nan"), device=dev)
    BN, BK = 16, 64
    _tiles_kernel()[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        args["packed"], args["absmax"], args["code2"], args["absmax2"], args["offset"], out, N, K,
        BASE=args["BASE"], BN=BN, BK=BK, BS=blocksize, NBS=args["nested_blocksize"])
    rtol = 0.0 if dev == "cpu" else torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, dequantized(w), rtol=rtol, atol=0.0)


def test_fused_kernels_run_the_4bit_base(device):
    """The fused launchers themselves with a 4-bit base (no dispatcher in between): y, dx,
    dA, dB against the float64 reference on bitsandbytes' decode of W; and the strategy
    cache keys the base kind (a dense and a 4-bit layer of one shape are timed apart)."""
    _decode_kernel()
    from fastlora.triton_backend import _kernels, strategy_for

    lin = linear4bit(128, 48, "fp4", True, 64, device=device)
    args = bases.base_of(lin.weight).kernel_args()
    x, A, B, dy = (t.float() for t in _inputs(lin, 21, 5, torch.float32))
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    y, u = _kernels.lora_forward(x, lin.weight, lin.bias, A, B, 0.5, 0.0, seed, base4=args)
    dx, dA, dB = _kernels.lora_backward(dy, x, lin.weight, A, B, u, 0.5, 0.0, seed, base4=args)
    W64 = dequantized(lin.weight).double()
    truth = _grads(lambda x, A, B: lora_linear_reference(x, W64, lin.bias.double(), A, B, 0.5),
                   x.double(), A.double(), B.double(), dy.double())
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), truth):
        assert max_err(got, want) <= 1e-4 * max(1.0, want.abs().max().item()), name
    if device.type == "cpu":  # the interpreter's answer; on CUDA the pick is a measurement
        assert strategy_for(64, 128, 48, 5, torch.float32, 0.0, "cpu", base=args["BASE"]) == "fused"
