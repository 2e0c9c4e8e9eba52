"""The Triton kernels and the "triton" backend against the float64 reference.

Without a GPU these run the real @triton.jit code under TRITON_INTERPRET=1 (conftest sets
it); shapes are small and odd on purpose (edges of every tile).  bf16 is GPU-only: tl.dot
on bf16 operands is wrong under Triton 3.9's interpreter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import assert_matches_reference, make_inputs, max_err, reference_grads

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from fastlora import triton_backend  # noqa: E402
from fastlora.reference import lora_linear_reference  # noqa: E402

import triton.language as tl  # noqa: E402

from fastlora.kernels.lora_forward import dropout_keep  # noqa: E402
import philox  # noqa: E402

kernels = triton_backend._kernels


@triton.jit
def _draw_mask(seed_ptr, out_ptr, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    keep = dropout_keep(tl.load(seed_ptr), offs_m, k0, p, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float32, torch.float16]
BF16 = pytest.param(torch.bfloat16, marks=gpu, id="bfloat16")
SCALING = 2.0
# (M, K, N, r): M=1 and 37 are off every tile edge, K and N not multiples of 16 or 32,
# r below, at and above the MMA minimum of 16
SHAPES = [(1, 40, 72, 1), (37, 40, 72, 3), (37, 72, 40, 16), (19, 40, 24, 20)]


def shape_id(s):
    return "M{}-K{}-N{}-r{}".format(*s)


def dtype_id(d):
    return str(d).removeprefix("torch.")


def seed_tensor(value=1234):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def philox_mask(seed, M, K, p):
    """The keep mask for this seed from the test's own Philox (tests/philox.py)."""
    return torch.from_numpy(philox.keep_mask(int(seed.item()), M, K, p)).to(DEVICE)


def extract_mask(seed, M, K, p):
    """The keep mask the kernels draw for this seed: shrink ones with A = I, s = 1, so
    u = m / (1-p) exactly."""
    eye = torch.eye(K, dtype=torch.float32, device=DEVICE)
    ones = torch.ones(M, K, dtype=torch.float32, device=DEVICE)
    w = torch.zeros(1, K, device=DEVICE)
    _, u = kernels.lora_forward(ones, w, None, eye, torch.zeros(1, K, device=DEVICE), 1.0, p, seed)
    return u != 0


def check_all(dtype, got, x, weight, bias, A, B, dy, mask=None, p=0.0, scaling=SCALING):
    """got = (y, dx, dA, dB) from the kernels; compared with the float64 reference under
    the twice-torch's-error rule (torch run in x's dtype, adapters cast as the backends do)."""
    d64 = [t.double() if t is not None else None for t in (x, weight, bias, A, B, dy)]
    ref = reference_grads(*d64[:5], scaling, d64[5], mask, p)
    cast = [t.to(dtype) if t is not None else None for t in (x, weight, bias, A, B, dy)]
    same = reference_grads(*cast[:5], scaling, cast[5], mask, p)
    for name, g, r64, rt in zip(("y", "dx", "dA", "dB"), got, ref, same):
        if g is None:
            continue
        assert_matches_reference(g, r64, rt, dtype, what=name)


# --------------------------------------------------------------------------- launchers


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES + [BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_launchers_match_reference(shape, dtype, bias):
    M, K, N, r = shape
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, DEVICE, bias=bias)
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=1)[0]
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.0, seed_tensor())
    assert y.dtype == u.dtype == dtype and u.shape == (M, r)
    dx, dA, dB = kernels.lora_backward(dy, x, w, A, B, u, SCALING, 0.0, seed_tensor())
    check_all(dtype, (y, dx, dA, dB), x, w, b, A, B, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.25], ids=["p0.25"])
def test_launchers_dropout_one_mask(dtype, p):
    """Forward and all three gradients against the reference run with the mask the
    kernels draw for this seed: one mask, seen the same by every launch."""
    M, K, N, r = 37, 40, 24, 5
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, DEVICE)
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=1)[0]
    seed = seed_tensor(987)
    mask = philox_mask(seed, M, K, p)
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, p, seed)
    dx, dA, dB = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed)
    check_all(dtype, (y, dx, dA, dB), x, w, b, A, B, dy, mask=mask, p=p)


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=["dx", "dA", "dB", "dA+dB"],
)  # fmt: skip
def test_backward_skips_what_is_not_needed(need):
    M, K, N, r, p = 37, 40, 24, 3, 0.1
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    seed = seed_tensor()
    _, u = kernels.lora_forward(x, w, b, A, B, SCALING, p, seed)
    full = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed)
    part = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed, *need)
    for wanted, f, g in zip(need, full, part):
        assert (g is not None) == wanted
        if wanted:
            torch.testing.assert_close(g, f, rtol=0, atol=0)


def test_mixed_dtype_adapters_in_fp32():
    """PEFT keeps adapters in fp32: compute in x's dtype, dA/dB in the adapters' dtype."""
    M, K, N, r = 37, 40, 24, 4
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float16, DEVICE)
    A, B = A.float(), B.float()
    dy = make_inputs(M, N, 1, 1, torch.float16, DEVICE, seed=1)[0]
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.0, seed_tensor())
    dx, dA, dB = kernels.lora_backward(dy, x, w, A, B, u, SCALING, 0.0, seed_tensor())
    assert (y.dtype, dx.dtype, dA.dtype, dB.dtype) == (torch.float16,) * 2 + (torch.float32,) * 2
    check_all(torch.float16, (y, dx, dA, dB), x, w, b, A, B, dy)


def test_strided_inputs():
    """Non-contiguous x, W, A, B and dy go in through their strides, no copies."""
    M, K, N, r = 21, 40, 24, 3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    xs = torch.zeros(K, 2 * M, device=DEVICE).t()[::2]  # [M, K], strides (2, 2M)
    xs.copy_(x)
    ws = w.t().contiguous().t()
    As, Bs = A.t().contiguous().t(), B.t().contiguous().t()
    dys = dy.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (xs, ws, As, Bs, dys))
    y, u = kernels.lora_forward(xs, ws, b, As, Bs, SCALING, 0.0, seed_tensor())
    got = (y, *kernels.lora_backward(dys, xs, ws, As, Bs, u, SCALING, 0.0, seed_tensor()))
    y0, u0 = kernels.lora_forward(x, w, b, A, B, SCALING, 0.0, seed_tensor())
    want = (y0, *kernels.lora_backward(dy, x, w, A, B, u0, SCALING, 0.0, seed_tensor()))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_empty_batch_launches_nothing():
    x, w, b, A, B = make_inputs(0, 40, 24, 3, torch.float32, DEVICE)
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.1, seed_tensor())
    assert y.shape == (0, 24) and u.shape == (0, 3)
    dx, dA, dB = kernels.lora_backward(y, x, w, A, B, u, SCALING, 0.1, seed_tensor())
    assert dx.shape == (0, 40) and not dA.any() and not dB.any() and dA.shape == A.shape


def test_backward_is_bitwise_deterministic():
    M, K, N, r, p = 37, 40, 24, 3, 0.2
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float16, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float16, DEVICE, seed=1)[0]
    _, u = kernels.lora_forward(x, w, b, A, B, SCALING, p, seed_tensor())
    first = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed_tensor())
    second = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed_tensor())
    for f, s in zip(first, second):
        assert torch.equal(f, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_tma_persistent_build_matches_reference(dtype, p):
    """The sm_90 build (tensor descriptors, persistent programs walking several tiles,
    subtiled stores) run by the interpreter: forward and all gradients, with dropout.
    K, N multiples of 8 so every row stride is 16-byte aligned as TMA needs; M and the
    tile counts off every edge."""
    M, K, N, r = 53, 40, 72, 5
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, DEVICE)
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=1)[0]
    seed = seed_tensor(31)
    mask = philox_mask(seed, M, K, p) if p else None
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, p, seed, tma=True)
    grads = kernels.lora_backward(dy, x, w, A, B, u, SCALING, p, seed, tma=True)
    check_all(dtype, (y, *grads), x, w, b, A, B, dy, mask=mask, p=p)


@pytest.mark.parametrize("r", [1, 2, 7, 16, 31, 64, 100, 128])
def test_every_rank_block(r):
    """r = 1..128 covers every rank block (16, 32, 64, 128) and padding inside each."""
    M, K, N = 21, 24, 40
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.2, seed_tensor(5))
    grads = kernels.lora_backward(dy, x, w, A, B, u, SCALING, 0.2, seed_tensor(5))
    mask = philox_mask(seed_tensor(5), M, K, 0.2)
    check_all(torch.float32, (y, *grads), x, w, b, A, B, dy, mask=mask, p=0.2)


def test_tma_only_where_strides_allow():
    from fastlora.kernels.lora_forward import use_tma

    a = torch.zeros(8, 24, dtype=torch.float16, device=DEVICE)
    assert use_tma(90, a) and not use_tma(80, a)
    assert not use_tma(90, a.t())  # last stride not 1
    assert not use_tma(90, torch.zeros(8, 20, dtype=torch.float16, device=DEVICE))  # 40-byte rows
    assert not use_tma(90, a[:, 1:])  # base not 16-byte aligned


def test_sm90_takes_tma_where_strides_allow_and_falls_back_elsewhere(monkeypatch):
    """With an sm_90 device, aligned operands run the TMA build and a transposed x (row
    stride 2 elements: not 16-byte aligned) the pointer build; both match the reference."""
    import sys

    builds = []
    for name in ("fastlora.kernels.lora_forward", "fastlora.kernels.lora_backward"):
        mod = sys.modules[name]
        monkeypatch.setattr(mod, "current_device_info", lambda: (90, 4))
        real = mod.launch

        def spy(spec, *a, _real=real, **k):
            builds.append(spec.constexprs.get("USE_TMA"))
            _real(spec, *a, **k)

        monkeypatch.setattr(mod, "launch", spy)
    M, K, N, r = 21, 40, 24, 3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    xs = torch.zeros(K, 2 * M, device=DEVICE).t()[::2]  # [M, K], strides (2, 2M)
    xs.copy_(x)
    # x's strides, its base 4 bytes past a 16-byte boundary: the per-call plan is keyed on
    # alignment too, so this must not reuse the aligned x's TMA plan
    xo = torch.zeros(M * K + 4, device=DEVICE)[1 : 1 + M * K].view(M, K)
    xo.copy_(x)
    assert xo.stride() == x.stride() and xo.data_ptr() % 16
    for xin, want in ((x, True), (xs, False), (xo, False), (x, True)):
        builds.clear()
        y, u = kernels.lora_forward(xin, w, b, A, B, SCALING, 0.0, seed_tensor())
        grads = kernels.lora_backward(dy, xin, w, A, B, u, SCALING, 0.0, seed_tensor())
        assert builds[:4] == [want] * 4, builds  # shrink, forward, dy, dx
        check_all(torch.float32, (y, *grads), x, w, b, A, B, dy)


def test_backward_workspaces_are_reused_across_shapes():
    """g and the dA/dB partials come from per-stream buffers reused by the next call: a
    larger shape grows them, a smaller one reuses the larger buffer, and each backward is
    still exact (its partials are written before they are read, never accumulated onto
    stale ones)."""
    from fastlora.kernels import _workspace

    _workspace.clear()
    kept = []
    for M, K, N, r in ((37, 40, 24, 3), (53, 72, 40, 20), (19, 24, 40, 5), (37, 40, 24, 3)):
        x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
        dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
        mask = philox_mask(seed_tensor(9), M, K, 0.2)
        y, u = kernels.lora_forward(x, w, b, A, B, SCALING, 0.2, seed_tensor(9))
        grads = kernels.lora_backward(dy, x, w, A, B, u, SCALING, 0.2, seed_tensor(9))
        check_all(torch.float32, (y, *grads), x, w, b, A, B, dy, mask=mask, p=0.2)
        kept.append(_workspace.kept_bytes())
    assert kept[0] > 0 and kept[1] > kept[0]  # grown for the larger shape
    assert kept[3] == kept[2] == kept[1]  # then reused, not reallocated


def test_workspace_buffer_grows_and_is_kept_per_stream():
    from fastlora.kernels import _launch, _workspace

    _workspace.clear()
    a = _workspace.buffer("t", DEVICE, 7, torch.float32, 100)
    assert a.numel() == 100 and a.dtype == torch.float32
    assert _workspace.buffer("t", DEVICE, 7, torch.float32, 60) is a  # smaller: the same one
    b = _workspace.buffer("t", DEVICE, 7, torch.float32, 101)  # larger: replaced
    assert b is not a and b.numel() == 101
    assert _workspace.buffer("t", DEVICE, 8, torch.float32, 10) is not b  # another stream
    assert _workspace.buffer("t", DEVICE, 7, torch.float16, 10) is not b  # another dtype
    # a traced (or graph-captured) call gets private allocations, never a kept buffer
    fresh = _launch.transient(_launch.context(traceable=True), "t", DEVICE, torch.float32, 10)
    assert fresh is not b and fresh.numel() == 10
    _workspace.clear()
    assert _workspace.kept_bytes() == 0


def _count_launches(monkeypatch):
    """Count kernel launches; record every aten op run outside them (those would be extra
    GPU launches: a sum, a cast, a zeros)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    import sys

    fwd_mod = sys.modules["fastlora.kernels.lora_forward"]  # the package shadows the names
    bwd_mod = sys.modules["fastlora.kernels.lora_backward"]
    launches, ops = [], []
    real = fwd_mod.launch

    def counted(spec, *a, **k):
        launches.append(spec.fn.__name__)
        with _disable_current_modes():
            real(spec, *a, **k)

    monkeypatch.setattr(fwd_mod, "launch", counted)
    monkeypatch.setattr(bwd_mod, "launch", counted)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    return launches, ops, Record


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_launch_budget(monkeypatch, p):
    """Forward: 2 kernels (+ the seed draw with dropout); backward: at most 3 kernels, and
    nothing else that runs on the device (no sum, cast, zeros for u's gradient)."""
    launches, ops, Record = _count_launches(monkeypatch)
    x, w, b, A, B = make_inputs(37, 40, 24, 3, torch.float16, DEVICE)
    xg, Ag, Bg = x.requires_grad_(), A.float().requires_grad_(), B.float().requires_grad_()
    with Record():
        y = triton_backend.apply(xg, w, b, Ag, Bg, SCALING, p)
    assert len(launches) == 2, launches
    allowed = {"empty", "randint"} if p else {"empty"}
    assert set(ops) <= allowed and ops.count("randint") == (p > 0), ops
    launches.clear()
    ops.clear()
    dy = torch.randn_like(y)
    with Record():
        dx, dA, dB = torch.autograd.grad(y, (xg, Ag, Bg), dy)
    assert len(launches) == 3, launches
    assert set(ops) <= {"empty"}, ops
    assert dA.dtype == dB.dtype == torch.float32 and dx.dtype == torch.float16


def test_eager_backward_refuses_inputs_changed_in_place():
    """The eager path keeps only its own u and seed outside autograd's saved tensors: x and
    the adapters are saved, so changing one in place before backward is an error, not a
    silently wrong gradient."""
    x, w, b, A, B = make_inputs(37, 40, 24, 3, torch.float32, DEVICE)
    Ag, Bg = A.requires_grad_(), B.requires_grad_()
    y = triton_backend.apply(x, w, b, Ag, Bg, SCALING, 0.1)
    with torch.no_grad():
        Ag.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, (Ag, Bg), torch.ones_like(y))


def test_rank_outside_kernel_range_is_refused():
    with pytest.raises(ValueError, match="1 <= r <= 128"):
        kernels.pad_rank(129)
    assert [kernels.pad_rank(r) for r in (1, 16, 17, 33, 128)] == [16, 16, 32, 64, 128]


def test_fp32_uses_tf32_only_when_torch_does():
    from fastlora.kernels._launch import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------- dropout RNG


def draw_mask(seed, M, K, p, block=256):
    """[M, K] int8 keep mask drawn by dropout_keep in blocks x blocks tiles (M, K multiples)."""
    out = torch.empty(M, K, dtype=torch.int8, device=DEVICE)
    _draw_mask[(M // block, K // block)](seed, out, K, p, BLOCK_M=block, BLOCK_K=block)
    return out


def test_philox_mask_matches_independent_reference():
    """The mask the forward kernel applies (read back through the shrink) and the mask
    dropout_keep draws at another tiling both equal the test's own NumPy Philox4x32-10,
    element (row, col) <- Philox(seed; col // 4, row, 0, 0); the seed's high word is the key's."""
    for seed, p in [(987, 0.25), (2**31 - 2, 0.5), (2**40 + 3, 0.1)]:
        s = seed_tensor(seed)
        want = philox_mask(s, 37, 40, p)
        assert torch.equal(extract_mask(s, 37, 40, p), want)
        assert torch.equal(draw_mask(s, 64, 64, p, block=32).bool(), philox_mask(s, 64, 64, p))


# Triton's mask at interpreter-affordable sizes: n = 2**22 draws (about 1.5 s) resolve the keep
# rate to Z * sigma = 5 * sqrt(p (1-p) / n) = 1.1e-3 at p = 0.3. Philox's 31-bit uniform puts
# the rate itself within 2**-24 of p (float32 p), far below that.
Z = 5.0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    M = K = 2048
    mask = draw_mask(seed_tensor(5), M, K, p).bool()
    n = M * K
    kept = mask.double().mean().item()
    assert abs(kept - (1 - p)) <= Z * math.sqrt(p * (1 - p) / n), kept
    # neighbours: P(equal) = p^2 + (1-p)^2 for independent bits; the same Philox call serves
    # four adjacent columns, so pairs at distances 1..4 and across rows are all checked
    q = p * p + (1 - p) * (1 - p)
    for a, b in [(mask[:, :-d], mask[:, d:]) for d in (1, 2, 3, 4)] + [(mask[:-1], mask[1:])]:
        same = (a == b).double().mean().item()
        assert abs(same - q) <= Z * math.sqrt(q * (1 - q) / a.numel()), same
    other = draw_mask(seed_tensor(6), M, K, p).bool()
    same = (mask == other).double().mean().item()  # another seed: an independent mask
    assert abs(same - q) <= Z * math.sqrt(q * (1 - q) / n), same


def test_dropout_mask_does_not_depend_on_tiling():
    """Forward and backward kernels tile K differently on a GPU (BLOCK_K 32..256); the bit
    for (seed, row, col) must not change with the tile: draw one region with two widths."""
    M, K = 32, 64
    masks = []
    for bm, bk in [(16, 16), (32, 64)]:
        out = torch.empty(M, K, dtype=torch.int8, device=DEVICE)
        _draw_mask[(M // bm, K // bk)](seed_tensor(77), out, K, 0.5, BLOCK_M=bm, BLOCK_K=bk)
        masks.append(out)
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0].bool(), extract_mask(seed_tensor(77), M, K, 0.5))


def test_apply_dropout_reproducible_by_manual_seed():
    """apply draws the seed from torch's generator: manual_seed reproduces the mask, and
    forward and backward both use it (checked against the reference with that mask)."""
    M, K, N, r, p = 37, 40, 24, 3, 0.3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(11)
    y = triton_backend.apply(xg, w, b, Ag, Bg, SCALING, p)
    got = (y, *torch.autograd.grad(y, (xg, Ag, Bg), dy))
    torch.manual_seed(11)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64)
    check_all(torch.float32, got, x, w, b, A, B, dy, mask=philox_mask(seed, M, K, p), p=p)
    torch.manual_seed(11)
    assert torch.equal(triton_backend.apply(x, w, b, A, B, SCALING, p), y.detach())


def test_apply_dropout_directional_derivatives():
    """Under a fixed seed the layer is linear in x, A and B separately: finite differences
    along random directions match the kernels' gradients."""
    M, K, N, r, p = 19, 40, 24, 3, 0.25
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))

    def f(xx, AA, BB):
        torch.manual_seed(3)
        return triton_backend.apply(xx, w, b, AA, BB, SCALING, p)

    grads = torch.autograd.grad(f(xg, Ag, Bg), (xg, Ag, Bg), dy)
    gen = torch.Generator().manual_seed(2)
    for i, g in enumerate(grads):
        v = torch.randn(g.shape, generator=gen).to(DEVICE)
        plus = [x, A, B]
        minus = [x, A, B]
        plus[i] = plus[i] + v
        minus[i] = minus[i] - v
        fd = ((f(*plus) - f(*minus)) * dy).sum() / 2  # exact for a linear map
        assert abs(fd.item() - (g * v).sum().item()) <= 1e-3 * (1 + abs(fd.item()))


# --------------------------------------------------------------------------- the backend


@pytest.mark.parametrize("dtype", DTYPES + [BF16], ids=dtype_id)
def test_apply_autograd_matches_reference(dtype):
    M, K, N, r = 37, 40, 24, 20
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, DEVICE)
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=1)[0]
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    y = triton_backend.apply(xg, w, b, Ag, Bg, SCALING, 0.0)
    check_all(dtype, (y, *torch.autograd.grad(y, (xg, Ag, Bg), dy)), x, w, b, A, B, dy)


def test_apply_frozen_pieces_get_no_gradient_and_unfrozen_base_is_exact():
    M, K, N, r = 19, 40, 24, 3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    Ag = A.clone().requires_grad_()
    y = triton_backend.apply(x, w, b, Ag, B, SCALING, 0.0)  # only A trains
    (dA,) = torch.autograd.grad(y, (Ag,), dy)
    ref = reference_grads(x.double(), w.double(), b.double(), A.double(), B.double(), SCALING,
                          dy.double())  # fmt: skip
    assert max_err(dA, ref[2]) < 1e-4
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = triton_backend.apply(x, wg, bg, A, B, SCALING, 0.0)
    dW, db = torch.autograd.grad(y, (wg, bg), dy)
    torch.testing.assert_close(dW, dy.t() @ x)
    torch.testing.assert_close(db, dy.sum(0))


def test_apply_empty_batch():
    x, w, b, A, B = make_inputs(0, 40, 24, 3, torch.float32, DEVICE)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    y = triton_backend.apply(xg, w, b, Ag, Bg, SCALING, 0.1)
    assert y.shape == (0, 24)
    dx, dA, dB = torch.autograd.grad(y, (xg, Ag, Bg), torch.zeros_like(y))
    assert dx.shape == (0, 40) and not dA.any() and not dB.any()


def test_available_says_why():
    ok, reason = triton_backend.available(DEVICE)
    assert ok and reason == ""
    ok, reason = triton_backend.available(torch.device("meta"))
    assert not ok and "meta" in reason


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_opcheck(p):
    """All of opcheck's checks: with triton_op on a GPU; under the interpreter the ops are
    opaque custom_ops (the raw kernels cannot run on fake tensors), checked the same way."""
    M, K, N, r = 19, 40, 24, 3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    seed = seed_tensor()
    args = (x.requires_grad_(), w, b, A.requires_grad_(), B.requires_grad_(), SCALING, p, seed)
    torch.library.opcheck(triton_backend.lora_fwd_triton, args)
    y, u = triton_backend.lora_fwd_triton(*(a.detach() if torch.is_tensor(a) else a for a in args))
    for need in [(True, True, True), (False, True, False)]:
        bwd_args = (y, x.detach(), w, A.detach(), B.detach(), u, SCALING, p, seed, *need)
        torch.library.opcheck(triton_backend.lora_bwd_triton, bwd_args)


@pytest.mark.parametrize("dtype", [torch.float16], ids=dtype_id)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_fullgraph_one_frame(dtype):
    import torch._dynamo.testing

    triton_backend.set_strategy("fused")
    try:
        x, w, b, A, B = make_inputs(64, 256, 128, 16, dtype, DEVICE)
        A.requires_grad_()
        counter = torch._dynamo.testing.CompileCounter()
        fn = torch.compile(
            lambda xx: triton_backend.apply(xx, w, b, A, B, SCALING, 0.1),
            backend=counter, fullgraph=True,
        )  # fmt: skip
        fn(x).sum().backward()
        fn(x + 1).sum().backward()
        assert counter.frame_count == 1
    finally:
        triton_backend.set_strategy(None)


# --------------------------------------------------------------------------- strategy


@pytest.fixture
def strategy_env(monkeypatch):
    """Set FASTLORA_STRATEGY for a test: read again after ``set_strategy(None)``, and
    forgotten at the end (the variable restored and read again)."""

    def setenv(value):
        monkeypatch.setenv("FASTLORA_STRATEGY", value)
        triton_backend.set_strategy(None)

    yield setenv
    monkeypatch.undo()
    triton_backend.set_strategy(None)


def test_strategy_is_fused_under_the_interpreter_and_overridable(strategy_env, monkeypatch):
    args = (37, 40, 24, 3, torch.float32, 0.0, torch.device("cpu"))
    if DEVICE.type == "cpu":
        assert triton_backend.strategy_for(*args) == "fused"
    strategy_env("composition")
    assert triton_backend.strategy_for(*args) == "composition"
    previous = triton_backend.set_strategy("fused")
    try:
        assert triton_backend.strategy_for(*args) == "fused"
    finally:
        triton_backend.set_strategy(previous)
    assert triton_backend.strategy_for(*args) == "composition"  # back to the variable
    assert triton_backend.strategy_for(37, 40, 24, 129, torch.float32, 0.0, DEVICE) == (
        "composition"
    )
    # read once: a change of the variable counts from set_strategy(None) on
    monkeypatch.setenv("FASTLORA_STRATEGY", "fused")
    assert triton_backend.strategy_for(*args) == "composition"
    strategy_env("fastest")
    for _ in range(2):  # a bad value is never remembered: every call raises
        with pytest.raises(ValueError, match="FASTLORA_STRATEGY: expected one of 'fused'"):
            triton_backend.strategy_for(*args)
    with pytest.raises(ValueError, match=r"set_strategy\(strategy\): expected one of"):
        triton_backend.set_strategy("fast")


def test_apply_composition_pick_calls_the_torch_backend(strategy_env, monkeypatch):
    pytest.importorskip("fastlora.torch_backend")
    strategy_env("composition")
    calls = []
    from fastlora import torch_backend

    real = torch_backend.apply
    monkeypatch.setattr(torch_backend, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, b, A, B = make_inputs(19, 40, 24, 3, torch.float32, DEVICE)
    y = triton_backend.apply(x, w, b, A, B, SCALING, 0.0)
    assert calls == [1]
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), SCALING)
    assert max_err(y, ref) < 1e-4
    # x [..., K] is flattened for the composition and y returned as [..., N]
    y3 = triton_backend.apply(x.view(1, 19, 40), w, b, A, B, SCALING, 0.0)
    assert y3.shape == (1, 19, 24) and torch.equal(y3.view(19, 24), y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strategy_measures_once_per_bucket_and_logs(caplog):
    triton_backend.clear_strategy_cache()
    with caplog.at_level("DEBUG", logger="fastlora"):
        first = triton_backend.strategy_for(100, 512, 256, 16, torch.float16, 0.0, DEVICE)
        again = triton_backend.strategy_for(120, 512, 256, 16, torch.float16, 0.0, DEVICE)
    assert first == again and first in ("fused", "composition")
    assert sum("fastlora strategy" in r.getMessage() for r in caplog.records) == 1
