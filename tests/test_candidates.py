"""Every kernel candidate the dispatcher may time (``FORWARD_CANDIDATES``,
``BACKWARD_CANDIDATES`` of ``fastlora.kernels.api``) against the float64 reference, under
TRITON_INTERPRET=1 without a GPU (fp32, fp16; bf16 on a GPU only).  The dropout mask of
the yardstick is the test's own Philox (tests/philox.py), so a candidate that drew another
mask fails; every forward is paired with every backward from the same seed.  Also: DoRA's
one-launch norm, and launches counted per candidate, per DoRA step and per 4-bit step."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import ATOL, max_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import fastlora  # noqa: E402
from fastlora import bases  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402
from test_kernels import BF16, DEVICE, DTYPES, dtype_id, philox_mask, seed_tensor  # noqa: E402

from fastlora.kernels import api  # noqa: E402
from fastlora.kernels import backward_candidates as bc  # noqa: E402

SCALING = 2.0
# (M, K, N, r): off every tile edge, r below and at the MMA minimum, the split dy pass
# with several column splits (N spans 3 interpreter tiles) and with one
SHAPES = [(37, 40, 72, 3), (19, 72, 40, 16), (1, 40, 24, 1)]
FWD = sorted(api.FORWARD_CANDIDATES)
BWD = sorted(api.BACKWARD_CANDIDATES)
# the hybrids, whose skinny GEMMs are cuBLAS's (torch ops): their launches as they run, at
# p = 0 and p > 0 (same-dtype adapters), on a dense base and with a 4-bit base's decode
HYBRID_LAUNCHES = {
    ("forward", "cublas_shrink"): (
        ["torch:aten::addmm_", "_lora_forward_kernel"],
        ["_dropout_kernel", "torch:aten::addmm_", "_lora_forward_kernel"]),
    ("backward", "dx_gemm_cublas"): (
        ["torch:aten::mm", "torch:aten::addmm_", "_lora_dx_gemm_kernel", "torch:aten::mm"],
        ["torch:aten::mm", "torch:aten::addmm_", "_lora_dx_gemm_kernel", "_lora_tail_kernel"]),
}
HYBRIDS = {name for _, name in HYBRID_LAUNCHES}


def inputs(M, K, N, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return (rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(N), rnd(r, K, scale=K**-0.5),
            rnd(N, r, scale=r**-0.5), rnd(M, N))


def reference(x, w, b, A, B, dy, mask, p):
    """(y, dx, dA, dB) of the unfused reference in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    y = lora_linear_reference(leaves[0], w, b, leaves[1], leaves[2], SCALING, mask, p)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def check(got, cast, mask, p, dtype, names=("y", "dx", "dA", "dB")):
    """Each result within twice the error of the reference run in ``dtype`` plus ATOL,
    both measured against the float64 reference on the same (rounded) inputs."""
    ref = reference(*(t if t is None else t.double() for t in cast), mask, p)
    same = reference(*cast, mask, p)
    for name, o, r64, rt in zip(names, got, ref, same):
        if o is None:
            continue
        assert o.shape == r64.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r64.shape)}"
        scale = max(1.0, r64.abs().max().item())
        err, bound = max_err(o, r64), 2 * max_err(rt, r64) + ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def setup(shape, dtype, p, seed=23):
    cast = [t.to(DEVICE, dtype) for t in inputs(*shape)]
    s = seed_tensor(seed)
    mask = philox_mask(s, shape[0], shape[1], p) if p else None
    return cast, s, mask


def _cases():
    """(shape, dtype) pairs: each shape in one interpreted dtype in the fast selection, the
    rest of the product marked slow; bf16 on a GPU."""
    fast = {(SHAPES[0], torch.float16), (SHAPES[1], torch.float32), (SHAPES[2], torch.float16)}
    for shape in SHAPES:
        for dtype in DTYPES:
            marks = () if (shape, dtype) in fast else (pytest.mark.slow,)
            yield pytest.param(shape, dtype, marks=marks,
                               id="M{}-K{}-N{}-r{}-".format(*shape) + dtype_id(dtype))
        yield pytest.param(shape, torch.bfloat16, marks=BF16.marks,
                           id="M{}-K{}-N{}-r{}-bfloat16".format(*shape))


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("shape, dtype", list(_cases()))
@pytest.mark.parametrize("name", BWD)
def test_backward_candidate_matches_reference(name, shape, dtype, p):
    (x, w, b, A, B, dy), s, mask = setup(shape, dtype, p)
    y, u = api.lora_forward(x, w, b, A, B, SCALING, p, s)
    grads = api.BACKWARD_CANDIDATES[name](dy, x, w, A, B, u, SCALING, p, s)
    assert [g.dtype for g in grads] == [dtype] * 3
    check((y, *grads), (x, w, b, A, B, dy), mask, p, dtype)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
@pytest.mark.parametrize("name", FWD)
def test_forward_candidate_matches_reference(name, shape, p):
    (x, w, b, A, B, dy), s, mask = setup(shape, torch.float32, p)
    y, u = api.FORWARD_CANDIDATES[name](x, w, b, A, B, SCALING, p, s)
    check((y,), (x, w, b, A, B, dy), mask, p, torch.float32, names=("y",))
    xd = x.double() if mask is None else x.double() * mask / (1 - p)
    assert max_err(u, SCALING * xd @ A.double().t()) <= 1e-5


@pytest.mark.parametrize("name", BWD)
def test_backward_candidate_with_fp32_adapters_and_tma_build(name):
    """PEFT's fp32 adapters on an fp16 base, through the sm_90 build (descriptors)."""
    (x, w, b, A, B, dy), s, mask = setup((53, 40, 72, 5), torch.float16, 0.3)
    A32, B32 = A.float(), B.float()
    y, u = api.lora_forward(x, w, b, A32, B32, SCALING, 0.3, s, tma=True)
    dx, dA, dB = api.BACKWARD_CANDIDATES[name](dy, x, w, A32, B32, u, SCALING, 0.3, s, tma=True)
    assert dA.dtype == dB.dtype == torch.float32 and dx.dtype == torch.float16
    check((y, dx, dA, dB), (x, w, b, A32.half(), B32.half(), dy), mask, 0.3, torch.float16)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True)],
                         ids=["dx", "dA", "dB", "dA+dB"])
@pytest.mark.parametrize("name", BWD)
def test_backward_candidate_makes_only_what_is_asked(name, need):
    (x, w, b, A, B, dy), s, _ = setup(SHAPES[0], torch.float32, 0.25)
    _, u = api.lora_forward(x, w, b, A, B, SCALING, 0.25, s)
    got = api.BACKWARD_CANDIDATES[name](dy, x, w, A, B, u, SCALING, 0.25, s, *need)
    assert [g is not None for g in got] == list(need)
    full = api.BACKWARD_CANDIDATES[name](dy, x, w, A, B, u, SCALING, 0.25, s)
    for g, f in zip(got, full):
        if g is not None:
            assert torch.equal(g, f)


def test_split_dy_pass_splits_and_is_bitwise_reproducible():
    """The test shape runs the 2-D dy pass with 3 column splits (the readers sum 3 g
    partials), and two runs give the same bits."""
    M, K, N, r = SHAPES[0]
    plan = bc._plan(M, N, K, r, "ieee", 4, True, True, True, True, False, 4, "split")
    assert plan[0].grid[:2] == (2, 3) and plan[3] == 3
    (x, w, b, A, B, dy), s, _ = setup(SHAPES[0], torch.float16, 0.25)
    _, u = api.lora_forward(x, w, b, A, B, SCALING, 0.25, s)
    one = bc.split_dy_backward(dy, x, w, A, B, u, SCALING, 0.25, s)
    two = bc.split_dy_backward(dy.clone(), x.clone(), w, A, B, u, SCALING, 0.25, s)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_split_count_fills_the_machine():
    # 8192 rows in 256-row blocks on 132 SMs: 32 row blocks need 4 splits for 2 a SM (capped)
    assert bc.split_count(8192, 4096, 256, 64, 132) == 4
    assert bc.split_count(131072, 4096, 256, 64, 132) == 1  # 512 row blocks
    assert bc.split_count(64, 64, 64, 64, 132) == 1  # one column tile


def test_gpu_plans_use_the_big_tiles_and_fill_the_machine():
    """The plans an H100 gets at 4096 x 4096, M = 8192, r = 16 (bf16, TMA build): p = 0 takes
    the 128 x 256 dx tile, p > 0 the 128 x 128 one; the split dy pass runs >= 2 programs a
    SM with 128-row blocks (half the row pass's dB partials)."""
    from fastlora.kernels import _configs

    _configs.pick.cache_clear()
    bc._plan.cache_clear()
    real = _configs.interpreting
    _configs.configs_for.__globals__["interpreting"] = lambda: False
    try:
        p0 = bc._plan(8192, 4096, 4096, 16, "ieee", 2, True, True, True, False, True, 132, "row")
        p1 = bc._plan(8192, 4096, 4096, 16, "ieee", 2, True, True, True, True, True, 132, "row")
        sp = bc._plan(8192, 4096, 4096, 16, "ieee", 2, True, True, True, True, True, 132,
                      "split")
    finally:
        _configs.configs_for.__globals__["interpreting"] = real
        _configs.pick.cache_clear()
        bc._plan.cache_clear()
    big = p0[1].constexprs
    assert (big["BLOCK_M"], big["BLOCK_K"], p0[1].num_warps) == (128, 256, 8)
    assert not big["HAS_DROPOUT"] and p0[1].grid[0] == 132  # persistent
    assert (p1[1].constexprs["BLOCK_M"], p1[1].constexprs["BLOCK_K"]) == (128, 128)
    rows, splits = sp[0].grid[:2]
    assert (rows, splits) == (64, 4) and sp[0].constexprs["BLOCK_M"] == 128 and sp[4] == rows


# --------------------------------------------------------------------------- pairs, 4-bit


def _base4(shape, dtype):
    from qlora_helpers import dequantized, params4bit

    M, K, N, r = shape
    x, w, b, A, B, dy = (t.to(DEVICE, dtype) for t in inputs(*shape))
    wq = params4bit(w.float(), "nf4", True, 64)
    dense = dequantized(wq).to(DEVICE, dtype)  # bitsandbytes' own decode: the yardstick
    return (x, wq, dense, b, A, B, dy), bases.base_of(wq).kernel_args()


@pytest.mark.parametrize("dtype", [torch.float32,
                                   pytest.param(torch.float16, marks=pytest.mark.slow)],
                         ids=dtype_id)
def test_every_forward_pairs_with_every_backward_on_a_4bit_base(dtype):
    """Each (forward, backward) pair, dropout on, one seed: both directions see the test's
    Philox mask (the reference with it matches), on bitsandbytes' NF4 base."""
    shape, p = (13, 64, 24, 4), 0.25
    (x, wq, dense, b, A, B, dy), base4 = _base4(shape, dtype)
    s = seed_tensor(5)
    mask = philox_mask(s, shape[0], shape[1], p)
    grads = {}
    for f in FWD:
        y, u = api.FORWARD_CANDIDATES[f](x, wq, b, A, B, SCALING, p, s, base4=base4)
        for name in BWD:
            got = api.BACKWARD_CANDIDATES[name](dy, x, wq, A, B, u, SCALING, p, s, base4=base4)
            check((y, *got), (x, dense, b, A, B, dy), mask, p, dtype)
            grads[f, name] = got
    # the forwards with the shrink kernel make the same u: so are the gradients (cuBLAS's u
    # rounds its own way: checked against the reference above)
    triton_fwd = [f for f in FWD if f not in HYBRIDS]
    for name in BWD:
        assert all(torch.equal(a, c) for a, c in zip(grads[triton_fwd[0], name],
                                                     grads[triton_fwd[1], name]))


def test_decode_once_reuses_one_workspace():
    (x, wq, dense, b, A, B, dy), base4 = _base4((9, 64, 24, 2), torch.float32)
    first = bc.decoded_weight(base4, (24, 64), torch.float32)
    assert torch.equal(first, dense)
    again = bc.decoded_weight(base4, (24, 64), torch.float32)
    assert again.data_ptr() == first.data_ptr()


# --------------------------------------------------------------------------- DoRA's norm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(72, 40, 3), (40, 300, 16), (19, 24, 20), (33, 16, 100)],
                         ids=lambda s: "N{}-K{}-r{}".format(*s))
def test_dora_norm_kernel_matches_float64(shape, dtype):
    N, K, r = shape
    _, w, _, A, B, _ = inputs(4, K, N, r)
    w, A, B = (t.to(DEVICE, dtype) for t in (w, A, B))
    got = api.dora_weight_norm(w, A, B, SCALING)
    ref = torch.linalg.norm(w.double() + SCALING * B.double() @ A.double(), dim=1)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert max_err(got, ref) <= 4e-6 * ref.max().item()


def test_dora_norm_kernel_tiles_stop_at_rank_64_on_a_gpu():
    from fastlora.kernels import _configs

    assert _configs.configs_for("dora_norm", "16bit", 64, interpreter=False)
    assert not _configs.configs_for("dora_norm", "16bit", 128, interpreter=False)


def test_dora_norm_has_no_cancellation():
    """W = -s B A: the norm is 0 (the cheap form's ||W||^2 - ... cancels to noise)."""
    _, _, _, A, B, _ = inputs(4, 48, 24, 4)
    A, B = A.float().to(DEVICE), B.float().to(DEVICE)
    w = -SCALING * B @ A
    assert api.dora_weight_norm(w, A, B, SCALING).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- launches


class _Launches:
    """Kernel launches while active: each Triton grid the interpreter runs, plus each torch
    op that would launch on a GPU (``benchmarks.host_overhead.LaunchCounter``)."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        from benchmarks.host_overhead import LaunchCounter, LaunchLog

        self.log = LaunchLog()
        self.counter = LaunchCounter(self.log)
        real = interpreter.GridExecutor.__call__
        log = self.log

        def call(executor, *args, **kwargs):
            from benchmarks.host_overhead import Launch

            log.launches.append(Launch(executor.fn.__name__))
            with torch.utils._python_dispatch._disable_current_modes():
                return real(executor, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)

    def __call__(self, fn):
        self.log.clear()
        with self.counter:
            out = fn()
        return out, [launch.name for launch in self.log.launches]


@pytest.mark.parametrize("name", [n for n in BWD if n not in HYBRIDS])
def test_backward_candidate_launches_at_most_three(name, monkeypatch):
    count = _Launches(monkeypatch)
    (x, w, b, A, B, dy), s, _ = setup(SHAPES[0], torch.float32, 0.25)
    _, u = api.lora_forward(x, w, b, A, B, SCALING, 0.25, s)
    _, names = count(lambda: api.BACKWARD_CANDIDATES[name](dy, x, w, A, B, u, SCALING, 0.25, s))
    assert len(names) <= 3, names
    assert all(n.startswith("_") for n in names), names  # kernels only: no torch op


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("direction, name", sorted(HYBRID_LAUNCHES))
def test_hybrid_launches(direction, name, p, monkeypatch):
    """A hybrid's launches: its cuBLAS GEMMs and the Triton kernels it keeps, no more (no
    scaled or cast copy of an adapter in the adapters' own dtype); a 4-bit base adds its
    decode before the dx GEMM, backward only (the forward GEMM decodes in its mainloop)."""
    count = _Launches(monkeypatch)
    (x, w, b, A, B, dy), s, _ = setup(SHAPES[0], torch.float32, p)
    _, u = api.lora_forward(x, w, b, A, B, SCALING, p, s)
    if direction == "forward":
        _, names = count(lambda: api.FORWARD_CANDIDATES[name](x, w, b, A, B, SCALING, p, s))
    else:
        _, names = count(lambda: api.BACKWARD_CANDIDATES[name](dy, x, w, A, B, u, SCALING, p,
                                                               s))
    assert names == HYBRID_LAUNCHES[direction, name][p > 0]
    (x, wq, _, b, A, B, dy), base4 = _base4((9, 64, 24, 2), torch.float32)
    _, u = api.lora_forward(x, wq, b, A, B, SCALING, p, s, base4=base4)
    if direction == "forward":
        _, names = count(lambda: api.FORWARD_CANDIDATES[name](x, wq, b, A, B, SCALING, p, s,
                                                              base4=base4))
        assert names == HYBRID_LAUNCHES[direction, name][p > 0]
    else:
        _, names = count(lambda: api.BACKWARD_CANDIDATES[name](dy, x, wq, A, B, u, SCALING, p,
                                                               s, base4=base4))
        want = list(HYBRID_LAUNCHES[direction, name][p > 0])
        want.insert(want.index("_lora_dx_gemm_kernel"), "_dequant_4bit_kernel")
        assert names == want


@pytest.mark.parametrize("name", [n for n in BWD if n not in HYBRIDS])
def test_4bit_launches_at_most_four(name, monkeypatch):
    count = _Launches(monkeypatch)
    (x, wq, _, b, A, B, dy), base4 = _base4((9, 64, 24, 2), torch.float32)
    s = seed_tensor(3)
    fwd = api.FORWARD_CANDIDATES["decode_once"]
    (_, u), names_f = count(lambda: fwd(x, wq, b, A, B, SCALING, 0.1, s, base4=base4))
    assert names_f == ["_dequant_4bit_kernel", "_lora_shrink_kernel", "_lora_forward_kernel"]
    _, names = count(lambda: api.BACKWARD_CANDIDATES[name](dy, x, wq, A, B, u, SCALING, 0.1, s,
                                                           base4=base4))
    assert len(names) <= 4, names


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_dora_layer_launches_at_most_four_each_way(p, monkeypatch):
    """A DoRA layer's training step on the triton backend: forward = the norm kernel, the
    seed draw (dropout only), shrink and GEMM; backward = dy, dx, reduce."""
    count = _Launches(monkeypatch)
    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(24, 40, r=4, lora_alpha=8, lora_dropout=p, use_dora=True)
    x = torch.randn(7, 24, requires_grad=True)
    with fastlora.use_backend("triton"):
        layer(x).sum().backward()  # first call: ||W||^2 cached for the torch path's users
        y, fwd = count(lambda: layer(x))
        dy = torch.ones_like(y)
        _, bwd = count(lambda: torch.autograd.grad(
            y, (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), dy))
    assert "_dora_norm_kernel" in fwd
    assert len(fwd) <= 4 and len(bwd) <= 4, (fwd, bwd)


@pytest.mark.parametrize("name", BWD)
def test_traceable_launch_path_gives_the_same_bits(name):
    """``traceable=True`` (inside a triton_op under torch.compile): planned per call, fresh
    buffers instead of the reused workspaces; the same kernels, so the same bits."""
    (x, w, b, A, B, dy), s, _ = setup(SHAPES[0], torch.float32, 0.25)
    _, u = api.lora_forward(x, w, b, A, B, SCALING, 0.25, s)
    fn = api.BACKWARD_CANDIDATES[name]
    eager = fn(dy, x, w, A, B, u, SCALING, 0.25, s)
    traced = fn(dy, x, w, A, B, u, SCALING, 0.25, s, traceable=True)
    assert all(torch.equal(a, c) for a, c in zip(eager, traced))


# --------------------------------------------------------------------------- warp_spec


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("adapters", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", [(37, 40, 72, 16), (19, 72, 40, 8)],
                         ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_warp_spec_build_matches_reference(shape, adapters, p, monkeypatch):
    """"warp_spec" through its own build (forced with ``tma=True``: x, W, u, B and y
    through descriptors, u B^T after the main loop), odd M, fp16 and PEFT's fp32
    adapters: the float64 reference with the test's mask."""
    from fastlora.kernels import lora_forward as lf

    (x, w, b, A, B, dy), s, mask = setup(shape, torch.float16, p)
    ran = []
    real = lf._forward
    monkeypatch.setattr(lf, "_forward", lambda *a, **k: ran.append(k.get("warp_spec"))
                        or real(*a, **k))  # fmt: skip
    y, u = api.FORWARD_CANDIDATES["warp_spec"](x, w, b, A.to(adapters), B.to(adapters),
                                               SCALING, p, s, tma=True)  # fmt: skip
    assert ran == [True]
    check((y,), (x, w, b, A, B, dy), mask, p, torch.float16, names=("y",))
    xd = x.double() if mask is None else x.double() * mask / (1 - p)
    assert max_err(u, SCALING * xd @ A.double().t()) <= 1e-2 * max(1.0, u.abs().max().item())


def test_warp_spec_runs_fused_where_its_build_cannot():
    """No descriptor-aligned rows (r = 3 in fp16: 6-byte rows of u and B), 32-bit
    operands, a 4-bit base, torch.compile's tracing, the pointer build, or a rank block
    without a warp-specialized tile: the plain fused forward."""
    from fastlora.kernels import lora_forward as lf

    (x, w, _, A, B, _), _, _ = setup((19, 72, 40, 8), torch.float16, 0.0)
    assert lf.warp_spec_ok(x, w, A, B, True, False, None)
    (x3, w3, _, A3, B3, _), _, _ = setup((19, 72, 40, 3), torch.float16, 0.0)
    assert not lf.warp_spec_ok(x3, w3, A3, B3, True, False, None)
    assert not lf.warp_spec_ok(x.float(), w.float(), A, B, True, False, None)
    assert not lf.warp_spec_ok(x, w, A, B, True, False, {"BASE": "nf4"})
    assert not lf.warp_spec_ok(x, w, A, B, True, True, None)
    assert not lf.warp_spec_ok(x, w, A, B, False, False, None)
    from fastlora.kernels import _configs

    # on a GPU rank blocks above 32 have no tile (the staged u and B tiles outgrow shared
    # memory with fp32 adapters): the GPU table, whatever the interpreter's
    assert _configs.configs_for("forward_ws", "16bit", 32, tma=True, interpreter=False)
    assert not _configs.configs_for("forward_ws", "16bit", 64, tma=True, interpreter=False)
    assert not _configs.configs_for("forward_ws", "16bit", 16, tma=False, interpreter=False)
