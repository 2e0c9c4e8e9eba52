"""Base kinds: what the frozen ``W`` of a LoRA layer is stored as (DESIGN.md section 6).

    dense   a float ``Tensor`` [N, K] (``nn.Linear.weight``)
    4-bit   a bitsandbytes ``Params4bit``: codes packed two per byte (row-major over the
            [N, K] weight, the high nibble first), one fp32 ``absmax`` per ``blocksize``
            codes (itself 8-bit quantized with a second absmax per 256 and an offset
            under double quantization), NF4 or FP4 code table; ``quant_state`` holds it all
    fp8     float8_e4m3fn codes [N, K] with one fp32 scale per (bn, bk) block (128x128 as
            FP8 checkpoints ship), attached to the weight as ``fp8_scale_inv`` and
            ``fp8_block_size`` (``fastlora.fp8``)

``base_of(weight)`` checks a weight and returns its kind; the backends ask the kind, never
the type: ``dense(dtype)`` gives a transient dense ``W`` in the compute dtype (the weight
itself for a dense base; bitsandbytes' own dequantization for a 4-bit one, which nothing
keeps: backward dequantizes again), ``kernel_args()`` what the Triton tile loaders read.

A 4-bit or FP8 base computes in ``x``'s dtype (float16, bfloat16 or float32), as bitsandbytes'
``matmul_4bit`` does: ``W`` is decoded straight into it, whatever dtype it was quantized from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from fastlora import fp8

QUANT_TYPES = ("nf4", "fp4")
# the blocksizes bitsandbytes.functional.quantize_4bit accepts
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# the dtypes a 4-bit weight is decoded into (bitsandbytes' dequantize_4bit supports these)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# an FP8 weight also decodes exactly into float64 (the torch path)
FP8_COMPUTE_DTYPES = COMPUTE_DTYPES + (torch.float64,)


def is_4bit(weight: object) -> bool:
    """A bitsandbytes ``Params4bit``, or any tensor carrying a ``quant_state`` (how
    bitsandbytes and transformers mark a 4-bit weight)."""
    return type(weight).__name__ == "Params4bit" or getattr(weight, "quant_state", None) is not None


def is_fp8(weight: object) -> bool:
    """An e4m3 weight, or any tensor marked with FP8 block scales (``fastlora.fp8.attach``)."""
    return isinstance(weight, Tensor) and (
        weight.dtype == fp8.E4M3 or getattr(weight, "fp8_scale_inv", None) is not None
    )


def is_quantized(weight: object) -> bool:
    """A 4-bit or FP8 base: decoded per call, never held dense."""
    return is_4bit(weight) or is_fp8(weight)


@dataclass(frozen=True)
class Dense:
    """A float weight [N, K], used as it is."""

    weight: Tensor
    kind = "dense"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def compute_dtype_for(self, x: Tensor) -> torch.dtype:
        return self.weight.dtype

    def dense(self, dtype: torch.dtype) -> Tensor:
        """``W`` [N, K]; the weight itself (its dtype is the compute dtype)."""
        return self.weight


@dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight: ``packed`` [ceil(N*K/2)] uint8 and its quant state."""

    weight: Tensor  # the Params4bit, kept for bitsandbytes' own functions
    packed: Tensor
    quant_state: Any
    quant_type: str
    blocksize: int
    shape: tuple[int, int]

    kind = "4bit"

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        return bool(self.quant_state.nested)

    def compute_dtype_for(self, x: Tensor) -> torch.dtype:
        return x.dtype

    def absmax(self) -> Tensor:
        """The fp32 absmax [ceil(N*K/blocksize)]; under double quantization decoded as
        bitsandbytes does (blockwise 8-bit dequantize, plus the offset)."""
        qs = self.quant_state
        if not qs.nested:
            return qs.absmax if qs.absmax.dtype == torch.float32 else qs.absmax.float()
        import bitsandbytes.functional as bnbF

        return (bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()

    def dense(self, dtype: torch.dtype) -> Tensor:
        """A transient ``W`` [N, K] in ``dtype`` by bitsandbytes' own dequantize kernel (the
        one its ``matmul_4bit`` runs), decoded straight into ``dtype``.

        One exception: bitsandbytes 0.50's AVX512 CPU kernel decodes wrongly when a
        quantization block straddles two rows (K not a multiple of blocksize; its own
        quantize -> dequantize round trip then errs by O(1)), so on the CPU those shapes
        take ``_dense_flat``, the layout's definition (bitsandbytes' generic and CUDA path)."""
        if self.device.type == "cpu" and self.shape[1] % self.blocksize != 0:
            return self._dense_flat(dtype)
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.packed, self.absmax(), self.blocksize, self.quant_type, self.shape, dtype
        )

    def _dense_flat(self, dtype: torch.dtype) -> Tensor:
        """``table[code(i)] * absmax[i // blocksize]`` over the flat index, in fp32, then
        ``dtype``; the table is bitsandbytes' ``get_4bit_type``."""
        import bitsandbytes.functional as bnbF

        N, K = self.shape
        codes = torch.stack((self.packed >> 4, self.packed & 15), dim=-1).reshape(-1)[: N * K]
        table = bnbF.get_4bit_type(self.quant_type, device=self.device)
        scale = self.absmax().repeat_interleave(self.blocksize)[: N * K]
        return (table[codes.long()] * scale).reshape(N, K).to(dtype)

    def kernel_args(self) -> dict:
        """What the Triton 4-bit tile loader reads: the packed codes, the absmax (uint8 codes
        plus their 256-entry code table, per-block fp32 scale and fp32 offset when nested;
        fp32 otherwise, with the other pointers aliased and unread), the blocksizes and the
        constexpr ``BASE`` of the loaders ("nf4", "fp4", "_dq" appended when nested). All
        tensors stay on the device: no host sync."""
        qs = self.quant_state
        if qs.nested:
            state2 = qs.state2
            absmax, code2, absmax2 = qs.absmax, state2.code.float(), state2.absmax.float()
            offset = qs.offset.reshape(1).float()
            nested_blocksize = int(state2.blocksize)
        else:
            absmax = qs.absmax.float()
            code2 = absmax2 = offset = absmax
            nested_blocksize = 1
        return dict(
            packed=self.packed, absmax=absmax, code2=code2, absmax2=absmax2, offset=offset,
            blocksize=self.blocksize, nested_blocksize=nested_blocksize,
            BASE=self.quant_type + ("_dq" if qs.nested else ""),
        )  # fmt: skip


@dataclass(frozen=True)
class BlockFp8:
    """An FP8 weight: ``codes`` float8_e4m3fn [N, K], ``scale_inv`` [ceil(N/bn), ceil(K/bk)]
    (fp32, or transformers' ue8m0 exponents, read as fp32)."""

    codes: Tensor
    scale_inv: Tensor
    block_size: tuple[int, int]

    kind = "fp8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def compute_dtype_for(self, x: Tensor) -> torch.dtype:
        return x.dtype

    def scales(self) -> Tensor:
        return self.scale_inv if self.scale_inv.dtype == torch.float32 else self.scale_inv.float()

    def dense(self, dtype: torch.dtype) -> Tensor:
        """A transient ``W`` [N, K] in ``dtype`` in a reused workspace (``fastlora.fp8.
        transient``): valid until the next decode on this thread; backward decodes again."""
        return fp8.transient(self.codes, self.scales(), self.block_size, dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """``W`` [N, K] in ``dtype`` in a fresh tensor (for a merge)."""
        return fp8.dequantize(self.codes, self.scales(), self.block_size, dtype)

    def kernel_args(self) -> dict:
        """What the Triton FP8 tile loader reads, in the 4-bit loader's keys (the launchers
        pass both the same way): the codes as uint8 [N, K] (``codes``: what the GEMMs read
        W through), the fp32 scales [ceil(N/bn), ceil(K/bk)] as ``absmax`` (the other
        pointers alias it, unread), ``blocksize`` = bn, ``nested_blocksize`` = bk and
        ``BASE`` "e4m3"."""
        scale = self.scales().contiguous()
        return dict(codes=self.codes.view(torch.uint8), absmax=scale, code2=scale,
                    absmax2=scale, offset=scale, blocksize=self.block_size[0],
                    nested_blocksize=self.block_size[1], BASE="e4m3")  # fmt: skip


Base = Union[Dense, Packed4bit, BlockFp8]


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {type(t).__name__} of dtype {t.dtype} and shape {tuple(t.shape)}"
    return type(t).__name__


def _check_4bit(weight: Tensor, name: str) -> Packed4bit:
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError(
            f"{name}: a bitsandbytes 4-bit weight needs its quant_state, got "
            f"{_describe(weight)} with quant_state=None (not quantized yet: move the "
            "Linear4bit to its device, e.g. .to('cpu') or .cuda(), to quantize it)"
        )
    quant_type = getattr(qs, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"{name}.quant_state.quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}"
        )
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError(
            f"{name}: the weight is in bitsandbytes' CPU inference packing (a Linear4bit ran "
            "under no_grad in eval mode on an AVX512-BF16 CPU); FastLoRALinear.from_linear "
            "restores the standard layout, or call "
            "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse"
        )
    blocksize = getattr(qs, "blocksize", None)
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"{name}.quant_state.blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}"
        )
    shape = tuple(getattr(qs, "shape", None) or ())
    if len(shape) != 2:
        raise ValueError(
            f"{name}.quant_state.shape: expected the 2-D [out_features, in_features] of the "
            f"weight, got {shape}"
        )
    N, K = (int(s) for s in shape)
    packed = weight.detach().reshape(-1)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. for FSDP)
        packed = packed.view(torch.uint8)
    if packed.numel() != (N * K + 1) // 2:
        raise ValueError(
            f"{name}: a 4-bit [{N}, {K}] weight packs into {(N * K + 1) // 2} bytes, got "
            f"{packed.numel()} (the data does not belong to this quant_state)"
        )
    absmax = getattr(qs, "absmax", None)
    blocks = -(-N * K // blocksize)
    if not isinstance(absmax, Tensor) or absmax.numel() != blocks:
        got = tuple(absmax.shape) if isinstance(absmax, Tensor) else type(absmax).__name__
        raise ValueError(
            f"{name}.quant_state.absmax: expected {blocks} scales (one per {blocksize} of the "
            f"{N * K} codes), got {got}"
        )
    if qs.nested and (qs.state2 is None or qs.offset is None):
        raise ValueError(
            f"{name}.quant_state: double quantization needs state2 and offset, got "
            f"state2={qs.state2!r}, offset={qs.offset!r}"
        )
    for what, t in (("absmax", absmax), ("packed data", packed)):
        if t.device != weight.device:
            raise ValueError(
                f"{name}.quant_state: {what} is on {t.device}, the weight on {weight.device}"
            )
    return Packed4bit(weight, packed, qs, quant_type, int(blocksize), (N, K))


def _check_fp8(weight: Tensor, name: str) -> BlockFp8:
    scale = getattr(weight, "fp8_scale_inv", None)
    if weight.dtype != fp8.E4M3:
        raise TypeError(
            f"{name}: an FP8 weight (it carries fp8_scale_inv) must hold float8_e4m3fn codes, "
            f"got {_describe(weight)} (a dtype cast such as model.to(torch.bfloat16) converts "
            "FP8 codes too: move FP8 models with .to(device) only)"
        )
    if scale is None:
        raise ValueError(
            f"{name}: a float8_e4m3fn weight needs its block scales, got {_describe(weight)} "
            "without fp8_scale_inv (wrap the FP8Linear with FastLoRALinear.from_linear, or "
            "mark the weight with fastlora.fp8.attach(weight, weight_scale_inv))"
        )
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected FP8 codes [out_features, in_features], got {_describe(weight)}")
    block = fp8.block_size_of(getattr(weight, "fp8_block_size", None), f"{name}.fp8_block_size")
    want = fp8.scale_shape(weight.shape, block)
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise TypeError(f"{name}.fp8_scale_inv: expected a float tensor, got {_describe(scale)}")
    if scale.numel() == 1 and want == (1, 1):
        scale = scale.reshape(1, 1)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"{name}.fp8_scale_inv: expected shape {list(want)} (one scale per {block[0]}x"
            f"{block[1]} block of the {list(weight.shape)} weight), got {list(scale.shape)}"
        )
    if scale.device != weight.device:
        raise ValueError(f"{name}.fp8_scale_inv: is on {scale.device}, the weight on {weight.device}")
    return BlockFp8(weight.detach(), scale.detach(), block)


def base_of(weight: object, name: str = "weight") -> Base:
    """The base kind of ``weight``, checked: ``TypeError``/``ValueError`` naming ``name``,
    what was expected and what came."""
    if is_fp8(weight):
        return _check_fp8(weight, name)
    if isinstance(weight, Tensor) and is_4bit(weight):
        return _check_4bit(weight, name)
    if isinstance(weight, Tensor) and weight.dtype == torch.uint8:
        raise ValueError(
            f"{name}: got a uint8 tensor of shape {tuple(weight.shape)} without a quant_state; "
            "a 4-bit weight must be bitsandbytes' Params4bit with its quant_state "
            "(Linear4bit.weight), a dense weight a floating-point tensor"
        )
    return Dense(weight)  # the functional op checks dense weights like any other tensor


def check_compute_dtype(base: Base, x: Tensor, name: str = "x") -> None:
    """A 4-bit base decodes into ``x``'s dtype: it must be one bitsandbytes decodes into;
    an FP8 base decodes into float16, bfloat16, float32 or float64."""
    if base.kind == "fp8" and x.dtype not in FP8_COMPUTE_DTYPES:
        raise TypeError(
            f"{name}: an FP8 weight computes in x's dtype (the compute dtype), expected one "
            f"of float16, bfloat16, float32, float64, got {x.dtype}"
        )
    if base.kind == "4bit" and x.dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"{name}: a 4-bit weight computes in x's dtype (the compute dtype), expected one "
            f"of float16, bfloat16, float32, got {x.dtype}"
        )


def dense_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``W`` [N, K] in ``dtype`` for the torch path: the weight itself when dense, a fresh
    transient decode when 4-bit, a decode into the reused workspace when FP8 (call again
    in backward; keep nothing)."""
    if not is_quantized(weight):
        return weight
    return base_of(weight).dense(dtype)


def out_in_features(weight: Tensor) -> tuple[int, int]:
    """(N, K) of a dense or 4-bit weight."""
    if is_4bit(weight):
        return base_of(weight).shape
    return tuple(weight.shape)


def quantize_4bit(weight: Tensor, kind: str, blocksize: int = 64) -> Tensor:
    """A bitsandbytes ``Params4bit`` of the dense ``weight`` [N, K] for a kernel ``BASE``
    kind ("nf4", "fp4", "_dq" appended for double quantization); used to time a shape."""
    import bitsandbytes as bnb

    quant_type, nested = kind.removesuffix("_dq"), kind.endswith("_dq")
    return bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                             compress_statistics=nested, quant_type=quant_type).to(weight.device)


# ---------------------------------------------------------------------------------- modules


def is_linear4bit(module: object) -> bool:
    """bitsandbytes' ``Linear4bit`` (and its LinearNF4/LinearFP4 subclasses)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def restore_standard_packing(module: Any) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a ``Linear4bit`` weight in place (it
    repacks when the layer runs under no_grad in eval mode on an AVX512-BF16 CPU), so the
    weight is in the layout every 4-bit path reads; bitsandbytes does the same on save.
    True when the weight was repacked (its scales were rounded to bf16 then: see
    ``warn_repacked``)."""
    qs = getattr(module.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbF

        module.weight.data, module.weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(
            module.weight.data, qs
        )
        module.quant_state = module.weight.quant_state
        return True
    return False


def warn_repacked(names: list[str], where: str, stacklevel: int = 3) -> None:
    """The warning for 4-bit weights that bitsandbytes had repacked for CPU inference: the
    repacking rounds each block's scale (absmax) to bfloat16, so the base no longer holds the
    weights it was quantized to, and undoing the layout cannot bring them back."""
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    warnings.warn(
        f"{where}: the 4-bit base weights of {shown} lost precision: bitsandbytes repacked them "
        "for its AVX512-BF16 CPU inference path (the first eval-mode forward under no_grad), "
        "rounding their scales to bfloat16. fastlora restored the standard layout, but not the "
        "rounded scales. To keep the base exact, apply the adapter (apply_lora, load_adapter, "
        "from_peft) before any eval forward, or set `module.support_avx512bf16_for_cpu = False` "
        "on every bitsandbytes Linear4bit right after loading the model (or reload it)",
        UserWarning,
        stacklevel=stacklevel,
    )


def keep_training_layout(model: Any, where: str = "apply_lora") -> None:
    """Turn off bitsandbytes' eval-mode CPU shortcut on every ``Linear4bit`` of ``model``: on
    AVX512-BF16 CPUs it repacks a weight in place the first time the layer runs under
    no_grad in eval mode, and a later training step through that layer fails (bitsandbytes
    0.50: an in-place bias add on a leaf view). GPU runs are unaffected. Weights repacked
    already are restored, with a warning (``warn_repacked``) naming them for ``where``."""
    repacked = []
    for name, module in model.named_modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and is_4bit(module.weight):
            if restore_standard_packing(module):
                repacked.append(name)
            module.support_avx512bf16_for_cpu = False
    if repacked:
        warn_repacked(repacked, where, stacklevel=4)


def module_compute_dtype(module: Any) -> Optional[torch.dtype]:
    """A ``Linear4bit``'s ``compute_dtype`` (``bnb_4bit_compute_dtype``), or None."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype: expected one of float16, bfloat16, float32, got {dtype}"
        )
    return dtype


def quantized_from_dtype(weight: Tensor) -> torch.dtype:
    """The float dtype a 4-bit ``weight`` was quantized from (``quant_state.dtype``): the
    model's own dtype; float32 when bitsandbytes did not record one it decodes into."""
    dtype = getattr(base_of(weight).quant_state, "dtype", None)
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def factor_dtype(module: Any) -> torch.dtype:
    """The dtype a 4-bit layer's LoRA factors get: its compute dtype if set, else the dtype
    the weight was quantized from (what a dense weight would have had)."""
    dtype = module_compute_dtype(module)
    if dtype is None:
        dtype = base_of(module.weight).quant_state.dtype
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def fp8_factor_dtype(module: Any) -> torch.dtype:
    """The dtype an FP8 layer's LoRA factors (and its merge) get: the dtype its weight was
    quantized from (``Fp8Linear.orig_dtype``), else its bias's, else float32."""
    dtype = getattr(module, "orig_dtype", None)
    if dtype is None and getattr(module, "bias", None) is not None:
        dtype = module.bias.dtype
    return dtype if dtype in FP8_COMPUTE_DTYPES else torch.float32
