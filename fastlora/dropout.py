"""Dropout masks for the torch backend, kept as one bit per element.

The mask is drawn once from torch's generator for the tensor's device (so
``torch.manual_seed`` reproduces a run), packed eight elements to a byte for backward, and
unpacked on demand. ``D(x)`` itself is never stored.

Each element gets a 16-bit uniform draw (four per 64-bit word). On the CPU, numpy's PCG64
seeded by one draw from torch's generator makes the words and numpy packs them: torch's CPU
generator (mt19937) costs ~6 ns a word and PCG64 ~2 ns, which with numpy's vectorized compare
and ``packbits`` takes a mask from ~4 ms to ~1.7 ms at 2048 x 1024. The drop rate is thus
``p`` rounded to a multiple of 2**-16; ``keep_scale`` returns ``1 / (1 - p_rounded)`` so that
``E[D(x)] = x`` holds exactly.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fastlora._scratch import scratch

_BITS = 8
_LEVELS = 1 << 16  # resolution of one uniform draw


def _threshold(p: float) -> int:
    return round(p * _LEVELS)


def keep_scale(p: float) -> float:
    """The factor ``1 / (1 - p)`` for the rate the mask is actually drawn with."""
    return _LEVELS / (_LEVELS - _threshold(p))


# lookup tables of unpack_mask, one per (dtype, device); building one on the device once
# avoids a host-to-device copy (a stream sync on CUDA) in every call
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row b holds the eight 0/1 values of b's bits: [256, 8] in ``dtype``, or for bool
    [256, 1] int64 holding the eight bytes (one embedding lookup per packed byte)."""
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        byte = torch.arange(256, device=device).unsqueeze(-1)
        bits = (byte >> torch.arange(_BITS, device=device)) & 1
        table = bits.to(torch.uint8).view(torch.int64) if dtype == torch.bool else bits.to(dtype)
        _TABLES[key] = table
    return table


def draw_packed_mask(rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask ``m ~ Bernoulli(1 - p)`` for a [rows, cols] input, packed to
    [rows, ceil(cols / 8)] uint8 (bit j of byte c is element 8c + j)."""
    padded = -(-cols // _BITS) * _BITS
    # four independent int16 lanes per 64-bit word, uniform on [-2**15, 2**15): kept if >= low
    low = _threshold(p) - _LEVELS // 2
    if torch.device(device).type == "cpu":
        seed = torch.randint(0, 2**62, (1,))  # from torch's generator: manual_seed reproduces
        # under torch.compile the numpy draw runs as an opaque op, so the mask stays eager's
        draw = _cpu_packed_op if torch.compiler.is_compiling() else _cpu_packed
        return draw(seed, rows, padded, low)
    words = torch.randint(-(2**63), 2**63 - 1, (rows, padded // 4), device=device, dtype=torch.int64)
    return pack_mask(words.view(torch.int16) >= low)


def _cpu_packed(seed: torch.Tensor, rows: int, cols: int, low: int) -> torch.Tensor:
    """The packed keep mask [rows, cols / 8] (cols % 8 == 0) of 16-bit lanes >= ``low`` from
    numpy's PCG64 seeded with ``seed`` (one int64)."""
    # a CPU tensor read through numpy: no device, so no sync, and no aten op either
    words = np.random.PCG64(int(seed.numpy()[0])).random_raw(rows * cols // 4)  # 64 bits each
    keep = words.view(np.int16).reshape(rows, cols) >= low
    return torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little"))


_cpu_packed_op = torch.library.custom_op("fastlora::cpu_packed_mask", _cpu_packed, mutates_args=())


@_cpu_packed_op.register_fake
def _(seed, rows, cols, low):
    return seed.new_empty(rows, cols // _BITS, dtype=torch.uint8)


# Eight 0/1 bytes read as one little-endian int64 word w (byte j = element 8c + j): the
# product w * _GATHER puts byte j's bit at bit 56 + j (its other shifted copies fall below bit
# 56 without carrying into it, or overflow past bit 63), so (w * _GATHER) >> 56 is the packed
# byte. Three elementwise passes instead of fifteen.
_GATHER = 0x0102040810204080


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] with cols % 8 == 0 -> uint8 [rows, cols / 8]."""
    rows, cols = keep.shape
    if sys.byteorder == "little" and keep.is_contiguous():
        words = keep.view(torch.uint8).view(torch.int64)  # [rows, cols / 8]
        return ((words * _GATHER) >> 56).to(torch.uint8)
    lanes = keep.view(torch.uint8).view(rows, cols // _BITS, _BITS)
    packed = lanes[..., 0].clone()
    for j in range(1, _BITS):
        packed |= lanes[..., j] << j
    return packed


def unpack_mask(packed: torch.Tensor, cols: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """uint8 [rows, ceil(cols / 8)] -> [rows, cols] of 0/1 in ``dtype`` (a floating dtype
    makes products with the mask plain multiplies, with no per-call type conversion)."""
    rows, width = packed.shape[0], packed.shape[1] * _BITS
    lanes = torch.nn.functional.embedding(packed.long(), _byte_table(dtype, packed.device))
    if dtype == torch.bool:
        lanes = lanes.view(torch.bool)
    return lanes.view(rows, width)[:, :cols]


def unpack_mask_into(packed: torch.Tensor, cols: int, buffer: torch.Tensor) -> torch.Tensor:
    """``unpack_mask(packed, cols, buffer.dtype)`` written into ``buffer`` (flat, floating, at
    least ``rows * 8 * ceil(cols / 8)`` elements) instead of a fresh tensor; returns the
    [rows, cols] view of it. For callers that keep a buffer alive across calls: on the CPU a
    fresh 0/1 mask costs its page faults on top of the write."""
    rows, width = packed.shape[0], packed.shape[1] * _BITS
    lanes = buffer[: rows * width].view(rows * packed.shape[1], _BITS)
    table = _byte_table(buffer.dtype, buffer.device)
    torch.index_select(table, 0, packed.reshape(-1).int(), out=lanes)
    return lanes.view(rows, width)[:, :cols]


def keep_in_scratch(packed: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``unpack_mask(packed, cols, dtype)`` (a floating ``dtype``) in this thread's "mask"
    scratch buffer (``fastlora._scratch``): valid until the next call, so a caller uses it,
    or forms ``x * mask`` in it in place, before asking again."""
    numel = packed.shape[0] * packed.shape[1] * _BITS
    return unpack_mask_into(packed, cols, scratch("mask", numel, dtype, packed.device))
