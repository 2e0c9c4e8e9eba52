"""The Triton dispatcher over an FP8 base, under TRITON_INTERPRET=1 (CPU tensors): every
forced pair of the FP8 candidates (the codes decoded in the main loops, W decoded once for
the dense kernels, the composition) through ``lora_linear`` and ``FastLoRALinear`` against
the float64 reference on the test's own decode of the weight, the dropout mask from the
test's own Philox; and "auto" on a stubbed clock, which times the FP8 candidates on a weight
quantized by ``fastlora.fp8`` and runs its pick."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_matches_reference, strategy, triton_runs_here

if not triton_runs_here():
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import philox  # noqa: E402

import fastlora  # noqa: E402
from fastlora import fp8  # noqa: E402
from fastlora import triton_backend as tb  # noqa: E402
from fastlora.functional import lora_linear  # noqa: E402
from fastlora.kernels import dequant_fp8  # noqa: E402
from fastlora.layer import FastLoRALinear  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402
from test_fp8 import decode64, fp8_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALING = 1.5
SEED = 5
PAIRS = [(f, b) for f in tb.FP8_CANDIDATES for b in tb.FP8_CANDIDATES]
# (M, K, N, r): K and N off the 128-blocks (K = 100 off 16 too), one or two scale blocks
SHAPES = [(37, 100, 72, 3), (19, 160, 136, 16)]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    tb.set_strategy(None)
    tb.clear_strategy_cache()
    with fastlora.use_backend("triton"):
        yield
    tb.set_strategy(None)
    tb.clear_strategy_cache()


@pytest.fixture
def decodes(monkeypatch):
    """The number of standalone Triton decodes of an FP8 weight (the decode-once path)."""
    count = [0]
    real = dequant_fp8.dequantize_fp8

    def decode(*a, **k):
        count[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(dequant_fp8, "dequantize_fp8", decode)
    return count


def _inputs(M, K, N, r, dtype, seed=0):
    weight = fp8_weight(N, K, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    b, A = torch.randn(N, generator=g), torch.randn(r, K, generator=g) * K**-0.5
    B = torch.randn(N, r, generator=g) * r**-0.5
    return weight.to(DEVICE), *(t.to(DEVICE, dtype) for t in (x, dy, b, A, B))


def _drawn_mask(M, K, p):
    """The keep mask for the seed the backend draws first after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())
    return torch.from_numpy(philox.keep_mask(seed, M, K, p)).to(DEVICE)


def _check(got, weight, x, dy, b, A, B, p, dtype):
    """(y, dx, dA, dB) against the float64 reference on the decoded weight, within twice
    the error of the same reference in ``dtype`` plus ATOL (tests/helpers.py)."""
    mask = _drawn_mask(x.shape[0], x.shape[1], p) if p else None
    W64 = decode64(weight.cpu(), weight.fp8_scale_inv.cpu()).to(DEVICE)

    def run(cast):
        leaves = [cast(t).requires_grad_() for t in (x, A, B)]
        y = lora_linear_reference(leaves[0], cast(W64), cast(b), leaves[1], leaves[2], SCALING,
                                  mask, p)  # fmt: skip
        return (y.detach(), *torch.autograd.grad(y, leaves, cast(dy)))

    ref64 = run(lambda t: t.detach().double())
    same = run(lambda t: t.detach().to(dtype))
    for name, ours, r64, rt in zip(("y", "dx", "dA", "dB"), got, ref64, same):
        assert ours.dtype == dtype, name
        assert_matches_reference(ours, r64, rt, dtype, name)


def _step(weight, x, dy, b, A, B, p):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(SEED)
    y = lora_linear(x, weight, b, A, B, SCALING, p, training=p > 0)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B), dy))


def _cases():
    """(shape, dtype): fp16 for the first shape, fp32 for the second in the fast selection;
    the rest of the product marked slow (bf16's tl.dot is wrong in the interpreter)."""
    for i, shape in enumerate(SHAPES):
        for j, dtype in enumerate((torch.float16, torch.float32)):
            marks = () if i == j else (pytest.mark.slow,)
            yield pytest.param(shape, dtype, marks=marks,
                               id="M{}-K{}-N{}-r{}-".format(*shape) + str(dtype)[6:])


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("shape, dtype", list(_cases()))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda c: "{}-{}".format(*c))
def test_every_forced_pair_matches_float64(pair, shape, dtype, p, decodes):
    M, K, N, r = shape
    weight, x, dy, b, A, B = _inputs(*shape, dtype, seed=K)
    with strategy(forward=pair[0], backward=pair[1]):
        assert tb.picks_for(M, K, N, r, dtype, p, DEVICE, base="e4m3") == pair
        got = _step(weight, x, dy, b, A, B, p)
    _check(got, weight, x, dy, b, A, B, p, dtype)
    # the decode-once candidate decodes W with the Triton kernel once per direction; the
    # loader in the main loop and the composition (torch's decode) never call it
    assert decodes[0] == sum(name == "decode_once" for name in pair)


def test_fastloralinear_over_fp8linear_trains_with_the_triton_backend(decodes):
    M, K, N, r, p = 23, 100, 40, 4, 0.25
    torch.manual_seed(0)
    dense = torch.nn.Linear(K, N).to(DEVICE)
    layer = FastLoRALinear.from_linear(fp8.Fp8Linear.from_linear(dense), r=r, lora_alpha=6,
                                       lora_dropout=p)  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_()
    weight, b = layer.weight, layer.bias
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(DEVICE)
    dy = torch.randn(M, N, generator=g).to(DEVICE)
    assert layer.scaling == SCALING
    with strategy(forward="fused", backward="decode_once"):
        xl = x.clone().requires_grad_()
        torch.manual_seed(SEED)
        y = layer.train()(xl)
        y.backward(dy)
    assert decodes[0] == 1  # the backward's
    _check((y.detach(), xl.grad, layer.lora_A.grad, layer.lora_B.grad), weight, x, dy, b, A, B,
           p, torch.float32)


def test_auto_times_the_fp8_candidates_and_runs_the_pick(monkeypatch, decodes):
    """A stubbed clock: the timing path runs every FP8 candidate once on a weight quantized
    by fastlora.fp8 (quantize + attach), and the times it reports decide the picks."""
    M, K, N, r, dtype, p = 37, 100, 72, 3, torch.float32, 0.25
    clock = iter([3.0, 1.0, 2.0,  # forward: fused, decode_once, composition
                  1.0, 2.0, 3.0])  # backward: fused, decode_once, composition
    timed = {}
    quantized = []
    real_quantize = fp8.quantize

    def quantize(w, *a, **k):
        quantized.append(tuple(w.shape))
        return real_quantize(w, *a, **k)

    def bench(run):
        run()  # every candidate really runs (interpreted) on the timing data
        return next(clock)

    def time_candidates(bucket, index):
        timed["bucket"] = bucket
        timed["times"] = real_time(bucket, index, device=DEVICE, bench=bench)
        return timed["times"]

    real_time = tb._time_candidates
    monkeypatch.setattr(tb, "BENCH_ROUNDS", 1)
    monkeypatch.setattr(tb, "_measurable", lambda device: True)
    monkeypatch.setattr(tb, "_time_candidates", time_candidates)
    monkeypatch.setattr(fp8, "quantize", quantize)
    weight, x, dy, b, A, B = _inputs(M, K, N, r, dtype, seed=3)
    assert tb.picks_for(M, K, N, r, dtype, p, DEVICE, base="e4m3") == ("decode_once", "fused")
    assert timed["bucket"][-1] == "e4m3" and quantized == [(N, K)]
    for direction in ("forward", "backward"):
        assert list(timed["times"][direction]) == list(tb.FP8_CANDIDATES)
    decodes[0] = 0
    got = _step(weight, x, dy, b, A, B, p)  # the measured pair, from the cache
    assert decodes[0] == 1  # the forward's decode once; the fused backward decodes in-loop
    _check(got, weight, x, dy, b, A, B, p, dtype)


def test_a_torch_compile_trace_takes_the_torch_path(monkeypatch):
    """Traced, an FP8 layer runs the torch path (the traced ops take tensors alone, not the
    scales attached to the codes): the Triton launchers are never called, and the compiled
    step gives the eager step's y and gradients."""
    M, K, N, r = 8, 64, 40, 4
    weight, x, dy, b, A, B = _inputs(M, K, N, r, torch.float32, seed=9)
    fused = []
    real = tb._fused
    monkeypatch.setattr(tb, "_fused", lambda *a: fused.append(1) or real(*a))
    eager = _step(weight, x, dy, b, A, B, 0.0)
    assert fused == [1]
    step = torch.compile(lambda x, A, B: lora_linear(x, weight, b, A, B, SCALING))
    xc, Ac, Bc = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = step(xc, Ac, Bc)
    got = (y.detach(), *torch.autograd.grad(y, (xc, Ac, Bc), dy))
    assert fused == [1]
    for name, a, e in zip(("y", "dx", "dA", "dB"), got, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)
