"""Tile configurations of the LoRA kernels: the one list autotune, the report and a
later ahead-of-time build all read, so what is tuned is what is checked.

Block names per kernel (the loop dimension is the one each program walks):

    shrink   u  [M, r]  tiles BLOCK_M,            loop over K in BLOCK_K
    forward  y  [M, N]  tiles BLOCK_M x BLOCK_N,  loop over K in BLOCK_K
    dy       g  [M, r]  tiles BLOCK_M,            loop over N in BLOCK_N (and dB partials)
    dx       dx [M, K]  tiles BLOCK_M x BLOCK_K,  loop over N in BLOCK_N (and dA partials)
    reduce   dA, dB     tiles REDUCE_BLOCK elements, loop over the partials

There is no autotuner at launch time: ``pick`` chooses a config from the shape (like
cuBLAS's heuristics), so the launch path stays a dictionary lookup and the number of
dA/dB partials, hence their summation order and bits, depends on the shape alone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# tl.dot needs every dimension >= 16 (mma.sync m16n8k16 / wgmma k16 for 16-bit operands),
# so the rank r is padded up to this inside the kernels, then to a power of two (tl.arange).
MMA_MIN_R = 16
MAX_R = 128
# Grouped program order along M (Triton matmul tutorial): 8 row-tiles share W tiles in L2.
GROUP_M = 8
# Elements of dA or dB one program of the reduce kernel sums over the partials.
REDUCE_BLOCK = 1024
# The interpreter runs every program in numpy, each tl op a call with a fixed cost: 32-wide
# tiles mean 4-8x fewer calls than 16 on the test shapes, which still span several tiles.
INTERPRET_BLOCK = 32
# A persistent grid wants this many tiles per program before it beats one program a tile.
PERSISTENT_MIN_WAVES = 1
# Usable shared memory per block (bytes): cudaDevAttrMaxSharedMemoryPerBlockOptin.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

KERNELS = ("shrink", "forward", "dy", "dx", "reduce")
# the backward candidates' kernels (kernels/backward_candidates.py): "_split" builds read
# the split dy pass's fp32 g partials
CANDIDATE_KERNELS = ("dy_split", "dx_gemm", "dx_gemm_p0", "dx_gemm_split", "tail", "tail_split",
                     "forward_ws")
# DoRA's row norms (kernels/dora_norm.py): fp32 arithmetic whatever W's dtype, one table
DORA_NORM = "dora_norm"
# kernels whose main loop is a big GEMM (the report holds them to a wgmma wait depth >= 1)
GEMM_KERNELS = ("forward", "dx")
CANDIDATE_GEMM_KERNELS = ("dx_gemm", "dx_gemm_p0", "dx_gemm_split", "forward_ws")
# kernels whose tile loop Triton warp-specializes: a producer partition issues the loads
WARP_SPEC_KERNELS = ("forward_ws",)
# the report (python -m fastlora.kernels.report) builds every kernel of these
KERNELS += CANDIDATE_KERNELS + (DORA_NORM,)
GEMM_KERNELS += CANDIDATE_GEMM_KERNELS
R_PADS = (16, 32, 64, 128)


# read once: the launch path asks on every call, and Triton reads it at import too
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` was set when the kernels were imported."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) (``triton.cdiv`` is a constexpr function, slow from Python)."""
    return -(-a // b)


def pad_rank(r: int) -> int:
    """r -> the constexpr rank block: >= MMA_MIN_R, a power of two (tl.arange)."""
    if not 1 <= r <= MAX_R:
        raise ValueError(f"fastlora triton kernels support 1 <= r <= {MAX_R}, got r={r}")
    p = MMA_MIN_R
    while p < r:
        p *= 2
    return p


def max_r_pad(kind: str) -> int:
    """Largest rank block the kernels have configs for, per operand kind."""
    return FP32_MAX_R_PAD if kind == "fp32" and not interpreting() else MAX_R


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    why: str
    max_r_pad: int = MAX_R  # register guard: big tiles only with small ranks
    min_r_pad: int = MMA_MIN_R  # configs made for the largest rank block only
    # persistent (TMA) build: flatten the tile and K loops into one.  Off: flattening
    # multi-buffers the epilogue operands (u, B^T) per stage, past 227 KB at r_pad 64.
    flatten: bool = False
    builds: str = "ptr tma"  # the builds that launch it: "ptr" (cp.async), "tma" (sm_90)

    def meta(self, kernel: str) -> dict:
        """The constexpr block arguments this kernel takes."""
        names = {
            "shrink": ("BLOCK_M", "BLOCK_K"),
            "forward": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "forward_ws": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "dy": ("BLOCK_M", "BLOCK_N"),
            "dx": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "reduce": (),
            "dy_split": ("BLOCK_M", "BLOCK_N"),
            "dx_gemm": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "tail": ("BLOCK_M", "BLOCK_K"),
            "dora_norm": ("BLOCK_N", "BLOCK_K"),
            "sgmv_shrink": ("BLOCK_M", "BLOCK_C"),
            "sgmv_expand": ("BLOCK_M", "BLOCK_C"),
            "sgmv_segment": ("BLOCK_M", "BLOCK_C"),
        }[kernel.removesuffix("_split").removesuffix("_p0")]
        vals = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "BLOCK_C": self.block_n}  # SGMV's column block is block_n
        return {n: vals[n] for n in names}


T = TileConfig
SMALL_R = 64  # r_pad up to this: the big tiles fit registers; r_pad 128 gets its own
# ``max_r_pad``/``min_r_pad``: a config is launched only for rank blocks in that range.
# Every config here compiles without spills for sm_80 and sm_90 (python -m
# fastlora.kernels.report); the r ranges are where ptxas showed the next rank block spilling.
# 16-bit operands (fp16, bf16): tensor-core tiles.
_CONFIGS_16 = {
    "forward": [
        T(128, 256, 64, 8, 3, "large M and N: the tutorial's best fp16 tile on H100 (sm_80's "
          "mma.sync accumulators spill in it)", SMALL_R, builds="tma"),
        T(128, 128, 64, 4, 4, "all-round square tile, deep pipeline", 16, builds="tma"),
        T(128, 128, 64, 8, 3, "square tile, 8 warps: every rank block on both builds"),
        T(64, 128, 64, 4, 4, "mid M (a few hundred rows): twice the CTAs of 128-row tiles",
          SMALL_R),
        T(32, 64, 128, 4, 4, "small M (decode, short sequences): many CTAs along N, long K "
          "steps; below wgmma's 64 rows, its TMA build spills", builds="ptr"),
    ],
    "shrink": [
        T(128, 0, 64, 4, 3, "large M: one CTA per 128 rows (r_pad 64 spills with fp32 A)", 32),
        T(64, 0, 128, 4, 3, "mid M: more CTAs, longer K steps", SMALL_R),
        T(64, 0, 64, 8, 3, "r_pad 128: u [64, 128] fp32 over 8 warps", min_r_pad=MAX_R),
        T(16, 0, 128, 4, 3, "small M: the K loop is the whole job, long steps (256 spills "
          "with fp32 A)", SMALL_R),
        T(16, 0, 64, 4, 3, "small M, r_pad 128", min_r_pad=MAX_R),
    ],
    "dx": [
        T(128, 128, 64, 8, 3, "large M: dx tile 128 x 64, N steps of 128", SMALL_R,
          builds="tma"),
        T(64, 64, 64, 8, 3, "mid and small M, and r_pad 128", builds="tma"),
        T(128, 128, 32, 8, 3, "large M: dx tile 128 x 32 (sm_80's mma.sync spills at 64 "
          "columns with the dA epilogue)", SMALL_R, builds="ptr"),
        T(64, 128, 32, 8, 3, "mid and small M, and r_pad 128", builds="ptr"),
    ],
    "dy": [
        T(128, 32, 0, 8, 3, "large M: 128-row tiles (256 spill with fp32 adapters)", SMALL_R),
        T(64, 32, 0, 8, 3, "small M", SMALL_R),
        T(64, 16, 0, 8, 3, "r_pad 128: g and the dB partial over 8 warps", min_r_pad=MAX_R),
    ],
    "reduce": [T(0, 0, 0, 4, 1, "sums partials: memory-bound, no tiles")],
}
# fp32 operands with TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32): the
# streamed dimension is halved so the pipelined tiles fit the same shared memory.
_CONFIGS_TF32 = {
    "forward": [
        T(128, 128, 32, 8, 3, "large M and N", SMALL_R),
        T(64, 128, 32, 4, 4, "mid M (r_pad 64 spills on sm_80)", 32),
        T(64, 64, 32, 4, 3, "r_pad 128, and mid M on narrow layers"),
        T(32, 64, 64, 4, 4, "small M: many CTAs along N"),
    ],
    "shrink": [
        T(128, 0, 32, 4, 3, "large M", SMALL_R),
        T(64, 0, 64, 4, 3, "mid M", SMALL_R),
        T(64, 0, 32, 8, 3, "large M, r_pad 128", min_r_pad=MAX_R),
        T(16, 0, 128, 4, 3, "small M: long K steps", SMALL_R),
        T(16, 0, 64, 4, 3, "small M, r_pad 128", min_r_pad=MAX_R),
    ],
    # pointer build only: tf32 wgmma reads B K-major, and a TMA-loaded W tile [BN, BK] of
    # dy W is N-major, so the compiler transposes through registers and waits with depth 0
    "dx": [
        T(128, 64, 32, 8, 3, "large M: dx tile 128 x 32", SMALL_R, builds="ptr"),
        T(64, 64, 32, 8, 3, "mid and small M, and r_pad 128", builds="ptr"),
    ],
    "dy": [
        T(128, 16, 0, 8, 3, "large M", SMALL_R),
        T(64, 16, 0, 8, 3, "small M, and r_pad 128"),
    ],
    "reduce": [T(0, 0, 0, 4, 1, "sums partials")],
}
# fp32 with IEEE products (TF32 off): no tensor cores, tl.dot becomes FMA loops whose
# operands live in registers, so only small tiles and r_pad <= FP32_MAX_R_PAD fit (r_pad 128
# spilled in every tile tried).  cuBLAS SGEMM usually wins here and the per-shape pick will
# say so; these exist so the fused path is correct when chosen or forced.
FP32_MAX_R_PAD = 64
_CONFIGS_FP32 = {
    "forward": [T(32, 32, 32, 4, 3, "the FMA tile that fits registers up to r_pad 64")],
    "shrink": [T(32, 0, 32, 4, 3, "FMA tile")],
    "dx": [
        T(32, 32, 32, 4, 3, "FMA tile", builds="tma"),
        T(32, 16, 32, 4, 3, "FMA tile (N steps of 32 spill in the pointer build)",
          builds="ptr"),
    ],
    "dy": [T(32, 16, 0, 4, 3, "FMA tile (32 columns spill)")],
    "reduce": [T(0, 0, 0, 4, 1, "sums partials")],
}
_TABLES = {"16bit": _CONFIGS_16, "tf32": _CONFIGS_TF32, "fp32": _CONFIGS_FP32}

# The backward candidates' kernels (kernels/backward_candidates.py):
#   dy_split  g / dB partials  tiles BLOCK_M rows x a column split, loop over it in BLOCK_N
#   dx_gemm   dx [M, K]        tiles BLOCK_M x BLOCK_K, loop over N in BLOCK_N (pure GEMM)
#   tail      dA [r, K]        tiles BLOCK_K columns, loop over M in BLOCK_M (and dB's sum)
_CANDIDATE_CONFIGS = {
    "16bit": {
        "dx_gemm": [
            T(128, 64, 128, 8, 4, "large M: two warpgroups of 64 x 128 (r_pad 128 spills)",
              SMALL_R, builds="tma"),
            T(64, 64, 128, 4, 4, "mid and small M: one warpgroup (r_pad 128 spills)", SMALL_R,
              builds="tma"),
            T(64, 64, 64, 4, 3, "r_pad 128 (sm_90), and mid and small M", builds="tma"),
            T(128, 64, 128, 8, 3, "large M (sm_80, unaligned operands; r_pad 128 spills)",
              SMALL_R, builds="ptr"),
            T(64, 64, 64, 8, 3, "mid and small M, and r_pad 128 (4 warps spill)",
              builds="ptr"),
        ],
        # the warp-specialized forward (sm_90 TMA build): Triton 3.9 specializes 4 warps
        # only (8, or a flattened loop, and the PTX is the plain build's)
        "forward_ws": [
            T(128, 128, 64, 4, 3, "one consumer warpgroup, the producer's 3 stages (u and B "
              "tiles staged too: r_pad 64 with fp32 adapters needs 279 KB)", 32,
              builds="tma"),
        ],
        # without dropout (no Philox tile in registers beside the accumulator): the
        # cuBLAS-class tile, two consumer warpgroups of 64 x 256 (with the mask it spills; on
        # sm_80 the mma.sync accumulators spill in it)
        "dx_gemm_p0": [
            T(128, 64, 256, 8, 3, "large M and K, p = 0", 32, builds="tma"),
        ],
        "dy_split": [
            T(256, 64, 0, 8, 3, "large M: 256-row blocks, a quarter of the row pass's dB "
              "partials; 32 KB boxes (the pointer build spills)", 32, builds="tma"),
            T(128, 64, 0, 8, 3, "mid M", 32),
            T(64, 32, 0, 8, 3, "small M, and r_pad 64", SMALL_R),
            T(64, 16, 0, 8, 3, "r_pad 128: g and the dB partial over 8 warps", min_r_pad=MAX_R),
        ],
        "tail": [
            T(64, 0, 64, 4, 3, "wide K: 64-column programs walking M in 64-row steps",
              SMALL_R),
            T(64, 0, 32, 4, 3, "narrow K (more programs), and r_pad 128"),
        ],
    },
    # tf32: pointer builds of dx_gemm only (the N-major W tile cannot feed tf32 wgmma from
    # shared memory without a transpose through registers, as for "dx" above)
    "tf32": {
        "dx_gemm": [
            T(128, 32, 64, 8, 3, "large M", SMALL_R, builds="ptr"),
            T(64, 32, 64, 4, 3, "mid and small M, and r_pad 128", builds="ptr"),
        ],
        "dy_split": [
            T(128, 16, 0, 8, 3, "large M", 32),
            T(64, 16, 0, 8, 3, "small M, and r_pad >= 64"),
        ],
        "tail": [T(64, 0, 32, 4, 3, "32-column programs")],
    },
    "fp32": {
        "dx_gemm": [
            T(32, 32, 32, 4, 3, "FMA tile (r_pad 64 spills in the TMA build)", 32,
              builds="tma"),
            T(32, 16, 32, 4, 3, "FMA tile, and r_pad 64"),
        ],
        "dy_split": [T(32, 16, 0, 4, 3, "FMA tile")],
        "tail": [T(32, 0, 32, 4, 3, "FMA tile")],
    },
}
# DoRA's norm: rows of W per program (block_n) x K steps (block_k); every kind reads this
# table (the arithmetic is fp32 for any W)
_NORM_CONFIGS = [
    T(0, 32, 64, 8, 3, "wide layers: 32 rows a program, 64-column steps", 32, builds="ptr"),
    T(0, 32, 32, 8, 3, "r_pad 64: A's tile [64, 32] fp32", 64, 64, builds="ptr"),
    T(0, 16, 32, 4, 3, "narrow layers: twice the programs (r_pad 128 spills in every tile "
      "tried: the torch norm takes it)", SMALL_R, builds="ptr"),
]
for _table in _CANDIDATE_CONFIGS.values():
    _table["dora_norm"] = _NORM_CONFIGS
# the split dy pass's readers sum up to MAX_G_PARTS fp32 g partials per tile: they are
# launched up to SPLIT_MAX_R_PAD (larger ranks take the row pass: the "dx_gemm" candidate)
MAX_G_PARTS = 4
SPLIT_MAX_R_PAD = 32
for _kind, _table in _CANDIDATE_CONFIGS.items():
    _table["dx_gemm_split"] = _table["dx_gemm"]
    _table.setdefault("dx_gemm_p0", [])
    _table.setdefault("forward_ws", [])
    # the 32-column tail spills summing 4 fp32 g partials (sm_90 TMA build)
    _table["tail_split"] = [c for c in _table["tail"] if c.block_k != 32 or _kind != "16bit"]
    _table["dy_split"] = [c for c in _table["dy_split"] if c.min_r_pad <= SPLIT_MAX_R_PAD]
    _TABLES[_kind].update(_table)

# DoRA's own tiles where its variant needs more registers than LoRA's (every other
# (kind, kernel, variant) launches LoRA's table): with dropout the forward holds two
# [BM, BN] accumulators (x W^T and D(x) W^T), and the dy pass holds a z tile and its
# product with dy beside g and the dB partial.
_DORA_CONFIGS = {
    ("16bit", "forward", "dora_dropout"): [
        T(64, 64, 64, 8, 3, "two [64, 64] accumulators over 8 warps ([128, 64] spills on "
          "sm_80)"),
        T(32, 32, 64, 4, 3, "small M: many CTAs (below wgmma's 64 rows)", builds="ptr"),
    ],
    ("tf32", "forward", "dora_dropout"): [
        T(128, 64, 32, 8, 3, "large M: two [128, 64] accumulators over 8 warps", 32),
        T(64, 64, 32, 8, 3, "mid M, and r_pad >= 64"),
        T(32, 32, 64, 4, 3, "small M", builds="ptr"),
    ],
    ("fp32", "forward", "dora_dropout"): [
        T(16, 32, 32, 4, 3, "FMA tile, two accumulators"),
    ],
    ("16bit", "dy", "dora"): [
        T(128, 32, 0, 8, 3, "large M: dy and z tiles [128, 32] beside g", 32),
        T(64, 32, 0, 8, 3, "small M, and r_pad 64", SMALL_R),
        T(64, 16, 0, 8, 3, "r_pad 128: z and dy [64, 16] beside g", min_r_pad=MAX_R),
    ],
    # sm_90's DoRA dx holds dy scaled by c and g [BM, r_pad] beside the accumulator (two
    # with dropout): LoRA's 128-row tiles reach 255 registers and spill 16-144 B in the
    # cubins (cuobjdump), so DoRA's dx runs 64-row tiles, and narrower ones at r_pad 128
    ("16bit", "dx", "dora"): [
        T(64, 64, 64, 8, 3, "dx tile 64 x 64 (128 x 64 spills 16-24 B on sm_90)", SMALL_R,
          builds="tma"),
        T(64, 64, 32, 8, 3, "r_pad 128: dx tile 64 x 32", min_r_pad=MAX_R, builds="tma"),
        T(128, 128, 32, 8, 3, "large M: dx tile 128 x 32", SMALL_R, builds="ptr"),
        T(64, 64, 32, 8, 3, "mid and small M, and r_pad 128 (64 x 128 steps spill 32 B "
          "on sm_90)", builds="ptr"),
    ],
    ("16bit", "dx", "dora_dropout"): [
        T(64, 64, 64, 8, 3, "two [64, 64] accumulators (128 rows spill 32-144 B)", SMALL_R,
          builds="tma"),
        T(64, 32, 32, 8, 3, "r_pad 128: two [64, 32] accumulators (64 x 64 spills 16 B)",
          min_r_pad=MAX_R, builds="tma"),
        T(64, 64, 32, 8, 3, "two [64, 32] accumulators (128 x 32 spills 40 B on sm_90)",
          SMALL_R, builds="ptr"),
        T(64, 32, 32, 8, 3, "r_pad 128, N steps of 32", min_r_pad=MAX_R, builds="ptr"),
    ],
    ("tf32", "forward", "dora"): [
        T(128, 128, 32, 8, 3, "large M and N", SMALL_R),
        T(64, 128, 32, 4, 4, "mid M (r_pad 64 spills 16 B with z and the column scale)", 32),
        T(64, 64, 32, 4, 3, "r_pad >= 64, and mid M on narrow layers"),
        T(32, 64, 64, 4, 4, "small M: many CTAs along N"),
    ],
    # tf32 dx: dy scaled by c in registers cannot feed sm_90's wgmma from shared memory
    # (the main loop then waits with depth 0), so DoRA's tf32 dx runs the pointer build
    ("tf32", "dx", "dora"): [
        T(128, 32, 64, 8, 3, "large M and K", SMALL_R, builds="ptr"),
        T(64, 32, 64, 4, 3, "mid M (r_pad 64 spills 16 B with the column scale)", 32,
          builds="ptr"),
        T(32, 32, 64, 4, 3, "small M, and r_pad >= 64", builds="ptr"),
    ],
    ("tf32", "dx", "dora_dropout"): [
        T(64, 32, 32, 8, 3, "two [64, 32] accumulators over 8 warps", SMALL_R, builds="ptr"),
        T(32, 32, 32, 8, 3, "r_pad 128", builds="ptr"),
    ],
    ("fp32", "dy", "dora"): [
        T(16, 32, 0, 8, 3, "FMA tile: z and dy beside g, 8 warps"),
    ],
    ("tf32", "dy", "dora"): [
        T(64, 32, 0, 8, 3, "large M: dy, z [64, 32] beside g", 32),
        T(32, 32, 0, 8, 3, "small M, and r_pad >= 64"),
    ],
}

# A 4-bit base decodes each W tile in registers inside the forward's K loop (decode-in-
# mainloop): LoRA's forward tiles spill there in the cubins (24 B on sm_90, 176-536 B on
# sm_80; with fp32 operands 16-752 B), so the 4-bit forward launches its own, smaller
# decoded tiles.  The decoded tile is [BLOCK_N, BLOCK_K]: the output tile's long side goes
# to the rows, which also decodes each W tile half as often.
_4BIT_CONFIGS = {
    ("16bit", "forward"): [
        T(256, 128, 32, 8, 3, "large M and N: a decoded W tile [128, 32] (128 x 256 x 32 "
          "spills 8 B on sm_90 with FP4 codes; 256 x 128 x 64, 16-wide K steps wait with "
          "depth 0)", SMALL_R, builds="tma"),
        T(128, 128, 64, 8, 3, "every rank block (190 registers at r_pad 128)", builds="tma"),
        T(128, 128, 64, 8, 3, "large M, r_pad <= 32 (sm_80 spills 432 B at r_pad 128)", 32,
          builds="ptr"),
        T(64, 128, 64, 8, 3, "mid M and r_pad 64 over 8 warps (4 warps spill 176-192 B on "
          "sm_80)", SMALL_R, builds="ptr"),
        T(64, 64, 64, 8, 3, "r_pad 128 (252 registers on sm_80)", min_r_pad=MAX_R,
          builds="ptr"),
        T(32, 64, 64, 4, 3, "small M: many CTAs along N (32 x 64 x 128 spills 24 B on "
          "sm_90)", builds="ptr"),
    ],
    # TF32: every pointer tile of the dense table spills on sm_80 (16-208 B) and the small
    # 32 x 64 x 64 one on sm_90; 8 warps hold the decoded tile in the pointer build
    ("tf32", "forward"): [
        T(128, 128, 32, 8, 3, "large M and N", SMALL_R, builds="tma"),
        T(64, 128, 32, 4, 4, "mid M", 32, builds="tma"),
        T(64, 64, 32, 4, 3, "r_pad 128, and small M (wgmma's 64 rows)", builds="tma"),
        T(64, 128, 32, 8, 3, "large and mid M (4 warps spill 48 B on sm_80)", SMALL_R,
          builds="ptr"),
        T(64, 64, 32, 8, 3, "small M, and r_pad 128 (4 warps spill 208 B on sm_80; 32 x 64 "
          "x 32 16 B on sm_90; at r_pad 16 it spills 16 B with double-quantized codes on "
          "sm_80)", min_r_pad=32, builds="ptr"),
    ],
    # IEEE fp32: FMA dots with both operands in registers beside the decode; the dense
    # 32 x 32 x 32 tile spills 650-750 B at r_pad 64 and 16 B at r_pad 32 (sm_90)
    ("fp32", "forward"): [
        T(16, 16, 32, 4, 3, "the FMA tile that fits the decode at every rank block (32 x 16 "
          "and 16 x 32 spill 8-64 B, FP4 codes on sm_90 or r_pad 64 on sm_80)"),
    ],
}

# The FP8 base (e4m3 codes decoded in registers in the forward and dx main loops): the
# dense tables, less the tiles that spill with the decoded W tile (python -m
# fastlora.kernels.report --base e4m3).  Per (kind, kernel, build); a build absent here
# runs the dense table's tiles of that build.  IEEE fp32 has none (its FMA tiles spill
# 8-688 B with a decoded W on sm_80 and sm_90): an FP8 call there decodes W once and runs
# the dense kernels (lora_forward.fp8_fused_ok), as does an sm_90 call that cannot load
# the codes through TMA (the pointer build's decoded tile makes wgmma wait with depth 0).
_FP8_CONFIGS = {
    # on sm_80 (mma.sync) the forward's 64- and 128-row pointer tiles spill
    ("16bit", "forward", "ptr"): [
        T(32, 64, 128, 4, 4, "decoded W: many CTAs along N, long K steps (the only pointer "
          "tile that fits registers on sm_80)", builds="ptr"),
    ],
    ("16bit", "dx", "tma"): [
        T(128, 128, 64, 8, 3, "large M, r_pad <= 32 (fp32 adapters spill 64 B at r_pad 64)",
          32, builds="tma"),
        T(64, 64, 64, 8, 3, "mid and small M, and r_pad >= 64", builds="tma"),
    ],
    ("tf32", "forward", "ptr"): [
        T(64, 128, 32, 4, 4, "large and mid M, r_pad <= 32 (128 x 128 spills 8 B at r_pad 32 "
          "on sm_80)", 32, builds="ptr"),
        T(32, 64, 64, 4, 4, "small M, and r_pad >= 64 (64 x 64 spills 96 B at r_pad 128)",
          builds="ptr"),
    ],
    ("tf32", "forward", "tma"): [
        T(128, 128, 32, 8, 3, "large M and N", SMALL_R, builds="tma"),
        T(64, 128, 32, 4, 4, "mid M", 32, builds="tma"),
        T(64, 64, 32, 4, 3, "r_pad 128, and mid M on narrow layers", builds="tma"),
        T(32, 64, 64, 4, 4, "small M (spills 48 B at r_pad 128)", SMALL_R, builds="tma"),
    ],
    # the decoded W^T is wgmma's register operand (dy^T from shared memory is K-major for
    # tf32): dx tiles 32 columns wide wait with depth 0 (below wgmma's 64 rows); r_pad 128
    # spills in every 64-column tile tried, and decodes once
    ("tf32", "dx", "tma"): [
        T(64, 64, 64, 8, 3, "every M, r_pad <= 64", SMALL_R, builds="tma"),
    ],
}

# adapter variants a kernel build can be: LoRA, DoRA, DoRA with dropout (forward and dx then
# carry two accumulators)
ADAPTERS = ("lora", "dora", "dora_dropout")
DROPOUT_ACC_KERNELS = ("forward", "dx")  # the kernels with DoRA's second accumulator


def adapter_variant(dora: bool, dropout: bool) -> str:
    return ("dora_dropout" if dropout else "dora") if dora else "lora"
del T

_INTERPRET_CONFIG = TileConfig(
    INTERPRET_BLOCK, INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1, "interpreter: one small tile"
)


def smem_estimate(kernel: str, cfg: TileConfig, esize: int, r_pad: int) -> int:
    """Pipelined operand buffers in bytes (the bulk of shared memory); the report
    checks the compiler's real figure."""
    bm, bn, bk, s = cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages
    loop = {
        "forward": (bm * bk + bn * bk),
        "forward_ws": (bm * bk + bn * bk),
        "shrink": (bm * bk + r_pad * bk),
        "dy": (bm * bn + bn * r_pad),
        "dx": (bm * bn + bn * bk),
        "reduce": 0,
        "dy_split": (bm * bn + bn * r_pad),
        "dx_gemm": (bm * bn + bn * bk),
        "tail": (bm * bk + bm * r_pad),
        "dora_norm": (bn * bk + r_pad * bk),
    }[kernel.removesuffix("_split").removesuffix("_p0")]
    return s * loop * esize


def operand_kind(esize: int, precision: str) -> str:
    """Which config table: "16bit" (fp16/bf16), "tf32" or "fp32" (IEEE fp32 products)."""
    if esize <= 2:
        return "16bit"
    return "tf32" if precision == "tf32" else "fp32"


def configs_for(
    kernel: str, kind: str, r_pad: int, *, interpreter: bool | None = None, tma: bool = False,
    adapter: str = "lora", base: str = "dense",
) -> list[TileConfig]:
    """Every config the dispatcher may launch for this kernel, operand kind
    (``operand_kind``), rank block, build (``tma``), adapter variant (``ADAPTERS``) and
    base kind (``base``: "dense", or a kind decoded in registers); ``interpreter`` defaults
    to ``TRITON_INTERPRET=1``."""
    if interpreting() if interpreter is None else interpreter:
        return [_INTERPRET_CONFIG]
    esize = 2 if kind == "16bit" else 4
    if r_pad > (FP32_MAX_R_PAD if kind == "fp32" else MAX_R):
        return []
    if kind != "16bit" and adapter != "lora":
        # fp32 operands: the IEEE FMA tiles spill with DoRA's operands, and tf32's dx main
        # loop with dy scaled in registers waits with depth 0 on sm_90: DoRA takes the
        # torch path there (fastlora.dora_triton)
        return []
    if adapter == "dora_dropout" and kernel not in DROPOUT_ACC_KERNELS:
        adapter = "dora"  # dropout changes DoRA's registers in forward and dx only
    table = _DORA_CONFIGS.get((kind, kernel, adapter), _TABLES[kind][kernel])
    if kernel in ("dy_split", "dx_gemm_split", "tail_split") and r_pad > SPLIT_MAX_R_PAD:
        return []
    if base not in ("dense", "dense_tma") and adapter == "lora":
        if base.startswith("e4m3"):  # FP8: its own tiles where the dense ones spill
            if kind == "fp32" and kernel in ("forward", "dx"):
                return []
            table = _FP8_CONFIGS.get((kind, kernel, "tma" if tma else "ptr"), table)
        else:
            table = _4BIT_CONFIGS.get((kind, kernel), table)
    return [
        c
        for c in table
        if c.min_r_pad <= r_pad <= c.max_r_pad
        and ("tma" if tma else "ptr") in c.builds
        and smem_estimate(kernel, c, esize, r_pad) <= SMEM_LIMIT[80]
    ]


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the strategy cache's key for M."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


@functools.lru_cache(maxsize=4096)
def pick(
    kernel: str, kind: str, r_pad: int, rows: int, cols: int, sms: int, tma: bool = False,
    *, interpreter: bool | None = None, adapter: str = "lora", base: str = "dense",
) -> TileConfig:
    """The config launched for a ``rows x cols`` output (cols 1 for row-tiled kernels):
    the largest tile (table order) that still gives every one of ``sms`` SMs a tile,
    else the config with the most tiles.  A function of the shape alone.  ``interpreter``
    as in ``configs_for`` (False: the GPU tables even under ``TRITON_INTERPRET=1``)."""
    cands = configs_for(kernel, kind, r_pad, tma=tma, interpreter=interpreter, adapter=adapter,
                        base=base)
    if not cands:
        raise ValueError(
            f"fastlora {kernel} kernel: no tile config for {kind} operands with rank block "
            f"{r_pad} (largest: {max_r_pad(kind)}); use the composition strategy"
        )
    col_block = {"forward": "block_n", "forward_ws": "block_n", "dx": "block_k", "dx_gemm": "block_k",
                 "dx_gemm_split": "block_k", "dx_gemm_p0": "block_k", "tail": "block_k",
                 "tail_split": "block_k", "dora_norm": "block_n"}.get(kernel)

    def tiles(c: TileConfig) -> int:
        t = -(-rows // max(c.block_m, 1))
        return t * -(-cols // getattr(c, col_block)) if col_block else t

    for c in cands:
        if tiles(c) >= sms:
            return c
    return max(cands, key=tiles)


# --------------------------------------------------------------------------- SGMV
# The multi-adapter kernels (lora_sgmv.py): block_m rows (sorted positions; for
# "sgmv_segment" the rows one step of an adapter's walk takes) by block_n columns (the
# streamed K or N of "sgmv_shrink", the output columns of "sgmv_expand" and
# "sgmv_segment"); block_k is unused.  Smaller row tiles than the single-adapter kernels:
# a tile straddling two adapters runs its work once per adapter.
SGMV_KERNELS = ("sgmv_shrink", "sgmv_expand", "sgmv_segment")
_S = TileConfig
_SGMV_CONFIGS = {
    "16bit": {
        "sgmv_shrink": [
            _S(64, 64, 0, 4, 3, "large M: 64 rows a tile, column steps of 64", SMALL_R),
            _S(16, 128, 0, 4, 3, "small M (decode): more tiles, long column steps", SMALL_R),
            _S(64, 64, 0, 8, 3, "r_pad 128: u [64, 128] fp32 over 8 warps", min_r_pad=MAX_R),
        ],
        "sgmv_expand": [
            _S(64, 128, 0, 8, 1, "large M: [64, 128] output tiles over 8 warps", SMALL_R),
            _S(16, 64, 0, 4, 1, "small M (128 columns spill with unaligned fp32 B on sm_80)",
               SMALL_R),
            _S(32, 64, 0, 8, 1, "r_pad 128 ([64, 64] spills with fp32 A on sm_80)",
               min_r_pad=MAX_R),
        ],
        "sgmv_segment": [
            _S(64, 64, 0, 4, 3, "dA/dB tile [r_pad, 64], 64 rows a step", SMALL_R),
            _S(32, 64, 0, 4, 3, "r_pad 128", min_r_pad=MAX_R),
        ],
    },
    "tf32": {
        "sgmv_shrink": [
            _S(64, 32, 0, 4, 3, "large M", SMALL_R),
            _S(16, 64, 0, 4, 3, "small M", SMALL_R),
            _S(64, 32, 0, 8, 3, "r_pad 128", min_r_pad=MAX_R),
        ],
        "sgmv_expand": [
            _S(64, 64, 0, 8, 1, "large M", SMALL_R),
            _S(16, 64, 0, 4, 1, "small M", SMALL_R),
            _S(32, 64, 0, 8, 1, "r_pad 128", min_r_pad=MAX_R),
        ],
        "sgmv_segment": [
            _S(32, 64, 0, 4, 3, "dA/dB tile [r_pad, 64]", SMALL_R),
            _S(32, 32, 0, 4, 3, "r_pad 128", min_r_pad=MAX_R),
        ],
    },
    # IEEE fp32: FMA dots with register operands, small tiles (as _CONFIGS_FP32)
    "fp32": {
        "sgmv_shrink": [_S(32, 32, 0, 4, 3, "FMA tile")],
        "sgmv_expand": [_S(32, 32, 0, 8, 1, "FMA tile over 8 warps (4 spill on sm_80)")],
        "sgmv_segment": [_S(16, 32, 0, 4, 3, "FMA tile")],
    },
}
del _S
# the interpreter: 16-row tiles so the small test batches hold several tiles and tiles
# that straddle adapters; 32 columns (fewer numpy calls)
_SGMV_INTERPRET_CONFIG = TileConfig(16, INTERPRET_BLOCK, 0, 4, 1, "interpreter")


def sgmv_configs(kernel: str, kind: str, r_pad: int, *,
                 interpreter: bool | None = None) -> list[TileConfig]:  # fmt: skip
    """Every config an SGMV kernel may launch for this operand kind and rank block."""
    if interpreting() if interpreter is None else interpreter:
        return [_SGMV_INTERPRET_CONFIG]
    if r_pad > (FP32_MAX_R_PAD if kind == "fp32" else MAX_R):
        return []
    return [c for c in _SGMV_CONFIGS[kind][kernel] if c.min_r_pad <= r_pad <= c.max_r_pad]


@functools.lru_cache(maxsize=4096)
def sgmv_pick(kernel: str, kind: str, r_pad: int, rows: int, cols: int, sms: int) -> TileConfig:
    """The config launched (as ``pick``): the first in table order that gives every SM a
    row tile, else the one with the most row tiles."""
    cands = sgmv_configs(kernel, kind, r_pad)
    if not cands:
        raise ValueError(
            f"fastlora {kernel} kernel: no tile config for {kind} operands with rank block "
            f"{r_pad} (largest: {max_r_pad(kind)})"
        )
    if kernel == "sgmv_segment":  # one program per (adapter, column tile): no row tiles
        return cands[0]
    for c in cands:
        if cdiv(rows, c.block_m) >= sms:
            return c
    return max(cands, key=lambda c: cdiv(rows, c.block_m))
