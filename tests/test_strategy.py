"""Per-direction dispatch of the Triton backend: forward and backward picked separately, the
same dropout bits whichever side regenerates them, the strategy's spellings, and how a
measured pick is made (timing mocked: no GPU here).

Kernels run under TRITON_INTERPRET=1 (conftest); the yardstick is the float64 reference
with the mask from the test's own Philox (tests/philox.py), never the backend's own output.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_matches_reference, make_inputs, max_err, reference_grads, strategy

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import philox  # noqa: E402

from fastlora import triton_backend as tb  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALING = 1.5
P = 0.3
SEED = 11
COMBOS = [("fused", "fused"), ("fused", "composition"), ("composition", "fused"),
          ("composition", "composition"),
          # the hybrids (cuBLAS skinny GEMMs around the fused GEMMs) against all-fused
          ("cublas_shrink", "fused"), ("fused", "dx_gemm_cublas"),
          ("cublas_shrink", "dx_gemm_cublas")]  # fmt: skip
# the same math from the same mask: the candidates differ only by fp32 rounding
AGREE_TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _fresh_strategy(monkeypatch):
    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    tb.set_strategy(None)
    tb.clear_strategy_cache()
    yield
    monkeypatch.undo()
    tb.set_strategy(None)
    tb.clear_strategy_cache()


def _step(x, w, b, A, B, dy, p, seed=SEED):
    """y and (dx, dA, dB) of one apply under the strategy in force, from torch seed ``seed``."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(seed)
    y = tb.apply(x, w, b, A, B, SCALING, p)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B), dy))


def _drawn_seed(seed=SEED) -> int:
    """The dropout seed the backend draws first after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 40, 72, 3), (19, 44, 24, 20)],
                         ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))  # fmt: skip
def test_every_direction_pairing_gives_the_reference_with_the_same_mask(shape, dtype):
    M, K, N, r = shape
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, DEVICE)
    dy = make_inputs(M, N, 1, 1, dtype, DEVICE, seed=3)[0]
    mask = torch.from_numpy(philox.keep_mask(_drawn_seed(), M, K, P)).to(DEVICE)
    d64 = [t.double() for t in (x, w, b, A, B, dy)]
    ref = reference_grads(*d64[:5], SCALING, d64[5], mask, P)
    same = reference_grads(x, w, b, A, B, SCALING, dy, mask, P)
    got = {}
    for fwd, bwd in COMBOS:
        with strategy(forward=fwd, backward=bwd):
            assert tb.picks_for(M, K, N, r, dtype, P, DEVICE) == (fwd, bwd)
            got[fwd, bwd] = _step(x, w, b, A, B, dy, P)
        for name, g, r64, rt in zip(("y", "dx", "dA", "dB"), got[fwd, bwd], ref, same):
            assert_matches_reference(g, r64, rt, dtype, what=f"{fwd}/{bwd} {name}")
    for combo in COMBOS[1:]:  # the same bits: every pairing agrees with all-fused closely
        for name, g, f in zip(("y", "dx", "dA", "dB"), got[combo], got[COMBOS[0]]):
            scale = f.double().abs().max().item() or 1.0
            assert max_err(g, f) <= AGREE_TOL[dtype] * scale, (combo, name)


def test_a_different_seed_gives_a_different_mask_in_every_pairing():
    # the regenerated mask follows the forward's seed, not a constant
    x, w, b, A, B = make_inputs(16, 32, 8, 4, torch.float32, DEVICE)
    dy = torch.ones(16, 8, device=DEVICE)
    for fwd, bwd in COMBOS:
        with strategy(forward=fwd, backward=bwd):
            one, two = _step(x, w, b, A, B, dy, P, seed=1), _step(x, w, b, A, B, dy, P, seed=2)
        assert max_err(one[2], two[2]) > 1e-3, (fwd, bwd)  # dA = g^T D(x)


def test_composition_forward_saves_the_seed_not_a_mask():
    x, w, b, A, B = make_inputs(8, 16, 8, 4, torch.float32, DEVICE)
    x.requires_grad_()
    with strategy(forward="composition", backward="fused"):
        y = tb.apply(x, w, b, A, B, SCALING, P)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert sum(t.dtype == torch.uint8 for t in saved) == 0  # no packed mask
    assert any(t.dtype == torch.int64 and t.numel() == 1 for t in saved)


def test_dropout_apply_matches_the_philox_mask():
    M, K = 37, 45
    t = torch.randn(M, K, device=DEVICE).t().contiguous().t()  # column-major: strides honoured
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE)
    keep = torch.from_numpy(philox.keep_mask(4321, M, K, P)).to(DEVICE)
    out = tb._kernels.dropout_apply(t, seed, P)
    assert torch.equal(out, torch.where(keep, t * (1.0 / (1.0 - P)), 0.0).float())
    same = t.clone()
    tb._kernels.dropout_apply(same, seed, P, out=same)
    assert torch.equal(same, out)
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \(0, 1\), got 0.0"):
        tb._kernels.dropout_apply(t, seed, 0.0)
    with pytest.raises(ValueError, match="t: expected a 2-D tensor"):
        tb._kernels.dropout_apply(t[0], seed, P)
    with pytest.raises(ValueError, match="seed: expected an int64 tensor"):
        tb._kernels.dropout_apply(t, seed.int(), P)


def test_composition_without_dropout_is_the_torch_backend(monkeypatch):
    from fastlora import torch_backend

    calls = []
    real = torch_backend.apply
    monkeypatch.setattr(torch_backend, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, b, A, B = make_inputs(8, 16, 8, 4, torch.float32, DEVICE)
    with strategy("composition"):
        tb.apply(x, w, b, A, B, SCALING, 0.0)
        assert calls == [1]
        tb.apply(x, w, b, A, B, SCALING, P)  # with dropout: the Philox composition
        assert calls == [1]


def test_compiled_op_runs_the_backward_it_was_given():
    x, w, b, A, B = make_inputs(19, 40, 24, 3, torch.float32, DEVICE)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    args = (x, w, b, A.requires_grad_(), B.requires_grad_(), SCALING, P, seed, "fused",
            "composition")  # fmt: skip
    torch.library.opcheck(tb.lora_fwd_triton, args)
    y, u = tb.lora_fwd_triton(*args)
    dy = torch.randn_like(y)
    outs = {name: tb.lora_bwd_triton(dy, x, w, A.detach(), B.detach(), u, SCALING, P, seed,
                                     True, True, True, name)
            for name in ("fused", "composition")}  # fmt: skip
    for a, c in zip(*outs.values()):
        assert max_err(a, c) <= 1e-5 * c.abs().max().item()
    dA, dB = torch.autograd.grad(y, (A, B), dy)
    assert max_err(dA, outs["composition"][1]) == 0.0  # autograd ran the named candidate


# --------------------------------------------------------------------------- spellings


def test_spellings_of_the_strategy(monkeypatch):
    assert tb.parse_strategy("fused") == ("fused", "fused")
    assert tb.parse_strategy(" Forward=fused , backward=Composition") == ("fused", "composition")
    assert tb.parse_strategy("backward=composition") == ("auto", "composition")
    assert tb.Picks("fused", "composition").spelled() == "forward=fused,backward=composition"
    assert tb.Picks("auto", "auto").spelled() == "auto"
    args = (37, 40, 24, 3, torch.float32, 0.0, DEVICE)
    monkeypatch.setenv("FASTLORA_STRATEGY", "forward=composition,backward=fused")
    tb.set_strategy(None)
    assert tb.picks_for(*args) == ("composition", "fused")
    assert tb.strategy_for(*args) == "forward=composition,backward=fused"
    previous = tb.set_strategy(forward="fused", backward="composition")
    assert previous is None  # it came from the environment
    assert tb.picks_for(*args) == ("fused", "composition")
    assert tb.set_strategy("fused") == "forward=fused,backward=composition"
    assert tb.picks_for(*args) == ("fused", "fused")
    assert tb.set_strategy(forward="composition") == "fused"
    assert tb.picks_for(*args) == ("composition", "fused")  # "auto" is fused here
    tb.set_strategy(None)
    assert tb.picks_for(*args) == ("composition", "fused")  # back to the variable


@pytest.mark.parametrize("spec, message", [
    ("forward=fast", r"FASTLORA_STRATEGY \(forward\): expected one of 'fused', 'composition', "
                     r"'auto'.* \(forward candidates\), got 'fast'"),
    ("sideways=fused", "FASTLORA_STRATEGY: expected 'forward=<name>,backward=<name>'"),
    ("forward=fused,forward=composition", "expected 'forward=<name>,backward=<name>'"),
    ("forward=", "expected 'forward=<name>,backward=<name>'"),
    ("fastest", "FASTLORA_STRATEGY: expected one of 'fused'"),
])  # fmt: skip
def test_bad_spellings_name_the_source(spec, message):
    with pytest.raises(ValueError, match=message):
        tb.parse_strategy(spec)


def test_set_strategy_bad_arguments():
    with pytest.raises(ValueError, match=r"set_strategy\(backward\): expected one of .*got 'x'"):
        tb.set_strategy(forward="fused", backward="x")
    with pytest.raises(ValueError, match="give strategy .* or forward=/backward=, not both"):
        tb.set_strategy("fused", forward="fused")
    with pytest.raises(ValueError, match=r"set_strategy\(strategy\): expected one of"):
        tb.set_strategy(3)


def test_a_candidate_name_is_known_in_its_direction_only(monkeypatch):
    monkeypatch.setitem(tb._kernels.BACKWARD_CANDIDATES, "dx_gemm", tb._kernels.lora_backward)
    assert tb.parse_strategy("backward=dx_gemm") == ("auto", "dx_gemm")
    with pytest.raises(ValueError, match=r"\(forward candidates\), got 'dx_gemm'"):
        tb.parse_strategy("forward=dx_gemm")
    with pytest.raises(ValueError, match="got 'dx_gemm'"):
        tb.parse_strategy("dx_gemm")  # one word means both directions


# --------------------------------------------------------------------------- measured picks


def test_choose_ties_go_to_the_composition():
    margin = tb.TIE_MARGIN
    assert tb.choose({"fused": 1.0, "composition": 1.0}) == "composition"
    assert tb.choose({"fused": 1.0 - margin / 2, "composition": 1.0}) == "composition"
    assert tb.choose({"fused": 1.0 - 2 * margin, "composition": 1.0}) == "fused"
    assert tb.choose({"fused": 0.9, "dx_gemm": 0.8, "composition": 1.0}) == "dx_gemm"
    assert tb.choose({"fused": 1.2, "composition": 1.0}) == "composition"
    assert tb.choose({"composition": 1.0}) == "composition"
    assert 0.0 < margin <= 0.1


class FakeTimer:
    """Stands for ``_time_candidates``: fixed times per direction, calls recorded."""

    def __init__(self, forward, backward):
        self.times = {"forward": forward, "backward": backward}
        self.buckets = []

    def __call__(self, bucket, index):
        self.buckets.append(bucket)
        backward = bucket[8]
        return {d: dict(t) for d, t in self.times.items() if d == "forward" or backward}


def test_auto_measures_each_direction_and_keys_on_adapter_dtype_and_bias(monkeypatch):
    timer = FakeTimer({"fused": 1.0, "composition": 2.0}, {"fused": 2.0, "composition": 1.0})
    monkeypatch.setattr(tb, "_measurable", lambda device: True)
    monkeypatch.setattr(tb, "_time_candidates", timer)
    args = (100, 64, 32, 8, torch.float16, 0.1, DEVICE)
    assert tb.picks_for(*args) == ("fused", "composition")
    assert tb.picks_for(120, *args[1:]) == ("fused", "composition")  # same M bucket
    assert len(timer.buckets) == 1
    tb.picks_for(*args, adapter_dtype=torch.float32)
    tb.picks_for(*args, bias=False)
    tb.picks_for(*args, backward=False)
    assert len(timer.buckets) == 4
    M, K, N, r, dtype, adapter, bias, dropout, backward, base = timer.buckets[1]
    assert adapter == torch.float32 and bias and dropout and backward
    assert timer.buckets[2][6] is False and timer.buckets[3][8] is False
    # a forced direction is not replaced by the measurement
    with strategy(forward="composition"):
        assert tb.picks_for(*args) == ("composition", "composition")
    # within the tie margin the composition wins
    tb.clear_strategy_cache()
    timer.times["backward"] = {"fused": 1.0, "composition": 1.0 + tb.TIE_MARGIN / 2}
    assert tb.picks_for(*args).backward == "composition"


def test_apply_runs_the_measured_pair(monkeypatch):
    monkeypatch.setattr(tb, "_measurable", lambda device: True)
    monkeypatch.setattr(tb, "_time_candidates", FakeTimer(
        {"fused": 2.0, "composition": 1.0}, {"fused": 1.0, "composition": 2.0}))
    ran = []
    real_fwd, real_bwd = tb.composition_forward, tb._kernels.lora_backward
    monkeypatch.setattr(tb, "composition_forward", lambda *a, **k: ran.append("c-fwd")
                        or real_fwd(*a, **k))  # fmt: skip
    monkeypatch.setitem(tb._kernels.BACKWARD_CANDIDATES, "fused",
                        lambda *a, **k: ran.append("f-bwd") or real_bwd(*a, **k))
    x, w, b, A, B = make_inputs(8, 16, 8, 4, torch.float32, DEVICE)
    A.requires_grad_()
    y = tb.apply(x, w, b, A, B, SCALING, P)
    y.sum().backward()
    assert ran == ["c-fwd", "f-bwd"]


def test_rank_zero_picks_are_broadcast(monkeypatch):
    """The collective step alone (a fake process group): a rank other than 0 does not time,
    takes rank 0's picks, and refuses a different bucket."""
    dist = torch.distributed
    sent = {}

    def broadcast(box, src):
        assert src == 0
        box[:] = sent["box"]

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(tb, "_measurable", lambda device: True)
    timer = FakeTimer({"fused": 1.0, "composition": 2.0}, {"fused": 1.0, "composition": 2.0})
    monkeypatch.setattr(tb, "_time_candidates", timer)
    args = (64, 32, 16, 4, torch.float32, 0.0, DEVICE)
    bucket = (64, 32, 16, 4, torch.float32, torch.float32, True, False, True, "dense")
    sent["box"] = [bucket, ("composition", "fused")]
    assert tb.picks_for(*args) == ("composition", "fused")
    assert timer.buckets == []  # rank 1 never timed
    tb.clear_strategy_cache()
    sent["box"] = [(128, *bucket[1:]), ("fused", "fused")]
    with pytest.raises(RuntimeError, match="ranks must meet new shapes together"):
        tb.picks_for(*args)


# --------------------------------------------------------------------------- GPU check table


@pytest.mark.slow  # PEFT's import and the interpreted candidates: ~30 s
def test_candidate_table_runs_the_dispatchers_rule(monkeypatch, tmp_path):
    """benchmarks.candidates (gpu_check.sh's table) on a tiny case under the interpreter:
    every candidate of each direction timed, the pick the dispatcher's rule, ratios formed."""
    from benchmarks import candidates

    monkeypatch.setattr(tb, "BENCH_ROUNDS", 1)
    rows = candidates.main(["--device", "cpu", "--dtype", "float32", "--shapes", "40x24",
                            "--m", "19", "--p", "0.1", "--out", str(tmp_path)])  # fmt: skip
    (row,) = rows
    for direction, launchers in (("forward", tb.forward_launchers()),
                                 ("backward", tb.backward_launchers())):
        # a dense base: the 4-bit-only candidates are neither timed nor run
        assert set(row["times"][direction]) == set(launchers) - tb._kernels.CANDIDATES_4BIT_ONLY
        assert row["picks"][direction] == tb.choose(row["times"][direction])
    pick_ms = sum(row["times"][d][row["picks"][d]] for d in ("forward", "backward"))
    assert row["vs_frozen"] == pytest.approx(pick_ms / sum(row["baselines"]["frozen"].values()))
    assert row["vs_peft"] == pytest.approx(pick_ms / sum(row["baselines"]["peft"].values()))
    text = (tmp_path / "candidates.md").read_text()
    assert "| 40x24 | 19 | 0.1 | **pick** |" in text and "| frozen cuBLAS |" in text
    assert "| PEFT |" in text and "| composition |" in text


def test_a_4bit_only_candidate_is_fused_on_a_dense_base(monkeypatch):
    monkeypatch.setitem(tb._kernels.FORWARD_CANDIDATES, "decode_x", tb._kernels.lora_forward)
    monkeypatch.setattr(tb._kernels, "CANDIDATES_4BIT_ONLY", frozenset({"decode_x"}),
                        raising=False)  # fmt: skip
    args = (19, 40, 24, 3, torch.float32, 0.0, DEVICE)
    with strategy(forward="decode_x", backward="composition"):
        assert tb.picks_for(*args) == ("fused", "composition")
        assert tb.picks_for(*args, base="nf4").forward == "decode_x"


def test_a_dora_layer_never_runs_a_lora_candidate(monkeypatch):
    """LoRA's candidates (the hybrids among them) have no DoRA epilogue (column scale, z,
    dm): with them forced, a DoRA layer runs DoRA's own kernels, no LoRA launcher is called,
    and the result is the torch backend's."""
    from fastlora.kernels import api

    import fastlora

    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA candidate ran for a DoRA layer")

    torch.manual_seed(0)
    layer = fastlora.FastLoRALinear(24, 40, r=4, lora_alpha=8, use_dora=True).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 24, device=DEVICE)
    out = {}
    for backend in ("torch", "triton"):
        xg = x.clone().requires_grad_()
        with fastlora.use_backend(backend), monkeypatch.context() as m:
            if backend == "triton":
                for table in (api.FORWARD_CANDIDATES, api.BACKWARD_CANDIDATES):
                    for name in table:
                        m.setitem(table, name, refuse)
            with strategy(forward="cublas_shrink", backward="dx_gemm_cublas"):
                y = layer(xg)
                y.backward(torch.ones_like(y))
        out[backend] = (y.detach(), xg.grad, layer.lora_A.grad.clone())
        layer.zero_grad()
    for name, a, b in zip(("y", "dx", "dA"), out["torch"], out["triton"]):
        assert max_err(a, b) <= 1e-5 * max(1.0, a.abs().max().item()), name


def test_an_sm90_dense_candidate_is_fused_on_a_4bit_base():
    """"warp_spec" differs from "fused" only on a dense base (sm_90): forced on a 4-bit
    base the dispatcher runs "fused", and on a dense one the candidate itself."""
    args = (19, 40, 24, 8, torch.float16, 0.0, DEVICE)
    with strategy(forward="warp_spec", backward="fused"):
        assert tb.picks_for(*args) == ("warp_spec", "fused")
        assert tb.picks_for(*args, base="nf4") == ("fused", "fused")
