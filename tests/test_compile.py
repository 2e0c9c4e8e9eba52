"""The ops are registered with torch.library: opcheck passes and torch.compile traces the
layer in one graph, with no recompile on the second call."""

import pytest
import torch

import fastlora
from fastlora import torch_backend  # noqa: F401  (registers fastlora::lora_fwd / lora_bwd)
from fastlora.dropout import draw_packed_mask
from helpers import make_inputs, max_err


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(p, bias):
    x, w, b, A, B = make_inputs(9, 16, 12, 3, torch.float32, "cpu", bias=bias)
    mask = draw_packed_mask(9, 16, p, x.device) if p else None
    args = (x.requires_grad_(), w, b, A.requires_grad_(), B.requires_grad_(), 0.5, p, mask)
    torch.library.opcheck(torch.ops.fastlora.lora_fwd.default, args)


def test_opcheck_backward():
    x, w, _, A, B = make_inputs(9, 16, 12, 3, torch.float32, "cpu")
    dy, u = torch.randn(9, 12), torch.randn(9, 3)
    mask = draw_packed_mask(9, 16, 0.3, x.device)
    for flags in [(True, True, True), (False, True, False), (True, False, False)]:
        torch.library.opcheck(torch.ops.fastlora.lora_bwd.default,
                              (dy, x, w, A, B, u, mask, 0.5, 0.3, *flags))


class _Counter:
    def __init__(self):
        self.frames = 0

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return gm


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_one_frame_no_recompile(p, train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    fastlora.set_backend("torch")
    layer = fastlora.FastLoRALinear(24, 16, r=4, lora_dropout=p, init_lora_weights=False).train(train)
    counter = _Counter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(5, 24, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    compiled(torch.randn(5, 24, requires_grad=True)).sum().backward()
    assert counter.frames == 1
    if p == 0.0 or not train:
        assert max_err(y, layer(x)) < 1e-5


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    fastlora.set_backend("torch")
    layer = fastlora.FastLoRALinear(24, 16, r=4, init_lora_weights=False)
    x = torch.randn(2, 5, 24, requires_grad=True)
    ref = layer(x)
    ref.sum().backward()
    g_ref = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    assert max_err(y, ref) < 1e-5
    assert max_err(layer.lora_A.grad, g_ref) < 1e-4


def test_compile_on_cpu_tensors_reaches_the_torch_backend():
    """Under "auto", CPU tensors take the torch backend's op even while compiling (the
    interpreter being on for the Triton tests must not change that)."""
    torch._dynamo.reset()
    fastlora.set_backend("auto")
    targets = []

    def inspect(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    layer = fastlora.FastLoRALinear(16, 8, r=2, init_lora_weights=False)
    torch.compile(layer, backend=inspect, fullgraph=True)(torch.randn(3, 16))
    assert any("fastlora.lora_fwd" in t for t in targets), targets
    assert not any("triton" in t for t in targets), targets


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_compile_dynamic_shapes_one_frame(p):
    """dynamic=True traces the float attributes (scaling, dropout) as symbols and M as a
    symbolic size: still one graph for every batch size."""
    torch._dynamo.reset()
    counter = _Counter()
    layer = fastlora.FastLoRALinear(24, 16, r=4, lora_dropout=p, init_lora_weights=False)
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for M in (5, 9, 17, 33):
        x = torch.randn(2, M, 24, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        if p == 0.0:
            assert max_err(y, layer(x)) < 1e-5
    assert counter.frames == 1


@pytest.mark.slow  # a fresh Python process imports torch, triton and fastlora
def test_compile_as_the_first_call_in_a_process():
    """Nothing lazily initialised on the first call (backend name, Triton probe) may break
    a fullgraph trace."""
    import subprocess
    import sys

    code = (
        "import torch, fastlora\n"
        "layer = fastlora.FastLoRALinear(8, 4, r=2, lora_dropout=0.1)\n"
        "y = torch.compile(layer, backend='eager', fullgraph=True)(torch.randn(3, 8))\n"
        "print(tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(3, 4)")


_TRACE_TRITON_OP = r"""
import logging, torch
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
from torch._functorch.aot_autograd import aot_module_simplified
from fastlora import triton_backend as tb

class Captured(Exception):
    pass

def backend(gm, example_inputs):
    def fw(graph, _):
        raise Captured([str(n.target) for n in graph.graph.nodes if n.op == "call_function"])
    return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

x = torch.randn(64, 32, dtype=torch.float16, requires_grad=True)
w, b = torch.randn(48, 32, dtype=torch.float16), torch.randn(48, dtype=torch.float16)
A = torch.randn(4, 32, dtype=torch.float16, requires_grad=True)
B = torch.randn(48, 4, dtype=torch.float16, requires_grad=True)
plan = tb._plan_of(tb.Picks("fused", "fused"), 0.1)  # the fused kernels both ways
fn = torch.compile(lambda *a: tb._fused(*a, 0.5, 0.1, plan), backend=backend, fullgraph=True)
try:
    fn(x, w, b, A, B)
except Exception as exc:
    cause = exc
    while cause is not None and not isinstance(cause, Captured):
        cause = cause.__cause__ or cause.__context__
    targets = cause.args[0]
    print("LAUNCHES", sum("triton_kernel_wrapper" in t for t in targets))
    print("OPAQUE", sum("fastlora" in t for t in targets))
"""


@pytest.mark.slow  # a fresh Python process imports torch, triton and fastlora
def test_triton_op_is_traced_into_without_a_gpu():
    """Without the interpreter the Triton ops are triton_ops: torch.compile must see the
    kernel launches inside (shrink + forward GEMM), not one opaque call. Tracing needs no
    GPU; the compiled graph is captured before anything runs."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TRACE_TRITON_OP], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LAUNCHES 2" in out.stdout and "OPAQUE 0" in out.stdout, out.stdout + out.stderr[-2000:]
