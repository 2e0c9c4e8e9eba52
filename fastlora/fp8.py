"""The FP8 base: e4m3 codes with one scale per 128x128 block, as FP8 checkpoints ship
(DeepSeek-V3, Qwen3 FP8; transformers' ``FP8Linear``).

    weight            float8_e4m3fn [N, K]                       the codes
    weight_scale_inv  float32 [ceil(N/bn), ceil(K/bk)]            one scale per block
    W[n, k]         = e4m3(weight[n, k]) * weight_scale_inv[n // bn, k // bk]

(bn, bk) = (128, 128) unless a layer says otherwise. e4m3fn: 1 sign, 4 exponent (bias 7) and
3 mantissa bits, subnormals, no infinities, 0x7F/0xFF NaN; the largest finite value is 448.

``quantize_fp8(model)`` converts frozen ``nn.Linear`` weights to this format: per block
``scale = amax / 448`` (1 for an all-zero block), codes ``= RNE_e4m3(fp32(w) / scale)``
(round to nearest, ties to even). ``|w| / scale <= 448`` in every block, so no code
saturates: the block's largest weight maps to +-448 exactly.

Dequantization (``dequantize``) writes ``W`` in a compute dtype: each code's value (exact in
every float dtype from float16 up) times its block scale, the product in fp32 (fp64 for a
float64 output), rounded once to the output dtype. The layers never keep
the result: ``transient`` writes it into a per-thread buffer reused by every layer (CPU), or
a fresh tensor the caching allocator recycles (GPU).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora._scratch import scratch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK_SIZE = (128, 128)

BlockSize = Union[int, Sequence[int]]


def block_size_of(block_size: BlockSize | None, name: str = "block_size") -> tuple[int, int]:
    """``(bn, bk)`` from an int, a pair, or None (128x128)."""
    if block_size is None:
        return BLOCK_SIZE
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in pair):
        raise ValueError(f"{name}: expected a positive int or a pair of them, got {block_size!r}")
    return pair


def scale_shape(shape: Sequence[int], block_size: tuple[int, int]) -> tuple[int, int]:
    """``[ceil(N/bn), ceil(K/bk)]`` for a weight of ``shape`` [N, K]."""
    return (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))


# ------------------------------------------------------------------------------ the math


@torch.no_grad()
def quantize(weight: Tensor, block_size: BlockSize | None = None) -> tuple[Tensor, Tensor]:
    """weight: [N, K] float -> (codes float8_e4m3fn [N, K], scale_inv float32 [ceil(N/bn),
    ceil(K/bk)]), ``scale = amax / 448`` per block, codes rounded to nearest even."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"weight: expected a 2-D floating-point tensor [N, K], got {got}")
    if weight.dtype == E4M3:
        raise TypeError("weight: already float8_e4m3fn (quantized)")
    bn, bk = block_size_of(block_size)
    N, K = weight.shape
    sn, sk = scale_shape((N, K), (bn, bk))
    w = F.pad(weight.float(), (0, sk * bk - K, 0, sn * bn - N)).view(sn, bn, sk, bk)
    amax = w.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("weight: has inf or NaN entries, which e4m3 cannot hold")
    scale = amax / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero block (or underflow)
    # |w / scale| <= 448 up to one fp32 rounding, which RNE maps back to 448: the clamp only
    # keeps torch's cast (NaN from 480 up) away from values that cannot occur
    q = (w / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    codes = q.to(E4M3).view(sn * bn, sk * bk)[:N, :K].contiguous()
    return codes, scale


_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def code_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 256 e4m3 values [256] in ``dtype`` (exact in every float dtype from float16 up;
    NaN at 0x7F and 0xFF), built once per dtype and device."""
    key = (dtype, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
        table = _TABLES[key] = codes.to(torch.float32).to(dtype=dtype, device=device)
    return table


def dequantize(
    codes: Tensor,
    scale_inv: Tensor,
    block_size: BlockSize | None = None,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """``W`` [N, K] in ``dtype``: each (bn, bk) block of e4m3 ``codes`` [N, K] times its
    ``scale_inv``, the product in fp32 (fp64 for float64) and rounded once. ``out``: a
    contiguous [N, K] ``dtype`` buffer to write into; ``index``: an int32 [N*K] scratch.

    Few passes (each is a parallel region, costly on a CPU whose cores are shared): with
    whole blocks, a gather from a per-block table of the 256 scaled values; otherwise the
    codes widened, a gather from the 256 values (exact in ``dtype``), the scales in place."""
    bn, bk = block_size_of(block_size)
    N, K = codes.shape
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=codes.device)
    if index is None:
        index = torch.empty(N * K, dtype=torch.int32, device=codes.device)
    index = index[: N * K]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if N % bn == 0 and K % bk == 0 and codes.is_contiguous():
        # whole blocks (real models): one table of 256 scaled values per block, and the
        # index code + 256 * block formed as the codes are widened: two passes
        sn, sk = N // bn, K // bk
        table = (code_table(acc, codes.device) * scale_inv.to(acc).reshape(-1, 1)).to(dtype)
        base = torch.arange(0, sn * sk * 256, 256, dtype=torch.int32, device=codes.device)
        torch.add(codes.view(torch.uint8).view(sn, bn, sk, bk), base.view(sn, 1, sk, 1),
                  out=index.view(sn, bn, sk, bk))  # fmt: skip
        return torch.index_select(table.reshape(-1), 0, index, out=out.view(-1)).view(N, K)
    index.copy_(codes.reshape(-1).view(torch.uint8))
    torch.index_select(code_table(dtype, codes.device), 0, index, out=out.view(-1))
    rows = scale_inv.to(acc).repeat_interleave(bk, dim=1)[:, :K]  # [ceil(N/bn), K], small
    full = N // bn
    if full:
        out[: full * bn].view(full, bn, K).mul_(rows[:full, None, :])
    if full * bn < N:
        out[full * bn :].mul_(rows[full])
    return out


def transient(codes: Tensor, scale_inv: Tensor, block_size: BlockSize | None,
              dtype: torch.dtype) -> Tensor:
    """``dequantize`` into the workspace: valid until the next transient decode of this
    dtype on this thread. Use it for one GEMM and drop it."""
    numel = codes.numel()
    out = scratch("fp8 weight", numel, dtype, codes.device).view(codes.shape)
    return dequantize(codes, scale_inv, block_size, dtype, out,
                      scratch("fp8 codes", numel, torch.int32, codes.device))  # fmt: skip


def attach(weight: Tensor, scale_inv: Tensor, block_size: BlockSize | None = None) -> Tensor:
    """Mark the e4m3 ``weight`` with its scales (as bitsandbytes marks a 4-bit weight with
    its ``quant_state``), so ``lora_linear`` and the backends read the base from it alone."""
    weight.fp8_scale_inv = scale_inv
    weight.fp8_block_size = block_size_of(block_size)
    return weight


def is_fp8_linear(module: object) -> bool:
    """fastlora's ``Fp8Linear`` or transformers' ``FP8Linear`` holding e4m3 codes."""
    return (
        isinstance(module, nn.Linear)
        and isinstance(getattr(module, "weight_scale_inv", None), Tensor)
        and getattr(module.weight, "dtype", None) == E4M3
    )


def module_block_size(module: nn.Module) -> tuple[int, int]:
    """The (bn, bk) of an FP8 layer; transformers' per-tensor layout (block_size None, a
    0-d scale) is one block covering the weight."""
    block = getattr(module, "block_size", None)
    if block is None:
        if module.weight_scale_inv.numel() == 1:
            return tuple(module.weight.shape)
        return BLOCK_SIZE
    return block_size_of(block, f"{type(module).__name__}.block_size")


# ------------------------------------------------------------------------------ the layer


class _Fp8Matmul(torch.autograd.Function):
    """``y = x W^T + b`` over the transient ``W``; backward decodes again for ``dx``."""

    @staticmethod
    def forward(ctx, x, weight, scale_inv, bias, block_size):
        ctx.block_size, ctx.has_bias = block_size, bias is not None
        ctx.save_for_backward(weight, scale_inv)
        return F.linear(x, transient(weight, scale_inv, block_size, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        weight, scale_inv = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ transient(weight, scale_inv, ctx.block_size, dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, None, None, db, None


class Fp8Linear(nn.Linear):
    """A frozen linear layer over an FP8 base: ``weight`` float8_e4m3fn [out, in] and
    ``weight_scale_inv`` float32 [ceil(out/bn), ceil(in/bk)] (transformers' ``FP8Linear``
    names, so checkpoints match). ``forward`` runs on any device: ``W`` is decoded into x's
    dtype for the call and dropped. ``orig_dtype``: the dtype the weight was quantized from
    (what ``merge_lora`` returns)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: BlockSize | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # no dense weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.block_size = block_size_of(block_size)
        self.orig_dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)  # fmt: skip
        shape = scale_shape((out_features, in_features), self.block_size)
        self.weight_scale_inv = nn.Parameter(torch.ones(shape, device=device), requires_grad=False)
        self.register_parameter("bias", nn.Parameter(
            torch.zeros(out_features, dtype=self.orig_dtype, device=device), requires_grad=False
        ) if bias else None)  # fmt: skip

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block_size: BlockSize | None = None) -> "Fp8Linear":
        """Quantize ``linear``'s weight (``quantize``); the bias parameter is shared."""
        if not isinstance(linear, nn.Linear) or is_fp8_linear(linear):
            raise TypeError(f"linear: expected a float torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if not w.is_floating_point() or w.dtype == E4M3:
            raise TypeError(f"linear.weight: expected a floating-point weight, got {w.dtype}")
        layer = cls(linear.in_features, linear.out_features, bias=False, block_size=block_size,
                    device="meta", dtype=w.dtype)  # fmt: skip
        codes, scale = quantize(w, layer.block_size)
        layer.weight = nn.Parameter(codes, requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Fp8Matmul.apply(x, self.weight, self.weight_scale_inv, bias, self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, fp8=e4m3")


def quantize_fp8(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    exclude_modules: Optional[Union[str, Sequence[str]]] = None,
    block_size: BlockSize | None = None,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` selected by ``target_modules`` (``apply_lora``'s
    rules; ``"all-linear"`` leaves the output head out) with an ``Fp8Linear`` holding its
    weight as block-scaled e4m3 (the dense weight is released; the bias is kept as it is),
    and return ``model``. Call before ``apply_lora``."""
    from fastlora.model import _check_untouched, _set_submodule, find_target_modules

    bn_bk = block_size_of(block_size)
    _check_untouched(model, "quantize_fp8")
    names = find_target_modules(model, target_modules, exclude_modules)
    bad = [f"{n} ({type(m).__name__}, weight {m.weight.dtype})"
           for n in names for m in [model.get_submodule(n)]
           if is_fp8_linear(m) or not m.weight.is_floating_point()]  # fmt: skip
    if bad:
        raise TypeError(f"target_modules selects layers that are not float nn.Linear: {', '.join(bad)}")
    for name in names:
        _set_submodule(model, name, Fp8Linear.from_linear(model.get_submodule(name), bn_bk))
    return model
