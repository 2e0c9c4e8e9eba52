"""Dropout masks for the torch backend, kept as one bit per element.

The mask is drawn once from torch's generator for the tensor's device (so
``torch.manual_seed`` reproduces a run), packed eight elements to a byte for backward, and
unpacked on demand. ``D(x)`` itself is never stored.

Each element gets a 16-bit uniform draw (four per 64-bit word: on the CPU, the generator's
cost is per call, so this is ~4x cheaper than one float per element). The drop rate is thus
``p`` rounded to a multiple of 2**-16; ``keep_scale`` returns ``1 / (1 - p_rounded)`` so that
``E[D(x)] = x`` holds exactly.
"""

from __future__ import annotations

import sys

import torch

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
    words = torch.randint(-(2**63), 2**63 - 1, (rows, padded // 4), device=device, dtype=torch.int64)
    # four independent int16 lanes per word, uniform on [-2**15, 2**15)
    keep = words.view(torch.int16) >= _threshold(p) - _LEVELS // 2
    return pack_mask(keep)


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
