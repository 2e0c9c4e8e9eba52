"""The one kernel the ahead-of-time build adds: ``out = ws.sum(0).to(out.dtype)``.

The Python launchers reduce the dA/dB split-M partials with ``torch.sum``; a C library has
no torch, so this kernel does that step: ``ws`` fp32 [SPLITS, NUMEL] -> ``out`` [NUMEL]
in the adapter dtype, splits summed in order 0, 1, ... in fp32, one rounding at the store.
"""

from __future__ import annotations

import triton
import triton.language as tl

# elements per program: 4 warps x 32 lanes x 8 fp32 (two 16-byte loads per lane)
SUM_BLOCK = 1024
SUM_NUM_WARPS = 4


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, SPLITS, NUMEL, BLOCK: tl.constexpr):
    """out[NUMEL] = sum over s of ws[s, :] (fp32), cast to out's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(ws_ptr + s.to(tl.int64) * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
