"""An independent NumPy Philox4x32-10 (Salmon et al., SC'11) for checking the Triton dropout
mask without running the code under test: the keep bit of (seed, row, col) as the kernels
document it (``kernels/lora_forward.py``, ``dropout_keep``)."""

from __future__ import annotations

import numpy as np

# Philox4x32 constants (Random123): round multipliers and Weyl key increments
_MUL_A, _MUL_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)
# Triton's uint_to_uniform_float for 32-bit draws: the largest scale with (2**31 - 1) * scale < 1
_UNIFORM_SCALE = np.float32(4.6566127342e-10)


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Four uint32 arrays: Philox4x32 of counter (c0, c1, c2, c3) under the 64-bit key ``seed``."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in np.broadcast_arrays(c0, c1, c2, c3))
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            p0, p2 = _MUL_A * c0, _MUL_B * c2  # exact 64-bit products of 32-bit values
            c0, c1, c2, c3 = (
                (p2 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
                p2 & _LO32,
                (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
                p0 & _LO32,
            )
            k0, k1 = k0 + _KEY_A, k1 + _KEY_B
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def uniform(bits: np.ndarray) -> np.ndarray:
    """uint32 draws -> float32 in [0, 1): the sign-folded 31-bit value times the scale, in fp32."""
    signed = bits.view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    return folded.astype(np.float32) * _UNIFORM_SCALE


# which of Philox's four outputs serves column 4g + i of a group g
LANE_OF_COLUMN = (0, 2, 1, 3)


def keep_mask(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """bool [rows, cols]: element (row, col) is kept iff uniform(Philox(seed; col // 4, row,
    0, 0)[LANE_OF_COLUMN[col % 4]]) >= p (p as float32)."""
    groups = -(-cols // 4)
    g = np.arange(groups, dtype=np.uint64)[None, :]
    r = np.arange(rows, dtype=np.uint64)[:, None]
    draws = philox4x32(seed, g, r, 0, 0)
    lanes = np.stack([draws[i] for i in LANE_OF_COLUMN], axis=-1).reshape(rows, groups * 4)
    return uniform(lanes[:, :cols]) >= np.float32(p)
