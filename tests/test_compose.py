"""fastlora inside PyTorch's own machinery: torch.compile (fullgraph, Inductor), autocast,
activation checkpointing, and no host syncs in forward/backward.

Every test runs a small multi-layer model (two residual blocks, each LayerNorm -> LoRA ->
GELU -> LoRA, odd sizes) on each backend that can run here: the torch backend, and the Triton
backend (real kernels under TRITON_INTERPRET=1 on the CPU). GPU-only checks are marked
``gpu`` and skipped with a reason where CUDA is absent.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import fastlora
from helpers import ATOL, max_err

D, H, R = 12, 20, 3  # model width, hidden width, LoRA rank: odd on purpose
BATCH, SEQ = 2, 5
SEED_INIT, SEED_STEP = 0, 1234
P_DROP = 0.2

# (dropout rate, module mode): eval ignores dropout, so one eval case is enough
MODES = [(0.0, "train"), (P_DROP, "train"), (P_DROP, "eval")]
MODE_IDS = ["p0-train", "dropout-train", "dropout-eval"]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Block(nn.Module):
    """x + down(gelu(up(norm(x)))), both projections FastLoRALinear."""

    def __init__(self, p: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        kw = dict(r=R, lora_alpha=2 * R, lora_dropout=p, init_lora_weights=False,
                  dtype=dtype, device=device)
        self.norm = nn.LayerNorm(D, dtype=dtype, device=device).requires_grad_(False)
        self.up = fastlora.FastLoRALinear(D, H, **kw)
        self.down = fastlora.FastLoRALinear(H, D, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, p: float = 0.0, dtype=torch.float32, device="cpu", ckpt: str | None = None):
        super().__init__()
        torch.manual_seed(SEED_INIT)
        self.blocks = nn.ModuleList([Block(p, dtype, device) for _ in range(2)])
        # None, "reentrant", "non-reentrant", or "no-rng-restore" (a control: non-reentrant
        # with preserve_rng_state=False)
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.ckpt is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.ckpt == "reentrant",
                               preserve_rng_state=self.ckpt != "no-rng-restore")
        return x


def lora_layers(model: nn.Module) -> list[fastlora.FastLoRALinear]:
    return [m for m in model.modules() if isinstance(m, fastlora.FastLoRALinear)]


def run_step(model, x, seed=SEED_STEP):
    """One forward and backward under a fixed seed; returns (y, {name: grad}) with the
    gradients of x and of every parameter that has one (the LoRA factors)."""
    for prm in model.parameters():
        prm.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    # a fixed, non-uniform weighting, so every output element matters differently (made on
    # y's device: a host-to-device copy would itself synchronize)
    w = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float32).view(y.shape)
    (y * w).sum().backward()
    grads = {"x": x.grad}
    grads.update({n.removeprefix("_orig_mod."): prm.grad  # the torch.compile wrapper's prefix
                  for n, prm in model.named_parameters() if prm.grad is not None})
    return y.detach(), grads


def make_x(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, SEQ, D, generator=g, dtype=torch.float64).to(device, dtype)


def assert_close_all(got: dict, want: dict, tol: float, what: str):
    assert got.keys() == want.keys(), f"{what}: gradients for {sorted(got)} != {sorted(want)}"
    for name in want:
        err = max_err(got[name], want[name])
        assert err <= tol, f"{what}: {name} differs by {err:.3e} > {tol:.1e}"


def compare_runs(y, g, y_ref, g_ref, tol, what):
    assert y.dtype == y_ref.dtype
    err = max_err(y, y_ref)
    assert err <= tol, f"{what}: output differs by {err:.3e} > {tol:.1e}"
    assert_close_all(g, g_ref, tol, what)
    assert len(g) == 1 + 4 * 2, f"{what}: expected grads for x and 8 LoRA factors, got {sorted(g)}"


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(("p", "mode"), MODES, ids=MODE_IDS)
def test_compile_fullgraph_one_frame_matches_eager(backend, p, mode):
    """fullgraph=True over the whole model traces forward and backward (AOTAutograd, so the
    fake implementations of the forward and backward ops propagate shapes) in exactly one
    frame, compiles once for two different inputs, and gives eager's numbers; with dropout
    under the same seed, the very same mask."""
    torch._dynamo.reset()
    model = Model(p).train(mode == "train")
    x = make_x()
    y_ref, g_ref = run_step(model, x)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    y, g = run_step(compiled, x)
    compare_runs(y, g, y_ref, g_ref, 1e-6, f"aot_eager {backend}")
    run_step(compiled, x + 1, seed=SEED_STEP + 1)  # new values: no recompile
    assert counter.frame_count == 1, f"{counter.frame_count} frames (a graph break or recompile)"


@pytest.mark.slow
@pytest.mark.parametrize(("p", "mode"), MODES[1:], ids=MODE_IDS[1:])
def test_compile_inductor_matches_eager(backend, p, mode):
    """Inductor (generated C++ around the fastlora ops) gives eager's numbers within fp32
    rounding.  ``fallback_random`` makes Inductor draw random numbers with the same aten ops
    as eager, so in training the dropout mask is the eager one and the outputs compare."""
    torch._dynamo.reset()
    model = Model(p).train(mode == "train")
    x = make_x()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        if mode == "train":
            y_ref, g_ref = run_step(model, x)
            y, g = run_step(compiled, x)
            compare_runs(y, g, y_ref, g_ref, 5e-5, f"inductor {backend}")
        else:
            with torch.no_grad():
                y_ref, y = model(x), compiled(x)
            assert max_err(y, y_ref) <= 5e-5


# --------------------------------------------------------------------------- autocast


def _check_autocast(backend, device, dtype):
    """Parameters fp32, autocast to ``dtype``: the output has the dtype nn.Linear would give
    under the same autocast, gradients come back in fp32 (the parameters' and x's dtype), and
    both are as close to the float64 model as the same model of plain nn.Linear layers (the
    PEFT-style composition) is under the same autocast, within the per-dtype rule."""
    model = Model(0.0, torch.float32, device)
    x = make_x(torch.float32, device)
    out_dtypes = []
    for layer in lora_layers(model):
        layer.register_forward_hook(lambda mod, inp, out: out_dtypes.append(out.dtype))
    with torch.autocast(device.type, dtype=dtype):
        y, g = run_step(model, x)
        want_dtype = nn.Linear(D, D, device=device)(x).dtype
    # every layer's output (the second projection of a block takes a low-precision input into
    # fp32 weights, as an nn.Linear would), while the fp32 residual keeps y in fp32
    assert out_dtypes == [want_dtype] * 4 and want_dtype == dtype, out_dtypes
    assert all(t.dtype == torch.float32 for t in g.values()), {n: t.dtype for n, t in g.items()}

    # the yardstick: the same weights in float64 through unfused nn.functional ops, not
    # through fastlora (whose own float64 path would share any bug under test)
    with _plain_composition():
        y64, g64 = run_step(copy.deepcopy(model).double(), x.double())
    with torch.autocast(device.type, dtype=dtype), _plain_composition():
        y_pt, g_pt = run_step(model, x)
    for name, want in [("y", y64), *g64.items()]:
        got, base = (y, y_pt) if name == "y" else (g[name], g_pt[name])
        err, bound = max_err(got, want), 2 * max_err(base, want) + ATOL[dtype]
        assert err <= bound, f"{backend} {dtype}: {name} error {err:.3e} > {bound:.3e}"


@contextlib.contextmanager
def _plain_composition():
    """Route FastLoRALinear.forward through unfused nn.functional ops (what PEFT runs)."""
    original = fastlora.FastLoRALinear.forward

    def plain(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(x, self.lora_A), self.lora_B)

    fastlora.FastLoRALinear.forward = plain
    try:
        yield
    finally:
        fastlora.FastLoRALinear.forward = original


def test_autocast_cpu(backend):
    # bf16 tl.dot is wrong under Triton 3.9's interpreter (DESIGN.md section 4): the triton
    # backend is checked with CPU fp16 autocast here and bf16 on a GPU
    _check_autocast(backend, torch.device("cpu"),
                    torch.bfloat16 if backend == "torch" else torch.float16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_cuda(backend, dtype):
    _check_autocast(backend, torch.device("cuda"), dtype)


def test_autocast_compiled_matches_eager(backend):
    """autocast around a fullgraph-compiled model: same numbers as eager under autocast."""
    torch._dynamo.reset()
    dtype = torch.bfloat16 if backend == "torch" else torch.float16
    model = Model(P_DROP).train()
    x = make_x()
    with torch.autocast("cpu", dtype=dtype):
        y_ref, g_ref = run_step(model, x)
        y, g = run_step(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    compare_runs(y, g, y_ref, g_ref, 0.0, f"compiled autocast {backend}")


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("ckpt", ["non-reentrant", "reentrant"])
def test_checkpoint_same_mask_same_grads(backend, ckpt):
    """Recomputation under torch.utils.checkpoint redraws the dropout mask from the restored
    RNG state, so it is the forward's mask: outputs and gradients equal the plain run's."""
    plain = Model(P_DROP).train()
    y_ref, g_ref = run_step(plain, make_x())

    model = Model(P_DROP, ckpt=ckpt).train()
    calls = []
    for layer in lora_layers(model):
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    y, g = run_step(model, make_x())
    assert len(calls) == 2 * len(lora_layers(model)), "checkpoint did not recompute the blocks"
    compare_runs(y, g, y_ref, g_ref, 0.0, f"checkpoint {ckpt} {backend}")


def test_checkpoint_control_without_rng_restore_differs(backend):
    """Control for the test above: with preserve_rng_state=False the recomputation draws a
    different mask and the gradients change, so equal gradients there do prove mask reuse."""
    plain = Model(P_DROP).train()
    _, g_ref = run_step(plain, make_x())
    _, g = run_step(Model(P_DROP, ckpt="no-rng-restore").train(), make_x())
    assert max_err(g["blocks.0.up.lora_A"], g_ref["blocks.0.up.lora_A"]) > 1e-3


# --------------------------------------------------------------------------- host syncs

# aten ops that copy a value to the host and wait for the device: .item(), bool(t), t == u
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}


@pytest.mark.parametrize("p", [0.0, P_DROP], ids=["p0", "dropout"])
def test_no_host_sync_cpu(backend, p, monkeypatch):
    """No op in forward or backward reads a tensor value on the host: the profiler sees every
    aten call, nested ones inside the fastlora ops included, and ``.tolist()`` (which does not
    go through the dispatcher) is trapped."""
    model = Model(p).train()
    x = make_x()
    run_step(model, x)  # warm-up (first-call caches, kernel compilation)

    def trap(self, *args, **kwargs):
        raise AssertionError("Tensor.tolist() called in forward/backward")

    monkeypatch.setattr(torch.Tensor, "tolist", trap)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(model, x)
    names = {e.name for e in prof.events()}
    lora = {n for n in names if "lora" in n.lower()}  # the fastlora op/Function, fwd and bwd
    assert lora and any("backward" in n.lower() for n in lora), f"profiler missed fastlora: {lora}"
    assert not names & SYNC_OPS, f"host-syncing ops in fwd/bwd: {sorted(names & SYNC_OPS)}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("p", [0.0, P_DROP], ids=["p0", "dropout"])
def test_no_host_sync_cuda(backend, p):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing CUDA call."""
    model = Model(p, torch.bfloat16, "cuda").train()
    x = make_x(torch.bfloat16, "cuda")
    with contextlib.ExitStack() as stack:
        if backend == "triton":  # force the kernels (auto might pick the composition)
            from fastlora import triton_backend

            previous = triton_backend.set_strategy("fused")
            stack.callback(triton_backend.set_strategy, previous)
        run_step(model, x)  # warm-up: autotuning and compilation synchronize
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_step(model, x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
