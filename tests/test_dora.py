"""DoRA (``use_dora=True``): the functional op and the layer against the float64 reference of
PEFT's formulas and against PEFT's DoRA layer itself (outputs and the gradients of x, A, B
and m, with and without dropout and bias, the dropout mask drawn by the test and fed to both
sides), the cheap norm, the ||W||^2 cache, merge/unmerge, saved bytes and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from benchmarks.memory import saved_bytes
from fastlora import dora, dora_torch
from fastlora.dropout import pack_mask
from fastlora.reference import dora_linear_reference
from helpers import ATOL, max_err

peft = pytest.importorskip("peft")

P = 0.25  # a multiple of 2**-16: the drawn rate and 1/(1-p) are exact on both sides


def draw_keep(M: int, K: int, p: float, seed: int = 1) -> torch.Tensor:
    """The test's own Bernoulli(1 - p) keep mask, bool [M, K]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(M, K, generator=g) >= p


@pytest.fixture
def feed_mask(monkeypatch):
    """Make fastlora's torch DoRA path use the test's mask instead of drawing one."""

    def feed(keep: torch.Tensor) -> None:
        M, K = keep.shape
        padded = torch.zeros(M, -(-K // 8) * 8, dtype=torch.bool)
        padded[:, :K] = keep

        def draw(rows, cols, p, device):
            assert (rows, cols) == (M, K), "the layer drew a mask of another shape"
            return pack_mask(padded).to(device)

        monkeypatch.setattr(dora_torch, "draw_packed_mask", draw)

    return feed


def make(M, K, N, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(M, K)
    W = rnd(N, K, scale=K**-0.5)
    b = rnd(N) if bias else None
    A = rnd(r, K, scale=K**-0.5)
    B = rnd(N, r, scale=r**-0.5)
    m = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, W, b, A, B, m


def grads_of(fn, x, A, B, m, dy):
    x, A, B, m = (t.detach().clone().requires_grad_() for t in (x, A, B, m))
    y = fn(x, A, B, m)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B, m), dy))


def run_fastlora(x, W, b, A, B, m, s, p):
    return grads_of(lambda x, A, B, m: fastlora.lora_linear(x, W, b, A, B, s, p, p > 0, m),
                    x, A, B, m, DY[0])


DY = [None]  # the upstream gradient of the running case (set by each test)

NAMES = ("y", "dx", "dA", "dB", "dm")


# --------------------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "p0.25"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M, K, N, r", [(37, 24, 40, 4), (16, 33, 17, 5), (5, 8, 8, 1)])
def test_matches_float64_reference(M, K, N, r, bias, p, dtype, feed_mask):
    s = 1.7
    x, W, b, A, B, m = make(M, K, N, r, torch.float64, bias)
    keep = draw_keep(M, K, p) if p else None
    dy = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def ref(dt):
        cast = [t if t is None else t.to(dt) for t in (x, W, b, A, B, m)]
        xx, WW, bb, AA, BB, mm = cast
        def fn(x_, A_, B_, m_):
            return dora_linear_reference(x_, WW, bb, A_, B_, m_, s, keep, p)

        return grads_of(fn, xx, AA, BB, mm, dy.to(dt))

    ref64, ref_same = ref(torch.float64), ref(dtype)
    if keep is not None:
        feed_mask(keep)
    DY[0] = dy.to(dtype)
    cast = [t if t is None else t.to(dtype) for t in (x, W, b, A, B, m)]
    ours = run_fastlora(*cast, s, p)
    for name, o, r64, rsame in zip(NAMES, ours, ref64, ref_same):
        assert o.dtype == dtype, name
        err = max_err(o, r64)
        bound = 2 * max_err(rsame, r64) + ATOL[dtype] * max(1.0, r64.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def test_outputs_survive_later_calls_on_the_reused_workspace(feed_mask):
    """The CPU path keeps its [M, K] and [N, K] temporaries in per-thread buffers reused by
    every call: later calls (the same shape, a smaller one, a larger one) must leave an
    earlier call's output and gradients as they were (none may be a view of a buffer)."""
    x, W, b, A, B, m = make(12, 16, 10, 3, torch.float32, True)
    DY[0] = torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    feed_mask(draw_keep(12, 16, P))
    first = run_fastlora(x, W, b, A, B, m, 0.5, P)
    kept = [t.clone() for t in first]
    for M, K, N, p in [(12, 16, 10, P), (8, 16, 10, 0.0), (40, 24, 30, P), (40, 24, 30, 0.0)]:
        x2, W2, b2, A2, B2, m2 = make(M, K, N, 3, torch.float32, True, seed=M + int(p > 0))
        DY[0] = torch.randn(M, N)
        if p:
            feed_mask(draw_keep(M, K, p, seed=7))
        run_fastlora(x2, W2, b2, A2, B2, m2, 0.5, p)
    for name, t, k in zip(NAMES, first, kept):
        assert torch.equal(t, k), name


def test_collapses_to_column_scale_at_p0():
    """p = 0: y = (m / norm) * (x W^T + s x A^T B^T) + b, with the norm formed in full."""
    x, W, b, A, B, m = make(9, 12, 10, 3, torch.float64, True)
    s = 0.5
    norm = torch.linalg.norm(W + s * B @ A, dim=1)
    expected = (m / norm) * (x @ W.t() + s * (x @ A.t()) @ B.t()) + b
    assert max_err(fastlora.lora_linear(x, W, b, A, B, s, magnitude=m), expected) < 1e-12


# --------------------------------------------------------------------------- PEFT's DoRA layer


class _FixedDropout(nn.Module):
    """PEFT's dropout slot driven by the test's mask."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def peft_pair(K, N, r, alpha, p, bias, dtype=torch.float64, rslora=False):
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.proj = nn.Linear(K, N, bias=bias, dtype=dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"],
                          use_dora=True, use_rslora=rslora, init_lora_weights=False)
    pm = peft.get_peft_model(holder, cfg)
    theirs = pm.base_model.model.proj
    ours = fastlora.FastLoRALinear.from_linear(nn.Linear(K, N, bias=bias, dtype=dtype), r=r,
                                               lora_alpha=alpha, lora_dropout=p,
                                               use_rslora=rslora, use_dora=True)
    with torch.no_grad():
        ours.weight.copy_(theirs.base_layer.weight)
        if bias:
            ours.bias.copy_(theirs.base_layer.bias)
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        # a trained-looking magnitude, not the init (which would make m / norm = 1 at B = 0)
        spread = torch.linspace(0.5, 1.5, N, dtype=dtype)
        theirs.lora_magnitude_vector["default"].weight.mul_(spread)
        ours.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    return pm, theirs, ours


def peft_params(layer):
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "p0.25"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("K, N, r, alpha, rslora", [(24, 40, 4, 8, False), (33, 17, 5, 16, True)])
def test_same_outputs_and_gradients_as_peft(K, N, r, alpha, rslora, bias, p, dtype, feed_mask):
    M = 13
    pm, theirs, ours = peft_pair(K, N, r, alpha, p, bias, dtype, rslora)
    assert ours.scaling == theirs.scaling["default"]
    pm.train()
    ours.train()
    x = torch.randn(M, K, dtype=dtype, generator=torch.Generator().manual_seed(5))
    if p:
        keep = draw_keep(M, K, p)
        theirs.lora_dropout["default"] = _FixedDropout(keep, p)
        feed_mask(keep)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = pm(xp), ours(xo)
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    pairs = [(yp, yo), (xp.grad, xo.grad)] + [
        (t.grad, o.grad) for t, o in zip(peft_params(theirs), (ours.lora_A, ours.lora_B,
                                                                ours.lora_magnitude_vector))]
    for name, (a, o) in zip(NAMES, pairs):
        scale = max(1.0, a.abs().max().item())
        assert max_err(a, o) <= tol * scale, f"{name}: {max_err(a, o):.3e}"


def test_magnitude_init_is_peft_s():
    pm, theirs, _ = peft_pair(20, 12, 4, 8, 0.0, True)
    layer = fastlora.FastLoRALinear.from_linear(theirs.base_layer, r=4, lora_alpha=8,
                                                init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_A.copy_(theirs.lora_A["default"].weight)
        layer.lora_B.copy_(theirs.lora_B["default"].weight)
        layer.reset_magnitude()
    expected = torch.linalg.norm(theirs.base_layer.weight + 2 * theirs.lora_B["default"].weight
                                 @ theirs.lora_A["default"].weight, dim=1)
    assert max_err(layer.lora_magnitude_vector, expected) < 1e-12
    # the default init (B = 0): m = ||W_n||, so the layer equals the base
    fresh = fastlora.FastLoRALinear(20, 12, r=4, use_dora=True, dtype=torch.float64)
    x = torch.randn(3, 20, dtype=torch.float64)
    assert max_err(fresh(x), nn.functional.linear(x, fresh.weight, fresh.bias)) < 1e-12


def test_same_in_eval_with_dropout_configured():
    pm, theirs, ours = peft_pair(20, 12, 4, 8, 0.3, True)
    pm.eval()
    ours.eval()
    x = torch.randn(5, 20, dtype=torch.float64)
    assert max_err(pm(x), ours(x)) < 1e-12


def test_merge_and_unmerge_like_peft():
    pm, theirs, ours = peft_pair(24, 16, 4, 8, 0.0, True)
    w0 = ours.weight.detach().clone()
    x = torch.randn(6, 24, dtype=torch.float64)
    before = ours(x)
    ours.merge()
    theirs.merge()
    assert max_err(ours.weight, theirs.base_layer.weight) < 1e-12
    assert max_err(ours(x), before) < 1e-12
    ours.unmerge()
    assert max_err(ours.weight, w0) < 1e-12
    assert max_err(ours(x), before) < 1e-12


# --------------------------------------------------------------------------- the norm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cheap_norm_matches_the_formed_weight(dtype):
    N, K, r, s = 40, 64, 6, 1.3
    _, W, _, A, B, _ = make(1, K, N, r, torch.float64, False)
    expected = torch.linalg.norm(W + s * B @ A, dim=1)
    got = dora.weight_norm(W.to(dtype), A.to(dtype), B.to(dtype), s)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # inputs rounded to dtype, then fp32 accumulation over K and r terms
    Wd, Ad, Bd = (t.to(dtype).double() for t in (W, A, B))
    exact_of_rounded = torch.linalg.norm(Wd + s * Bd @ Ad, dim=1)
    acc = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    assert max_err(got, exact_of_rounded) <= 4 * (K + r) * acc * expected.max().item()
    assert not got.requires_grad


def test_norm_clamps_at_zero_when_the_update_cancels_the_weight():
    """W = -s B A: norm^2 is a small difference of large terms; it must not go NaN."""
    N, K, r, s = 16, 32, 4, 2.0
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g) * 10
    W = -s * B @ A
    got = dora.weight_norm(W, A, B, s)
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert got.max() <= 1e-2 * torch.linalg.norm(W, dim=1).max()


def _check_layer_matches_reference(layer, x):
    ref = dora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude_vector, layer.scaling)
    assert max_err(layer(x), ref) < 1e-12


@pytest.mark.parametrize("change", ["copy_", "load_state_dict", "new_parameter", "data", "to"])
def test_weight_change_voids_the_norm_cache(change):
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(12, 10, r=3, use_dora=True, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12, dtype=torch.float64)
    _check_layer_matches_reference(layer, x)  # fills the cache
    new = torch.randn(10, 12, dtype=torch.float64)
    if change == "copy_":
        with torch.no_grad():
            layer.weight.copy_(new)
    elif change == "load_state_dict":
        state = layer.state_dict()
        state["weight"] = new
        layer.load_state_dict(state)
    elif change == "new_parameter":
        layer.weight = nn.Parameter(new, requires_grad=False)
    elif change == "data":
        layer.weight.data = new
    else:
        layer.to(torch.float32).to(torch.float64)
        with torch.no_grad():
            layer.weight.copy_(new)
    _check_layer_matches_reference(layer, x)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_saved_for_backward_is_below_peft_dora(p):
    """Saved beyond x and the parameters: u [M, r], the pre-scale output z [M, N], the norm [N]
    and (p > 0) the 1-bit mask. PEFT keeps two [M, N] results (and D(x) and its mask)."""
    M, K, N, r = 256, 128, 96, 8
    pm, theirs, ours = peft_pair(K, N, r, 16, p, True, torch.float32)
    pm.train()
    ours.train()
    x = torch.randn(M, K, requires_grad=True)
    mine = saved_bytes(ours, x)["extra"]
    expected = 4 * (M * r + M * N + N) + (M * -(-K // 8) if p else 0)
    assert mine == expected, (mine, expected)
    assert mine <= saved_bytes(pm, x)["extra"]
    # a frozen magnitude needs no z
    ours.lora_magnitude_vector.requires_grad_(False)
    assert saved_bytes(ours, x)["extra"] == expected - 4 * M * N


# --------------------------------------------------------------------------- torch.library


def test_opcheck():
    x, W, b, A, B, m = make(7, 12, 9, 3, torch.float32, True)
    norm = dora.weight_norm(W, A, B, 0.5)
    args = (x, W, b, A.requires_grad_(), B.requires_grad_(), m.requires_grad_(), norm, 0.5, 0.0,
            None)
    torch.library.opcheck(dora_torch.dora_fwd, args)
    y, u, z = dora_torch.dora_fwd(*args)
    dy = torch.randn_like(y)
    A, B, m = A.detach(), B.detach(), m.detach()
    torch.library.opcheck(dora_torch.dora_bwd, (dy, x, W, A, B, m, norm, u, z, None, 0.5, 0.0,
                                                True, True, True, True))


def test_compiles_in_one_graph():
    layer = fastlora.FastLoRALinear(16, 12, r=4, use_dora=True, lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    layer.eval()
    x = torch.randn(5, 16, requires_grad=True)
    y = compiled(x)
    assert max_err(y, layer(x)) < 1e-5
    y.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None


# --------------------------------------------------------------------------- bad input


def test_bad_magnitude():
    x, W, b, A, B, m = make(3, 8, 6, 2, torch.float32, True)
    cases = [
        (m[:5], ValueError, r"magnitude: expected shape \[out_features\]=\[6\], got \(5,\)"),
        (m.tolist(), TypeError, "magnitude: expected a torch.Tensor, got list"),
        (m.long(), TypeError, "magnitude: expected a floating-point tensor, got torch.int64"),
        (m.to("meta"), ValueError, "magnitude: expected device cpu"),
    ]
    for bad, err, msg in cases:
        with pytest.raises(err, match=msg):
            fastlora.lora_linear(x, W, b, A, B, 1.0, magnitude=bad)
    with pytest.raises(ValueError, match=r"weight_sq_norm: expected shape \[out_features\]=\[6\]"):
        fastlora.lora_linear(x, W, b, A, B, 1.0, magnitude=m, weight_sq_norm=m[:2])


def test_bad_use_dora():
    with pytest.raises(TypeError, match="use_dora: expected a bool, got 'yes'"):
        fastlora.FastLoRALinear(4, 4, use_dora="yes")
    with pytest.raises(RuntimeError, match="without use_dora=True"):
        fastlora.FastLoRALinear(4, 4).reset_magnitude()


@pytest.mark.parametrize("M", [0, 1, 255, 256, 257, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_dot_over_row_blocks(M, dtype):
    """dm's ``colsum(dy * S)``, accumulated in row blocks on the CPU, against a float64 sum:
    one block, several, and a short last block."""
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, 37, generator=g).to(dtype)
    b = torch.randn(M, 37, generator=g).to(dtype)
    got = dora_torch._column_dot(a, b, torch.float32)
    ref = (a.double() * b.double()).sum(0)
    assert got.dtype == torch.float32 and got.shape == (37,)
    assert max_err(got.double(), ref) <= 1e-5 * max(1.0, M**0.5)
