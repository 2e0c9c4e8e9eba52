"""The multi-adapter (SGMV) Triton kernels and their autograd wiring against an independent
float64 computation: per-adapter row-masked matmuls written here, not the kernels.

Without a GPU these run the real @triton.jit code under TRITON_INTERPRET=1 (conftest sets
it); shapes are small and odd (edges of every tile; the interpreter's row tiles are 16, so
the batches hold tiles that straddle adapters).  bf16 is GPU-only (tl.dot on bf16 is wrong
in Triton 3.9's interpreter).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import ATOL, assert_matches_reference, make_inputs, max_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import philox  # noqa: E402

from fastlora import multi_triton, triton_backend  # noqa: E402
from fastlora.kernels import lora_sgmv  # noqa: E402

kernels = triton_backend._kernels
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu, id="bfloat16")]
NAMES = ("y", "dx", "dA", "dB")


def dtype_id(d):
    return str(d).removeprefix("torch.")


def adapters(ranks, K, N, dtype, seed=10):
    """lora_As[i]: [r_i, K], lora_Bs[i]: [N, r_i] (B non-zero), scalings (distinct)."""
    As, Bs = [], []
    for i, r in enumerate(ranks):
        _, _, _, A, B = make_inputs(1, K, N, r, dtype, DEVICE, seed=seed + i)
        As.append(A)
        Bs.append(B)
    return As, Bs, [0.5 + 0.75 * i for i in range(len(ranks))]


def runs(sizes, labels):
    """row_index of contiguous runs (samples): sizes[j] rows of adapter labels[j]."""
    return torch.cat([torch.full((s,), a, dtype=torch.int64) for s, a in zip(sizes, labels)])


def reference(x, W, b, As, Bs, scalings, idx, dy, masks=None, ps=None):
    """(y, dx, dAs, dBs) in the inputs' dtype: y = x W^T + b + sum_i [idx == i] s_i
    (D_i(x) A_i^T) B_i^T, gradients by torch.autograd; masks[i]: adapter i's keep mask."""
    x = x.detach().requires_grad_()
    As = [A.detach().to(x.dtype).requires_grad_() for A in As]
    Bs = [B.detach().to(x.dtype).requires_grad_() for B in Bs]
    y = x @ W.t() + (b if b is not None else 0)
    for i, (A, B) in enumerate(zip(As, Bs)):
        rows = (idx == i).to(x.dtype)[:, None]
        xd = x if masks is None else x * masks[i].to(x.dtype) / (1.0 - ps[i])
        y = y + rows * (scalings[i] * ((xd @ A.t()) @ B.t()))
    grads = torch.autograd.grad(y, [x, *As, *Bs], dy)
    n = len(As)
    return y.detach(), grads[0], list(grads[1:1 + n]), list(grads[1 + n:])


def check(dtype, got, inputs, masks=None, ps=None):
    """got = (y, dx, dAs, dBs); each within twice plain torch's error in ``dtype`` of the
    float64 reference, plus ATOL (helpers.assert_matches_reference)."""
    ref = reference(*[_cast(t, torch.float64) for t in inputs], masks, ps)
    same = reference(*[_cast(t, dtype) for t in inputs], masks, ps)
    for name, g, r64, rt in zip(NAMES, got, ref, same):
        if isinstance(g, (list, tuple)):
            for i, (gi, ri, rti) in enumerate(zip(g, r64, rt)):
                assert_matches_reference(gi, ri, rti, dtype, what=f"{name}[{i}]")
        else:
            assert_matches_reference(g, r64, rt, dtype, what=name)


def _cast(t, dtype):
    if isinstance(t, (list, tuple)):
        return [_cast(v, dtype) for v in t]
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.to(dtype)
    return t


def run_apply(x, W, b, As, Bs, scalings, ps, idx, dy):
    """y and every gradient through multi_triton.apply (the autograd wiring)."""
    x = x.detach().requires_grad_()
    As = [A.detach().requires_grad_() for A in As]
    Bs = [B.detach().requires_grad_() for B in Bs]
    y = multi_triton.apply(x, W, b, tuple(As), tuple(Bs), tuple(scalings), tuple(ps), idx)
    grads = torch.autograd.grad(y, [x, *As, *Bs], dy)
    n = len(As)
    return y.detach(), grads[0], list(grads[1:1 + n]), list(grads[1 + n:])


# (M, K, N, ranks, row_index): unsorted indices with base rows; sample runs whose
# boundaries fall inside 16-row tiles; nine adapters of ranks 1..33 (two rank blocks)
CASES = {
    "unsorted-base-rows": (37, 40, 24, (3, 16, 5), None),
    "sample-runs": (45, 24, 40, (4, 4, 4), runs((13, 7, 1, 24), (2, 0, -1, 1))),
    "many-adapters": (50, 24, 20, (1, 2, 7, 16, 17, 33, 3, 8, 5), None),
}


def case_inputs(case, dtype, bias=True):
    M, K, N, ranks, idx = CASES[case]
    x, W, b, _, _ = make_inputs(M, K, N, 1, dtype, DEVICE, bias=bias)
    As, Bs, scalings = adapters(ranks, K, N, dtype)
    if idx is None:
        idx = torch.randint(-1, len(ranks), (M,), generator=torch.Generator().manual_seed(3))
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=1)[0]
    return x, W, b, As, Bs, scalings, idx.to(DEVICE), dy


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_reference(case, dtype, bias):
    x, W, b, As, Bs, s, idx, dy = case_inputs(case, dtype, bias)
    got = run_apply(x, W, b, As, Bs, s, [0.0] * len(As), idx, dy)
    assert got[0].dtype == got[1].dtype == dtype
    check(dtype, got, (x, W, b, As, Bs, s, idx, dy))


def test_adapter_grads_in_their_own_dtype():
    """PEFT keeps adapters in fp32 on a half model: compute in x's dtype, each adapter's
    gradient in its own dtype (here one fp32 and one fp16 adapter, different ranks)."""
    x, W, b, As, Bs, s, idx, dy = case_inputs("unsorted-base-rows", torch.float16)
    As, Bs = As[:2], Bs[:2]
    As[0], Bs[0] = As[0].float(), Bs[0].float()
    idx = idx.clamp(max=1)
    y, dx, dAs, dBs = run_apply(x, W, b, As, Bs, s[:2], [0.0, 0.0], idx, dy)
    assert [g.dtype for g in (*dAs, *dBs)] == [torch.float32, torch.float16] * 2
    check(torch.float16, (y, dx, dAs, dBs), (x, W, b, As, Bs, s[:2], idx, dy))


def keep_masks(seed: int, M: int, K: int, ps) -> list[torch.Tensor]:
    """Adapter i's keep mask from the test's own Philox (tests/philox.py): key seed + i."""
    return [torch.from_numpy(philox.keep_mask(seed + i, M, K, p)).to(DEVICE)
            for i, p in enumerate(ps)]


def extract_masks(seed: int, M: int, K: int, ps) -> list[torch.Tensor]:
    """The keep masks the shrink kernel draws: every row through adapter i, with A_i = I,
    x = 1, s = 1, so u = m_i / (1-p_i) exactly."""
    n = len(ps)
    A = torch.eye(K, device=DEVICE).expand(n, K, K)
    table = torch.tensor([[1.0, p] for p in ps], device=DEVICE)
    ones = torch.ones(M, K, device=DEVICE)
    seed_t = torch.tensor([seed], device=DEVICE)
    out = []
    for i in range(n):
        idx = torch.full((M,), i, dtype=torch.int64, device=DEVICE)
        sidx, order = lora_sgmv.segments(idx)
        u = lora_sgmv.shrink(ones, sidx, order, A, table, seed_t, True)
        out.append(u[torch.argsort(order)] != 0)
    return out


def test_dropout_masks_are_each_adapters_own_philox_stream():
    """The mask read back from the kernel is Philox(seed + i; row, col) for adapter i, its
    keep rate is 1 - p_i within 5 sigma, and adapters' masks differ on the same rows."""
    M, K, ps, seed = 64, 64, (0.1, 0.5, 0.3), 4321
    got = extract_masks(seed, M, K, ps)
    want = keep_masks(seed, M, K, ps)
    for i, (g, w, p) in enumerate(zip(got, want, ps)):
        assert torch.equal(g, w), f"adapter {i}: kernel mask is not Philox(seed + {i})"
        rate, sigma = g.float().mean().item(), math.sqrt(p * (1 - p) / g.numel())
        assert abs(rate - (1 - p)) < 5 * sigma, f"adapter {i}: keep rate {rate:.3f}, p={p}"
    assert not torch.equal(got[0], got[2])


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=dtype_id)
def test_launchers_dropout_match_reference(dtype):
    """Forward and all gradients with dropout on two of three adapters (and off on one),
    against the reference run with the masks the kernels draw."""
    x, W, b, As, Bs, s, idx, dy = case_inputs("unsorted-base-rows", dtype)
    M, K = x.shape
    ps, seed = (0.25, 0.0, 0.5), 77
    A, B = kernels.stack_adapters(As, Bs)
    table = torch.tensor([[si, p] for si, p in zip(s, ps)], device=DEVICE)
    seed_t = torch.tensor([seed], device=DEVICE)
    y, u, sidx, order = kernels.sgmv_forward(x, W, b, A, B, table, idx, seed_t, True)
    dx, dA, dB = kernels.sgmv_backward(dy, x, W, A, B, table, u, sidx, order, seed_t, True)
    ranks = [a.shape[0] for a in As]
    dAs = [dA[i, :r] for i, r in enumerate(ranks)]
    dBs = [dB[i, :, :r] for i, r in enumerate(ranks)]
    masks = extract_masks(seed, M, K, ps)
    check(dtype, (y, dx, dAs, dBs), (x, W, b, As, Bs, s, idx, dy), masks, ps)


def test_apply_dropout_uses_one_seed_from_torchs_generator():
    """Through autograd: the seed comes from torch's generator (manual_seed reproduces it)
    and forward and backward regenerate the same per-adapter masks."""
    x, W, b, As, Bs, s, idx, dy = case_inputs("sample-runs", torch.float32)
    ps = (0.2, 0.4, 0.0)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    torch.manual_seed(5)
    got = run_apply(x, W, b, As, Bs, s, ps, idx, dy)
    masks = keep_masks(seed, *x.shape, ps)
    check(torch.float32, got, (x, W, b, As, Bs, s, idx, dy), masks, ps)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_single_adapter_equals_single_adapter_kernels(p):
    """One adapter on every row: the same result as fastlora's single-adapter kernels with
    the same seed (same mask), to fp32 rounding."""
    M, K, N, r = 37, 40, 24, 5
    x, W, b, A, B = make_inputs(M, K, N, r, torch.float32, DEVICE)
    dy = make_inputs(M, N, 1, 1, torch.float32, DEVICE, seed=1)[0]
    seed = torch.tensor([99], device=DEVICE)
    table = torch.tensor([[1.5, p]], device=DEVICE)
    idx = torch.zeros(M, dtype=torch.int64, device=DEVICE)
    As, Bs = kernels.stack_adapters([A], [B])
    y, u, sidx, order = kernels.sgmv_forward(x, W, b, As, Bs, table, idx, seed, p > 0)
    dx, dA, dB = kernels.sgmv_backward(dy, x, W, As, Bs, table, u, sidx, order, seed, p > 0)
    y1, u1 = kernels.lora_forward(x, W, b, A, B, 1.5, p, seed)
    want = (y1, *kernels.lora_backward(dy, x, W, A, B, u1, 1.5, p, seed))
    for name, g, w in zip(NAMES, (y, dx, dA[0], dB[0]), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_base_rows_are_the_base_and_give_no_gradient():
    """Rows of index -1 get exactly addmm's output and dx = dy W; with every row -1 the
    adapters' gradients are exactly zero, and an adapter without rows gets zeros."""
    x, W, b, As, Bs, s, idx, dy = case_inputs("unsorted-base-rows", torch.float32)
    idx = idx.clone()
    idx[idx == 1] = 0  # adapter 1 has no rows
    y, dx, dAs, dBs = run_apply(x, W, b, As, Bs, s, [0.1] * 3, idx, dy)
    base = idx == -1
    assert torch.equal(y[base], torch.addmm(b, x, W.t())[base])
    assert torch.equal(dx[base], (dy @ W)[base])
    assert not dAs[1].any() and not dBs[1].any()
    every = torch.full_like(idx, -1)
    y, dx, dAs, dBs = run_apply(x, W, b, As, Bs, s, [0.1] * 3, every, dy)
    assert torch.equal(y, torch.addmm(b, x, W.t())) and torch.equal(dx, dy @ W)
    assert not any(g.any() for g in (*dAs, *dBs))


def test_caller_row_order_kept_whatever_the_index_order():
    """Permuting the rows (and their indices) permutes y and dx the same way."""
    x, W, b, As, Bs, s, idx, dy = case_inputs("many-adapters", torch.float32)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    y, dx, dAs, _ = run_apply(x, W, b, As, Bs, s, [0.0] * len(As), idx, dy)
    yp, dxp, dAps, _ = run_apply(x[perm], W, b, As, Bs, s, [0.0] * len(As), idx[perm], dy[perm])
    torch.testing.assert_close(yp, y[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dxp, dx[perm], rtol=1e-5, atol=1e-5)
    for g, gp in zip(dAs, dAps):
        torch.testing.assert_close(gp, g, rtol=1e-5, atol=1e-5)


def test_backward_is_bitwise_deterministic():
    x, W, b, As, Bs, s, idx, dy = case_inputs("sample-runs", torch.float16)
    torch.manual_seed(0)
    first = run_apply(x, W, b, As, Bs, s, [0.2] * 3, idx, dy)
    torch.manual_seed(0)
    second = run_apply(x, W, b, As, Bs, s, [0.2] * 3, idx, dy)
    for f, g in zip(first, second):
        for a, c in zip(f if isinstance(f, list) else [f], g if isinstance(g, list) else [g]):
            assert torch.equal(a, c)


def test_empty_batch():
    x, W, b, As, Bs, s, _, _ = case_inputs("sample-runs", torch.float32)
    x0 = x[:0].detach().requires_grad_()
    y = multi_triton.apply(x0, W, b, tuple(As), tuple(Bs), tuple(s), (0.0,) * 3,
                           torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, W.shape[0])


# --------------------------------------------------------------------------- torch.library


def test_opcheck_ops():
    x, W, b, As, Bs, s, idx, dy = case_inputs("sample-runs", torch.float32)
    A, B = kernels.stack_adapters(As, Bs)
    table = torch.tensor([[si, 0.2] for si in s], device=DEVICE)
    seed = torch.tensor([3], device=DEVICE)
    args = (x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_(), table, idx, seed,
            True)
    torch.library.opcheck(torch.ops.fastlora.sgmv_fwd.default, args)
    y, u, sidx, order = torch.ops.fastlora.sgmv_fwd(*[a.detach() if isinstance(a, torch.Tensor)
                                                      else a for a in args])
    for flags in [(True, True, True), (False, True, False), (False, False, True)]:
        torch.library.opcheck(torch.ops.fastlora.sgmv_bwd.default,
                              (dy, x.detach(), W, A.detach(), B.detach(), table, u, sidx, order,
                               seed, True, *flags))


def test_compile_fullgraph_one_frame_matches_eager():
    torch._dynamo.reset()
    x, W, b, As, Bs, s, idx, dy = case_inputs("sample-runs", torch.float32)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm

    def f(x, As, Bs):
        return multi_triton.apply(x, W, b, tuple(As), tuple(Bs), tuple(s), (0.0,) * 3, idx)

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    xg = x.detach().requires_grad_()
    Ag = [A.detach().requires_grad_() for A in As]
    y = compiled(xg, Ag, Bs)
    y.backward(dy)
    compiled(x.detach().requires_grad_(), Ag, Bs)
    assert len(frames) == 1
    want = run_apply(x, W, b, As, Bs, s, (0.0,) * 3, idx, dy)
    assert max_err(y, want[0]) < ATOL[torch.float32]
    assert max_err(xg.grad, want[1]) < ATOL[torch.float32]
    assert max_err(Ag[2].grad, want[2][2]) < ATOL[torch.float32]


# --------------------------------------------------------------------------- bad input


def _bad(**change):
    x, W, b, As, Bs, s, idx, _ = case_inputs("sample-runs", torch.float32)
    args = dict(x2d=x, weight=W, bias=b, lora_As=tuple(As), lora_Bs=tuple(Bs),
                scalings=tuple(s), dropout_ps=(0.0,) * 3, row_index=idx)
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    return args


@pytest.mark.parametrize("change, message", [
    (dict(x2d=lambda a: a["x2d"][0]), r"x2d: expected a 2-D tensor"),
    (dict(weight=lambda a: a["weight"][:, 1:]), r"weight: expected \[N, 24\]"),
    (dict(weight=lambda a: a["weight"].double()), r"weight: expected x2d's dtype"),
    (dict(bias=lambda a: a["bias"][1:]), r"bias: expected \[40\]"),
    (dict(lora_As=()), r"lora_As: expected at least one adapter"),
    (dict(lora_Bs=lambda a: a["lora_Bs"][:2]), r"lora_Bs: expected 3 entries"),
    (dict(scalings=(1.0,)), r"scalings: expected 3 entries"),
    (dict(lora_As=lambda a: (a["lora_As"][0][:, 1:], *a["lora_As"][1:])),
     r"lora_As\[0\]: expected \[r, 24\]"),
    (dict(lora_Bs=lambda a: (*a["lora_Bs"][:2], a["lora_Bs"][2][:, :2])),
     r"lora_Bs\[2\]: expected \[40, 4\]"),
    (dict(dropout_ps=(0.0, 1.0, 0.0)), r"dropout_ps\[1\]: expected 0 <= p < 1"),
    (dict(row_index=lambda a: a["row_index"][1:]), r"row_index: expected an integer tensor \[45\]"),
    (dict(row_index=lambda a: a["row_index"].float()), r"row_index: expected an integer tensor"),
    (dict(row_index=lambda a: a["row_index"] + 1), r"row_index: expected values in \[-1, 2\]"),
    (dict(row_index=lambda a: a["row_index"] - 1), r"got values in \[-2, 1\]"),
], ids=["x-1d", "weight-K", "weight-dtype", "bias", "no-adapters", "Bs-count", "scalings-count",
        "A-K", "B-shape", "p", "index-length", "index-float", "index-high", "index-low"])
def test_bad_input_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        multi_triton.apply(**_bad(**change))


def test_rank_above_limit_is_named():
    x, W, b, As, Bs, s, idx, _ = case_inputs("sample-runs", torch.float32)
    As = (torch.zeros(129, x.shape[1]), *As[1:])
    Bs = (torch.zeros(W.shape[0], 129), *Bs[1:])
    with pytest.raises(ValueError, match=r"lora_As\[0\]: rank must be in 1..128, got 129"):
        multi_triton.apply(x, W, b, As, Bs, tuple(s), (0.0,) * 3, idx)
