"""One ``setup_<provider>()`` factory per implementation, all built on the same inputs.

``make_inputs(spec)`` draws the frozen base (an ``nn.Linear``, weight ``[N, K]``), the LoRA
factors ``A`` ``[r, K]`` and ``B`` ``[N, r]`` (B non-zero, so every provider really computes
the low-rank path), ``x`` ``[M, K]`` (requires grad, as in a deep model whose earlier layers
train) and the upstream gradient ``dy`` ``[M, N]``. Every factory wraps that same base
``nn.Linear`` (no copy of W) and copies ``A``/``B`` into its own LoRA parameters, so all
providers compute the same function; ``run.check_outputs`` verifies it against
``fastlora.reference.lora_linear_reference``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import fastlora
from benchmarks.unsloth_style import UnslothStyleLinear

# every provider the suite knows, in the order tables and plots show them
PROVIDERS = (
    "linear",           # the floor: frozen nn.Linear (cuBLAS / MKL-oneDNN)
    "fastlora_triton",  # fastlora, backend "triton" (fused kernels; per-shape strategy "auto")
    "fastlora_fused",   # fastlora, backend "triton" with strategy forced to "fused"
    "fastlora_torch",   # fastlora, backend "torch" (the lean composition)
    "peft",             # PEFT's LoRA layer, eager
    "peft_compiled",    # the same under torch.compile
    "unsloth_style",    # hand-written autograd over BLAS, addmm_ in place, no dropout
    "fastlora_dora",    # fastlora with use_dora=True, backend "auto"
    "peft_dora",        # PEFT's LoRA layer with use_dora=True, eager
)
FASTLORA_PROVIDERS = ("fastlora_triton", "fastlora_fused", "fastlora_torch")
# providers that compute DoRA (checked against the DoRA reference, trainable [A, B, m])
DORA_PROVIDERS = ("fastlora_dora", "peft_dora")
PEFT_TARGET = "proj"


@dataclass(frozen=True)
class Spec:
    """One benchmark case: x [M, K] through a K -> N projection with rank r, dropout p."""

    M: int
    K: int
    N: int
    r: int
    p: float
    dtype: torch.dtype
    device: str
    bias: bool = False  # Llama's projections carry no bias
    base: str = "dense"  # or "nf4": the base is a bitsandbytes Linear4bit (QLoRA)

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.r  # scaling 2, a common choice; timing does not depend on it

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def shape(self) -> str:
        return f"{self.K}x{self.N}"

    def label(self) -> str:
        base = "" if self.base == "dense" else f" {self.base}"
        return f"{self.shape}{base} M={self.M} r={self.r} p={self.p:g}"


@dataclass
class Inputs:
    spec: Spec
    linear: nn.Linear  # frozen base (a Linear4bit for a 4-bit spec), shared by every provider
    lora_A: Tensor     # [r, K]
    lora_B: Tensor     # [N, r]
    x: Tensor          # [M, K], requires grad
    dy: Tensor         # [M, N]
    magnitude: Tensor | None = None  # [N], DoRA's m for the DoRA providers


@dataclass
class Case:
    """A provider ready to run: ``module(inputs.x)``; ``trainable`` get gradients."""

    provider: str
    module: nn.Module
    trainable: list[Tensor]
    info: dict = field(default_factory=dict)


class NotApplicable(Exception):
    """The provider cannot run this spec (the message says why)."""


def make_inputs(spec: Spec, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
        return t.to(device=spec.device, dtype=spec.dtype)

    linear = nn.Linear(spec.K, spec.N, bias=spec.bias, device=spec.device, dtype=spec.dtype)
    with torch.no_grad():
        linear.weight.copy_(rnd(spec.N, spec.K, scale=spec.K**-0.5))
        if spec.bias:
            linear.bias.copy_(rnd(spec.N, scale=0.1))
    linear.requires_grad_(False)
    if spec.base != "dense":
        linear = quantized(linear, spec)
    inp = Inputs(
        spec=spec,
        linear=linear,
        lora_A=rnd(spec.r, spec.K, scale=spec.K**-0.5),
        lora_B=rnd(spec.N, spec.r, scale=spec.r**-0.5),
        x=rnd(spec.M, spec.K).requires_grad_(),
        dy=rnd(spec.M, spec.N),
    )
    # a trained-looking magnitude: the row norms of W, each off by up to 10%
    row_norms = reference_weight(linear).norm(dim=1)
    inp.magnitude = (row_norms * (1 + 0.1 * rnd(spec.N).float())).to(spec.dtype)
    return inp


def quantized(linear: nn.Linear, spec: Spec) -> nn.Module:
    """The frozen base in 4 bits: a bitsandbytes ``Linear4bit`` (``spec.base`` = "nf4",
    double quantization, blocksize 64, compute dtype ``spec.dtype``), as
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)`` builds it."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(spec.K, spec.N, bias=spec.bias, compute_dtype=spec.dtype,
                          compress_statistics=True, quant_type=spec.base)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 compress_statistics=True, quant_type=spec.base, module=q)
    if spec.bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to(spec.device)  # bitsandbytes quantizes on the move
    # bitsandbytes' inference-only CPU shortcut (bf16 GEMV) would change the layout mid-run
    q.support_avx512bf16_for_cpu = False
    return q


def reference_weight(linear: nn.Module) -> Tensor:
    """The base's W [N, K] in float32: bitsandbytes' own dequantize_4bit for a 4-bit base."""
    if getattr(linear.weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()
    return linear.weight.float()


# --------------------------------------------------------------------------- providers


def setup_linear(inp: Inputs) -> Case:
    return Case("linear", inp.linear, [])


class _WithBackend(nn.Module):
    """Runs ``layer`` under a fastlora backend (and, for "triton", a strategy)."""

    def __init__(self, layer: nn.Module, backend: str, strategy: str | None = None) -> None:
        super().__init__()
        self.layer, self.backend, self.strategy = layer, backend, strategy

    def forward(self, x: Tensor) -> Tensor:
        with fastlora.use_backend(self.backend):
            if self.strategy is None:
                return self.layer(x)
            from fastlora import triton_backend

            previous = triton_backend.set_strategy(self.strategy)
            try:
                return self.layer(x)
            finally:
                triton_backend.set_strategy(previous)


def _fastlora_layer(inp: Inputs) -> fastlora.FastLoRALinear:
    s = inp.spec
    layer = fastlora.FastLoRALinear.from_linear(
        inp.linear, r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.p, init_lora_weights=False
    )
    with torch.no_grad():
        layer.lora_A.copy_(inp.lora_A)
        layer.lora_B.copy_(inp.lora_B)
    return layer


def setup_fastlora_torch(inp: Inputs) -> Case:
    layer = _fastlora_layer(inp)
    return Case("fastlora_torch", _WithBackend(layer, "torch"), [layer.lora_A, layer.lora_B])


def triton_status(device: str) -> tuple[bool, str]:
    if torch.device(device).type != "cuda":
        return False, "Triton runs CPU tensors only in its interpreter (far too slow to time)"
    try:
        from fastlora import triton_backend
    except Exception as exc:  # noqa: BLE001 (any import failure makes the provider n/a)
        return False, f"fastlora.triton_backend cannot be imported: {exc}"
    return triton_backend.available(torch.device(device))


def _setup_triton(inp: Inputs, provider: str, strategy: str | None) -> Case:
    ok, why = triton_status(inp.spec.device)
    if not ok:
        raise NotApplicable(why)
    layer = _fastlora_layer(inp)
    return Case(provider, _WithBackend(layer, "triton", strategy), [layer.lora_A, layer.lora_B])


def setup_fastlora_triton(inp: Inputs) -> Case:
    return _setup_triton(inp, "fastlora_triton", None)


def setup_fastlora_fused(inp: Inputs) -> Case:
    return _setup_triton(inp, "fastlora_fused", "fused")


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        setattr(self, PEFT_TARGET, linear)


def _peft_layer(inp: Inputs) -> nn.Module:
    import peft

    s = inp.spec
    config = peft.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.p,
                             target_modules=[PEFT_TARGET])
    holder = peft.inject_adapter_in_model(config, _Holder(inp.linear))
    layer = getattr(holder, PEFT_TARGET)  # peft.tuners.lora.Linear around inp.linear
    if s.base == "dense":
        layer.to(device=s.device, dtype=s.dtype)
    else:  # lora.bnb.Linear4bit: move only the factors (.to(dtype) would cast the packed codes)
        layer.lora_A.to(device=s.device, dtype=s.dtype)
        layer.lora_B.to(device=s.device, dtype=s.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp.lora_A)
        layer.lora_B["default"].weight.copy_(inp.lora_B)
    layer.train()
    return layer


def _lora_params(layer: nn.Module) -> list[Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


def setup_peft(inp: Inputs) -> Case:
    layer = _peft_layer(inp)
    return Case("peft", layer, _lora_params(layer))


def setup_peft_compiled(inp: Inputs) -> Case:
    """PEFT's layer under ``torch.compile`` (static shapes, the baseline's best case). The
    first fwd+bwd compiles here, so timing never sees it; ``info["compile_s"]`` says how long."""
    import torch._dynamo

    if inp.spec.base != "dense":
        raise NotApplicable("4-bit base: PEFT's QLoRA layer is timed eager")
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
    layer = _peft_layer(inp)
    compiled = torch.compile(layer, dynamic=False)
    t0 = time.perf_counter()
    compiled(inp.x).backward(inp.dy)
    if inp.spec.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    params = _lora_params(layer)
    for t in [inp.x, *params]:
        t.grad = None
    return Case("peft_compiled", compiled, params, {"compile_s": round(elapsed, 2)})


def setup_fastlora_dora(inp: Inputs) -> Case:
    if inp.spec.base != "dense":
        raise NotApplicable("the DoRA rows run on the dense base")
    s = inp.spec
    layer = fastlora.FastLoRALinear.from_linear(
        inp.linear, r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.p, init_lora_weights=False,
        use_dora=True,
    )
    with torch.no_grad():
        layer.lora_A.copy_(inp.lora_A)
        layer.lora_B.copy_(inp.lora_B)
        layer.lora_magnitude_vector.copy_(inp.magnitude)
    return Case("fastlora_dora", _WithBackend(layer, "auto"),
                [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector])


def setup_peft_dora(inp: Inputs) -> Case:
    if inp.spec.base != "dense":
        raise NotApplicable("the DoRA rows run on the dense base")
    import peft

    s = inp.spec
    config = peft.LoraConfig(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.p,
                             target_modules=[PEFT_TARGET], use_dora=True)
    layer = getattr(peft.inject_adapter_in_model(config, _Holder(inp.linear)), PEFT_TARGET)
    layer.to(device=s.device, dtype=s.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp.lora_A)
        layer.lora_B["default"].weight.copy_(inp.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(inp.magnitude)
    layer.train()
    return Case("peft_dora", layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                     layer.lora_magnitude_vector["default"].weight])


def setup_unsloth_style(inp: Inputs) -> Case:
    if inp.spec.p > 0:
        raise NotApplicable("no dropout in the recipe (Unsloth's fast path refuses dropout)")
    if inp.spec.base != "dense":
        raise NotApplicable("4-bit base: the recipe here is written for a dense W")
    m = UnslothStyleLinear(inp.linear, inp.lora_A, inp.lora_B, inp.spec.scaling)
    return Case("unsloth_style", m, [m.lora_A, m.lora_B])


SETUP: dict[str, Callable[[Inputs], Case]] = {
    "linear": setup_linear,
    "fastlora_triton": setup_fastlora_triton,
    "fastlora_fused": setup_fastlora_fused,
    "fastlora_torch": setup_fastlora_torch,
    "peft": setup_peft,
    "peft_compiled": setup_peft_compiled,
    "unsloth_style": setup_unsloth_style,
    "fastlora_dora": setup_fastlora_dora,
    "peft_dora": setup_peft_dora,
}


def expand_providers(names: list[str]) -> list[str]:
    """``fastlora`` stands for every fastlora backend; order follows ``PROVIDERS``."""
    wanted: set[str] = set()
    for name in names:
        if name == "fastlora":
            wanted.update(FASTLORA_PROVIDERS)
        elif name == "dora":  # DoRA beside the LoRA it extends
            wanted.update(("fastlora_torch", *DORA_PROVIDERS))
        elif name in SETUP:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown provider {name!r}; known: fastlora, dora, {', '.join(PROVIDERS)}")
    if "linear" not in wanted:
        wanted.add("linear")  # every figure is a ratio to it
    return [p for p in PROVIDERS if p in wanted]
