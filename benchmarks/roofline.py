"""A roofline MODEL of fastlora's GPU cost: ``python -m benchmarks.roofline``.

Not a measurement.  For a shape it lists every GPU launch of one forward and one backward
with the bytes it must move and the FLOPs it must do, and bounds its time from below on
A100, H100 and H200 by the published peaks:

    t(launch) = max(bytes / bandwidth, tensor FLOPs / tensor peak, ALU ops / ALU peak)

summed over launches (each launch waits for the one before it).  Ratios are to the same
bound of the frozen ``nn.Linear`` (one GEMM forward, one ``dy W`` backward).

- bytes: compulsory DRAM traffic, every operand read once and every output written once
  (what L2 or shared memory serve again is free).  A real GEMM reaches ~70-80% of the
  tensor peak, so absolute times are optimistic; ratios are what the model is for.
- tensor FLOPs: 2 m n k per matmul, with the rank padded to the MMA minimum (16) and the
  power-of-two block the kernels compute with.
- ALU ops: instructions outside the tensor cores, against one instruction per FP32 lane
  per clock (the datasheet's FP32 FLOPS / 2, an FMA counting 2): Philox dropout bits and
  the 4-bit decode, both counted from the kernels' code and rounded (``PHILOX_OPS``,
  ``DECODE_OPS``).  The max() assumes they overlap the MMAs and the memory stream fully.
- not modelled: launch latency and the tail of a small grid (a few microseconds per
  launch, which matters below M ~ 1024), and L2 reuse between launches.

Plans (each a list of launches per phase):
    frozen            nn.Linear: x W^T; dy W (hand-counted, checked against the derived one)
    composition       fastlora's torch backend, the cuBLAS composition the dispatcher
                      measures against: derived by running it on meta tensors under
                      ``host_overhead.LaunchCounter`` (every op that launches, its operands)
    fused             the Triton kernels in kernels/ as they are (hand-counted from them,
                      with the tiles ``kernels/_configs.pick`` gives the shape), along the
                      two axes of DESIGN.md section 6: base (dense, or NF4 4-bit with W
                      read packed and decoded in the mainloops) x adapter (LoRA, or DoRA as
                      issue 13 designs it)
    *_4bit            the baselines over an NF4 base (blocksize 64, with or without double
                      quantization of absmax): frozen = bnb dequantize + GEMM (Linear4bit),
                      composition = dequantize + the dense composition
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from typing import Callable

# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, peak HBM
    tensor: float  # FLOP/s, dense bf16 tensor cores (no sparsity)
    alu: float  # instructions/s on the FP32 lanes: FP32 FLOPS / 2 (an FMA counts 2 FLOPs)
    source: str
    sms: int = 132  # streaming multiprocessors (the band's epilogue waves)


# Published peaks (SXM parts). Dense bf16 is half of the "with sparsity" figure that the
# H100/H200 datasheets headline.
GPUS = {
    "A100": GPU("A100 SXM4 80GB", 2.039e12, 312e12, 19.5e12 / 2,
                "NVIDIA A100 Tensor Core GPU datasheet (2021): HBM2e 2,039 GB/s; BF16 tensor "
                "312 TFLOPS dense; FP32 19.5 TFLOPS", sms=108),
    "H100": GPU("H100 SXM5 80GB", 3.35e12, 989.4e12, 67e12 / 2,
                "NVIDIA H100 Tensor Core GPU datasheet: HBM3 3.35 TB/s; BF16 tensor 1,979 "
                "TFLOPS with sparsity = 989 dense; FP32 67 TFLOPS"),
    "H200": GPU("H200 SXM 141GB", 4.8e12, 989.4e12, 67e12 / 2,
                "NVIDIA H200 Tensor Core GPU datasheet: HBM3e 4.8 TB/s; BF16 tensor 1,979 "
                "TFLOPS with sparsity = 989 dense; FP32 67 TFLOPS"),
}  # fmt: skip

# ALU instructions per element (estimates, FP32-lane equivalents):
# - Philox4x32-10 (kernels/_tiles.dropout_keep): 10 rounds of 2 wide multiplies, 2 3-input
#   xors and 2 key adds give 4 uniforms, ~20 per element, the 32-bit multiplies at half rate
#   on sm_80/sm_90 (~25); then the float conversion, the compare and the select: ~30.
# - NF4 decode (kernels/dequant_4bit.load_4bit_tile): nibble split and interleave (~2), four
#   bit tests (~8), the 15-select table tree, the absmax multiply, the bounds select and the
#   convert to the MMA dtype: ~28.
PHILOX_OPS = 30
DECODE_OPS = 28
MMA_MIN = 16  # tl.dot's smallest dimension (kernels/_configs.py MMA_MIN_R)


# --------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class Cost:
    """How a launch runs in the band's pessimistic line (``pessimistic_seconds``).

    kind      "cublas": as the optimistic line (cuBLAS and torch's own kernels are the
              yardstick); "gemm": a Triton GEMM; "stream": a Triton pass bound by memory
    epilogue  for a "gemm" whose epilogue runs after the mainloop in the same warps:
              "forward" or "dx" (its per-tile cost, ``EPILOGUE_S``), else ""
    tiles     the output tiles such a GEMM walks (its epilogues run ``ceil(tiles / SMs)``
              times one after another on an SM)
    inflight  bytes a "stream" keeps in flight over the whole GPU (CTAs x pipelined
              loads); 0 means it fills the machine"""

    kind: str = "cublas"
    epilogue: str = ""
    tiles: int = 0
    inflight: float = 0.0


CUBLAS = Cost()


@dataclass(frozen=True)
class Launch:
    name: str
    bytes: float
    flops: float = 0.0  # tensor-core FLOPs
    alu: float = 0.0  # non-tensor ops
    cost: Cost = CUBLAS  # how the pessimistic line treats it

    def seconds(self, gpu: GPU) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.tensor, self.alu / gpu.alu)

    def bound(self, gpu: GPU) -> str:
        """Which ceiling sets the time: "memory", "tensor" or "alu"."""
        t = {"memory": self.bytes / gpu.bandwidth, "tensor": self.flops / gpu.tensor,
             "alu": self.alu / gpu.alu}
        return max(t, key=t.get)


Plan = dict  # {"fwd": [Launch], "bwd": [Launch]}


@dataclass(frozen=True)
class Shape:
    """x [M, K], W [N, K], A [r, K], B [N, r]; bf16 (``esize`` 2) with adapters in the same
    dtype, as the GPU benchmark suite runs them; ``p`` the dropout rate."""

    M: int
    K: int
    N: int
    r: int
    p: float = 0.0
    esize: int = 2
    bias: bool = False

    @property
    def r_pad(self) -> int:
        """The rank the MMAs compute with: >= 16, a power of two."""
        return max(MMA_MIN, 1 << (self.r - 1).bit_length())

    def label(self) -> str:
        return f"{self.K}x{self.N} M={self.M} r={self.r} p={self.p:g}"


def _mm(name: str, m: int, n: int, k: int, e: int, extra_bytes: float = 0.0) -> Launch:
    """C [m, n] = A [m, k] B [k, n]: each operand read once, C written once."""
    return Launch(name, (m * k + k * n + m * n) * e + extra_bytes, 2.0 * m * n * k)


# --------------------------------------------------------------------------- frozen layer


def frozen(s: Shape) -> Plan:
    """nn.Linear with a frozen weight: y = x W^T (+ b); dx = dy W."""
    bias = s.N * s.esize if s.bias else 0
    return {"fwd": [_mm("x W^T", s.M, s.N, s.K, s.esize, bias)],
            "bwd": [_mm("dx = dy W", s.M, s.K, s.N, s.esize)]}


# --------------------------------------------------------------------------- derived plans


def _tensors(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(t) -> int:
    # an expanded (stride 0) operand is read once, not once per broadcast element
    return min(t.numel(), t.untyped_storage().nbytes() // t.element_size()) * t.element_size()


_MATMULS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
            "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}


def _launch_of(func, args, kwargs, out) -> Launch:
    name = func._schema.name
    flops = 0.0
    if name in _MATMULS:
        ia, ib = _MATMULS[name]
        a, b = args[ia], args[ib]
        batch = a.shape[0] if a.dim() == 3 else 1
        flops = 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    reads = sum(_nbytes(t) for t in _tensors(list(args) + list(kwargs.values())))
    writes = sum(t.numel() * t.element_size() for t in _tensors(out))
    return Launch(func.name().replace("aten::", ""), float(reads + writes), flops)


def derive(run: Callable[[], Callable[[], None]]) -> Plan:
    """Run ``run()`` (the forward; it returns the backward) on meta tensors under the
    launch counter, once to warm caches and once recorded: every op that would launch a GPU
    kernel becomes a ``Launch`` with its operands' bytes and, for matmuls, its FLOPs."""
    from benchmarks.host_overhead import LaunchCounter, LaunchLog

    class Recorder(LaunchCounter):
        def record(self, func, args, kwargs, out):
            self.log.launches.append(_launch_of(func, args, kwargs, out))

    run()()  # warm-up: one-time tables (the dropout unpack table) are not per-step work
    log = LaunchLog()
    with Recorder(log):
        backward = run()
    fwd = list(log.launches)
    log.clear()
    with Recorder(log):
        backward()
    return {"fwd": fwd, "bwd": list(log.launches)}


def _meta_inputs(s: Shape):
    import torch

    dt = {2: torch.bfloat16, 4: torch.float32}[s.esize]
    kw = dict(device="meta", dtype=dt)
    x = torch.empty(s.M, s.K, requires_grad=True, **kw)
    w = torch.empty(s.N, s.K, **kw)
    b = torch.empty(s.N, **kw) if s.bias else None
    a = torch.empty(s.r, s.K, requires_grad=True, **kw)
    bb = torch.empty(s.N, s.r, requires_grad=True, **kw)
    dy = torch.empty(s.M, s.N, **kw)
    return x, w, b, a, bb, dy


@functools.lru_cache(maxsize=None)
def composition(s: Shape) -> Plan:
    """The cuBLAS composition (fastlora's torch backend on CUDA), derived from its code."""
    import torch

    from fastlora import torch_backend

    def run():
        x, w, b, a, bb, dy = _meta_inputs(s)
        y = torch_backend.apply(x, w, b, a, bb, 2.0, s.p)
        return lambda: torch.autograd.grad(y, (x, a, bb), dy)

    return derive(run)


@functools.lru_cache(maxsize=None)
def composition_dora(s: Shape) -> Plan:
    """fastlora's DoRA on CUDA today (``fastlora.dora.apply``: the cheap norm, then the torch
    path on every backend), derived from its code; ||W||^2 is cached by the layer, so it is
    computed outside the step."""
    import torch

    from fastlora import dora

    x, w, b, a, bb, dy = _meta_inputs(s)
    sq_norm = dora.weight_sq_norm(w)
    m = torch.empty(s.N, device="meta", dtype=torch.float32, requires_grad=True)

    def run():
        y = dora.apply("torch", x, w, b, a, bb, m, sq_norm, 2.0, s.p)
        return lambda: torch.autograd.grad(y, (x, a, bb, m), dy)

    return derive(run)


@functools.lru_cache(maxsize=None)
def frozen_derived(s: Shape) -> Plan:
    """``frozen`` derived from torch's own nn.Linear (a check on the hand count)."""
    import torch

    def run():
        x, w, b, _, _, dy = _meta_inputs(s)
        y = torch.nn.functional.linear(x, w, b)
        return lambda: torch.autograd.grad(y, (x,), dy)

    return derive(run)


# --------------------------------------------------------------------------- fused kernels

# The kernels pick their tiles by the shape, the SM count and the build (kernels/_configs.pick);
# the model asks the same function for the sm_90 TMA build on a 132-SM H100/H200 (A100's
# pointer build and 108 SMs rarely change the row tile, which is all the bytes depend on).
SMS_FOR_TILES = 132
TMA_BUILD = True


@functools.lru_cache(maxsize=None)
def config(kernel: str, s: Shape, cols: int, base: str = "dense"):
    """The ``_configs.TileConfig`` the kernel launches with for this shape (bf16); ``base``
    "nf4" for the tiles of a 4-bit base (every 4-bit kind shares them)."""
    from fastlora.kernels import _configs

    # the GPU tables also under TRITON_INTERPRET=1 (which has one small interpreter tile)
    return _configs.pick(kernel, "16bit", s.r_pad, s.M, cols, SMS_FOR_TILES, TMA_BUILD,
                         interpreter=False, base=base)


def tile(kernel: str, s: Shape, cols: int, base: str = "dense") -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) the kernel launches with for this shape (bf16)."""
    c = config(kernel, s, cols, base)
    return c.block_m, c.block_n, c.block_k


def _row_stream(kernel: str, s: Shape, cols: int, box_cols: int) -> Cost:
    """A row-tiled pass (shrink, dy): one CTA per BLOCK_M rows, each keeping
    ``num_stages - 1`` boxes of [BLOCK_M, box_cols] in flight (Triton's pipeliner loads
    that many steps ahead)."""
    c = config(kernel, s, cols)
    ctas = math.ceil(s.M / c.block_m)
    return Cost("stream", inflight=ctas * (c.num_stages - 1) * c.block_m * box_cols * s.esize)


def fused(s: Shape, base: "Quant | None" = None, adapter: str = "lora") -> Plan:
    """The Triton kernels in kernels/ as they are (their docstrings give the launches):

        fwd  [seed]  shrink u = s D(x) A^T      forward y = x W^T + u B^T (+ b)
        bwd  dy: g = s dy B and dB partials     dx: dy W + (g A) m/(1-p) and dA partials
             reduce: dA, dB = sums of the partials, in the adapters' dtype

    ``base``: a 4-bit ``Quant`` reads W packed in the forward and dx mainloops and decodes
    each tile once per CTA that loads it (``ceil(M / BLOCK_M)`` times per weight).
    ``adapter="dora"`` adds issue 13's design with fastlora.dora's algebra: a norm pass
    per step (W A^T [N, r], A A^T; one read of W) writing m / norm; the column scale in the
    forward epilogue, which also stores the pre-scale output z [M, N] that dm needs (as
    the torch path saves it); dm beside dB in the dy pass, which reads z; with p > 0 a
    second accumulator D(x) W^T on the forward's W tiles (the mask as bits written by the
    shrink) and a second one, dy ((c - 1) W) under the mask, in dx."""
    M, K, N, e, R, r = s.M, s.K, s.N, s.esize, s.r_pad, s.r
    wb = e if base is None else base.bytes_per_element
    decode = 0 if base is None else DECODE_OPS
    drop, dora = s.p > 0, adapter == "dora"
    twin = dora and drop  # the second accumulators of DoRA with dropout
    philox = PHILOX_OPS * M * K if drop else 0.0
    scale = N * 4 if dora else 0  # m / norm, fp32
    bits = M * K / 8 if twin else 0.0
    wbase = "dense" if base is None else "nf4"  # a 4-bit forward has its own tiles
    fm, _, _ = tile("forward", s, N, wbase)
    ym, _, _ = tile("dy", s, 1)
    xm, _, _ = tile("dx", s, K)
    parts_b, parts_a = math.ceil(M / ym), math.ceil(M / xm)

    fc, xc = config("forward", s, N, wbase), config("dx", s, K)
    fwd_cost = Cost("gemm", "forward", math.ceil(M / fc.block_m) * math.ceil(N / fc.block_n))
    dx_cost = Cost("gemm", "dx", math.ceil(M / xc.block_m) * math.ceil(K / xc.block_k))
    fwd = []
    if dora:
        fwd.append(Launch("dora norm: W A^T, A A^T -> m / norm",
                          N * K * wb + (r * K + N * r) * e + 2 * scale,
                          2.0 * N * K * R + 2.0 * r * R * K, decode * N * K, Cost("gemm")))
    if drop:
        fwd.append(Launch("seed: randint", 8))
    fwd.append(Launch("shrink: u = s D(x) A^T" + (", mask bits" if twin else ""),
                      (M * K + r * K + M * r) * e + bits, 2.0 * M * K * R, philox,
                      _row_stream("shrink", s, 1, config("shrink", s, 1).block_k)))
    fwd.append(Launch(
        "forward: y = x W^T + u B^T" + (", column scale, z stored" if dora else "")
        + (", + D(x) W^T" if twin else ""),
        (M * K + M * r + N * r + M * N + (N if s.bias else 0)) * e + N * K * wb + scale
        + (M * N * e if dora else 0) + bits,
        2.0 * M * N * K * (2 if twin else 1) + 2.0 * M * N * R,
        decode * N * K * math.ceil(M / fm), fwd_cost))
    bwd = [
        Launch("dy: g = s dy B, dB partials" + (", dm partials" if dora else ""),
               (M * N + N * r + 2 * M * r) * e + parts_b * N * r * 4
               + ((M * N * e + scale + parts_b * N * 4) if dora else 0),
               4.0 * M * N * R, cost=_row_stream("dy", s, 1, config("dy", s, 1).block_n)),
        Launch("dx: dy W + (g A) m/(1-p), dA partials" + (", 2nd accumulator" if twin else ""),
               (M * N + M * r + r * K + 2 * M * K) * e + N * K * wb + parts_a * r * K * 4 + scale,
               2.0 * M * K * N * (2 if twin else 1) + 4.0 * M * K * R,
               philox + decode * N * K * math.ceil(M / xm), dx_cost),
        Launch("reduce: dA, dB" + (", dm" if dora else ""),
               (parts_a * r * K + parts_b * N * r) * 4 + (r * K + N * r) * e
               + ((parts_b + 1) * N * 4 if dora else 0), cost=Cost("stream")),
    ]
    return {"fwd": fwd, "bwd": bwd}


# --------------------------------------------------------------------------- 4-bit base


@dataclass(frozen=True)
class Quant:
    """bitsandbytes NF4/FP4: two codes per byte, one absmax per ``blocksize`` elements, in
    fp32, or with double quantization in uint8 with one fp32 absmax per 256 of them."""

    blocksize: int = 64
    double_quant: bool = False

    @property
    def bytes_per_element(self) -> float:
        absmax = (1 + 4 / 256) if self.double_quant else 4
        return 0.5 + absmax / self.blocksize

    def label(self) -> str:
        return f"nf4/{self.blocksize}" + (" dq" if self.double_quant else "")


def _dequantize(s: Shape, q: Quant) -> Launch:
    """bnb dequantize_4bit: W [N, K] packed -> bf16, written to memory."""
    return Launch("bnb dequantize W -> bf16", s.N * s.K * (q.bytes_per_element + s.esize),
                  alu=DECODE_OPS * s.N * s.K)


def frozen_4bit(s: Shape, q: Quant) -> Plan:
    """bnb Linear4bit (M > 1): dequantize, then the GEMM; backward dequantizes again."""
    base = frozen(s)
    return {"fwd": [_dequantize(s, q), *base["fwd"]], "bwd": [_dequantize(s, q), *base["bwd"]]}


def composition_4bit(s: Shape, q: Quant) -> Plan:
    """bnb dequantize to bf16 + the cuBLAS composition on it, in both phases (as PEFT)."""
    base = composition(s)
    return {"fwd": [_dequantize(s, q), *base["fwd"]], "bwd": [_dequantize(s, q), *base["bwd"]]}


# --------------------------------------------------------------------------- predictions


def seconds(plan: Plan, gpu: GPU, phases=("fwd", "bwd")) -> float:
    """The plan's lower bound: its launches' bounds, one after the other."""
    return sum(k.seconds(gpu) for ph in phases for k in plan[ph])


def ratios(plan: Plan, s: Shape, gpu: GPU) -> dict[str, float]:
    """Predicted fwd and fwd+bwd time over the frozen nn.Linear's, on one GPU."""
    base = frozen(s)
    return {"fwd": seconds(plan, gpu, ("fwd",)) / seconds(base, gpu, ("fwd",)),
            "fwd+bwd": seconds(plan, gpu) / seconds(base, gpu)}


def plans(s: Shape, with_variants: bool = True) -> dict[str, Plan]:
    """Every modelled plan for a shape, by row label."""
    out = {"frozen nn.Linear": frozen(s), "fused (kernels/)": fused(s),
           "composition (cuBLAS)": composition(s)}
    if with_variants:
        for q in (Quant(64, False), Quant(64, True)):
            out[f"frozen Linear4bit {q.label()}"] = frozen_4bit(s, q)
            out[f"fused 4-bit {q.label()}"] = fused(s, base=q)
            out[f"composition 4-bit {q.label()}"] = composition_4bit(s, q)
        out["fused DoRA"] = fused(s, adapter="dora")
        out["composition DoRA (fastlora.dora today)"] = composition_dora(s)
    return out


# --------------------------------------------------------------------------- the band
#
# The optimistic line above is a floor: every epilogue hidden under the MMAs, every pass at
# full bandwidth.  The pessimistic line charges what a static review of the sm_90 builds
# found those assumptions miss (a MODEL too; only a GPU measures):
TRITON_GEMM_EFFICIENCY = 0.9  # a Triton GEMM's MMA time: cuBLAS's / 0.9
# an epilogue run after the mainloop in the same warps, per output tile and one after
# another on each SM (the estimate from the sm_90 SASS: g A, Philox, an x tile
# loaded after the store, the g^T x MMA and fp32 partial stores in dx; u B^T and bias in the
# forward)
EPILOGUE_S = {"forward": 0.8e-6, "dx": 1.5e-6}
# a latency-bound pass moves (bytes in flight) / latency (Little's law), at most this share
# of the peak (a pass that fills the machine still pays its launch and tail)
STREAM_CAP = 0.5
DRAM_LATENCY_S = 800e-9  # loaded HBM latency under streaming (H100 ~600-900 ns)


def pessimistic_seconds(k: Launch, gpu: GPU) -> float:
    """One launch under the band's pessimistic assumptions (``Cost``)."""
    c = k.cost
    if c.kind == "cublas":
        return k.seconds(gpu)
    bw = gpu.bandwidth
    if c.kind == "stream":
        occupancy = 1.0 if not c.inflight else min(1.0, c.inflight / (bw * DRAM_LATENCY_S))
        bw *= min(STREAM_CAP, occupancy)
    t = max(k.bytes / bw, k.flops / (gpu.tensor * TRITON_GEMM_EFFICIENCY), k.alu / gpu.alu)
    if c.epilogue:
        t += math.ceil(c.tiles / gpu.sms) * EPILOGUE_S[c.epilogue]
    return t


def band_seconds(launches: list[Launch], gpu: GPU) -> tuple[float, float]:
    """(optimistic, pessimistic) seconds of a list of launches."""
    return (sum(k.seconds(gpu) for k in launches),
            sum(pessimistic_seconds(k, gpu) for k in launches))


# dB partials of the machine-filling dy pass: a fixed-order two-level reduction leaves one
# partial per group of row blocks (the candidate's structure; a guide, not its exact count)
DY_FILLED_PARTIALS = 16
# the pure-GEMM dx candidate's output tile (cuBLAS-class, 2 consumer warpgroups)
DX_GEMM_TILE = (128, 256)


def _dy_filled(s: Shape) -> Launch:
    """dy pass with a 2-D grid, 3 stages, B resident: g = s dy B, dB in few partials."""
    M, N, e, R, r = s.M, s.N, s.esize, s.r_pad, s.r
    return Launch("dy (2-D grid, 3 stages): g, dB partials",
                  (M * N + N * r + 2 * M * r) * e + DY_FILLED_PARTIALS * N * r * 4,
                  4.0 * M * N * R, cost=Cost("stream"))


def _reduce(s: Shape, parts_a: int, parts_b: int) -> Launch:
    return Launch("reduce: dA, dB", (parts_a * s.r * s.K + parts_b * s.N * s.r) * 4
                  + (s.r * s.K + s.N * s.r) * s.esize, cost=Cost("stream"))


def _skinny(name: str, m: int, n: int, k: int, s: Shape) -> Launch:
    """A hybrid candidate's cuBLAS GEMM with one side of width r (charged as cuBLAS)."""
    return _mm(name, m, n, k, s.esize)


def forward_candidates(s: Shape) -> dict[str, list[Launch]]:
    """Forward launches of every dense-base candidate, by the dispatcher's names
    (``fastlora.kernels.api.FORWARD_CANDIDATES``, the 4-bit-only ones aside): "fused" (the
    kernels as they are), "cublas_shrink" (u = s D(x) A^T by cuBLAS, with p > 0 after the
    Triton dropout pass writing D(x); then the fused forward GEMM), "warp_spec" (sm_90:
    ``_warp_spec``) and "composition" (cuBLAS, derived)."""
    M, K, e = s.M, s.K, s.esize
    fwd = fused(s)["fwd"]
    hybrid = [k for k in fwd if k.name.startswith("seed")]
    if s.p > 0:
        hybrid.append(Launch("dropout pass: D(x) written", 2 * M * K * e,
                             alu=PHILOX_OPS * M * K, cost=Cost("stream")))
    hybrid.append(_skinny("cuBLAS: u = s D(x) A^T", M, s.r, K, s))
    hybrid.append(fwd[-1])  # the fused forward GEMM, unchanged
    return {"fused": fwd, "cublas_shrink": hybrid, "warp_spec": _warp_spec(s, fwd),
            "composition": composition(s)["fwd"]}


def _warp_spec(s: Shape, fwd: list[Launch]) -> list[Launch]:
    """"warp_spec": the fused launches, the GEMM warp-specialized on its own tiles (the
    consumer warps still run each tile's epilogue, u B^T among it, after the main loop);
    the fused launches themselves where it has no tile (larger ranks)."""
    from fastlora.kernels import _configs

    if not _configs.configs_for("forward_ws", "16bit", s.r_pad, tma=True, interpreter=False):
        return fwd
    c = config("forward_ws", s, s.N)
    g = fwd[-1]
    tiles = math.ceil(s.M / c.block_m) * math.ceil(s.N / c.block_n)
    return [*fwd[:-1], Launch(g.name + " (warp-specialized)", g.bytes, g.flops, g.alu,
                              Cost("gemm", "forward", tiles))]


def backward_candidates(s: Shape) -> dict[str, list[Launch]]:
    """Backward launches of every dense-base candidate, by the dispatcher's names
    (``fastlora.kernels.api.BACKWARD_CANDIDATES``, the 4-bit-only ones aside): "fused" (as
    they are), "dx_gemm" (today's dy pass; dx as one pure GEMM with g A as an extra K step of
    width r, its epilogue serialized only to mask the low-rank term when p > 0; a tail launch:
    dA in one pass over x beside the sum of the dB partials), "split_dy" (as dx_gemm after
    the machine-filling 2-D dy pass, with fewer dB partials), "dx_gemm_cublas" (g = s dy B
    and dB = dy^T u by cuBLAS, dx_gemm's GEMM; dA = g^T x by cuBLAS at p = 0, by the tail's
    pass over x with the mask in registers when p > 0) and "composition"."""
    M, K, N, e, R, r = s.M, s.K, s.N, s.esize, s.r_pad, s.r
    dy, dx, reduce = fused(s)["bwd"]
    parts_a = math.ceil(M / tile("dx", s, K)[0])
    philox = PHILOX_OPS * M * K if s.p > 0 else 0.0
    bm, bn = DX_GEMM_TILE
    gemm = Launch("dx = [dy | g] [W ; A] (one GEMM, extra K step of r)",
                  (M * N + M * r + r * K + M * K) * e + N * K * e,
                  2.0 * M * K * (N + R), philox,
                  Cost("gemm", "dx" if s.p > 0 else "", math.ceil(M / bm) * math.ceil(K / bn)))

    def tail(db_partial_bytes: float) -> Launch:
        return Launch("tail: dA = g^T D(x) (one pass over x), dB partials summed",
                      (M * K + M * r) * e + db_partial_bytes + (r * K + N * r) * e,
                      2.0 * M * K * R, philox, Cost("stream"))

    # today's dy pass leaves the reduce's bytes less the dA partials (dx_gemm writes none)
    todays_db = reduce.bytes - parts_a * r * K * 4 - (r * K + N * r) * e
    return {
        "fused": [dy, dx, reduce],
        "dx_gemm": [dy, gemm, tail(todays_db)],
        "split_dy": [_dy_filled(s), gemm, tail(DY_FILLED_PARTIALS * N * r * 4)],
        "dx_gemm_cublas": [
            _skinny("cuBLAS: g = s dy B", M, r, N, s), _skinny("cuBLAS: dB = dy^T u", N, r, M, s),
            gemm,
            Launch("tail: dA = g^T D(x) (one pass over x)", (M * K + M * r + r * K) * e,
                   2.0 * M * K * R, philox, Cost("stream"))
            if s.p > 0 else _skinny("cuBLAS: dA = g^T x", r, K, M, s),
        ],
        "composition": composition(s)["bwd"],
    }


def band(s: Shape, gpu: GPU) -> dict[str, dict[str, tuple[float, float]]]:
    """{"forward"/"backward": {candidate: (optimistic, pessimistic) / the frozen layer's
    time in that direction}}, plus "best": the fastest pessimistic pairing over the frozen
    fwd+bwd, and "composition" both ways."""
    base = frozen(s)
    out: dict = {}
    for direction, phase, cands in (("forward", "fwd", forward_candidates(s)),
                                    ("backward", "bwd", backward_candidates(s))):
        floor = seconds(base, gpu, (phase,))
        out[direction] = {n: tuple(t / floor for t in band_seconds(ls, gpu))
                          for n, ls in cands.items()}
    return out


def band_pairs(s: Shape, gpu: GPU, fused_only: bool = False) -> dict[str, tuple[float, float]]:
    """(optimistic, pessimistic) fwd+bwd time over the frozen layer's for every pairing of a
    forward and a backward candidate ("forward/backward")."""
    base = seconds(frozen(s), gpu)
    fwd, bwd = forward_candidates(s), backward_candidates(s)
    out = {}
    for f, fl in fwd.items():
        for b, bl in bwd.items():
            if fused_only and "composition" in (f, b):
                continue
            of, pf = band_seconds(fl, gpu)
            ob, pb = band_seconds(bl, gpu)
            out[f"{f}/{b}"] = ((of + ob) / base, (pf + pb) / base)
    return out


def band_table(shapes: list[Shape], gpus=("H100", "H200", "A100")) -> list[str]:
    """Per shape and pairing of candidates: the optimistic and pessimistic fwd+bwd ratios to
    the frozen nn.Linear, on each GPU; the pairing with the lowest pessimistic H100 ratio
    among the fused ones marked "best fused"."""
    head = ["shape", "forward/backward", *[f"{g} opt .. pess" for g in gpus], ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        per = {g: band_pairs(s, GPUS[g]) for g in gpus}
        fused_pess = {k: v[1] for k, v in per[gpus[0]].items() if "composition" not in k}
        best = min(fused_pess, key=fused_pess.get)
        for pair in per[gpus[0]]:
            cells = [f"{per[g][pair][0]:.3f} .. {per[g][pair][1]:.3f}" for g in gpus]
            mark = "best fused" if pair == best else ""
            lines.append(f"| {s.label()} | {pair} | " + " | ".join(cells) + f" | {mark} |")
    for s in shapes:
        pairs = band_pairs(s, GPUS[gpus[0]])
        best = min(pairs, key=lambda k: pairs[k][1])
        fused_best = min((k for k in pairs if "composition" not in k), key=lambda k: pairs[k][1])
        lines.append(f"\n{s.label()}, {gpus[0]} pessimistic: best pairing {best} "
                     f"{pairs[best][1]:.3f}, best of fused candidates {fused_best} "
                     f"{pairs[fused_best][1]:.3f}, composition "
                     f"{pairs['composition/composition'][1]:.3f} (x the frozen layer; a model)")
    return lines


BAND_HEADER = (
    "Roofline BAND, a MODEL, not a measurement: optimistic = the model above (perfect "
    "overlap); pessimistic = Triton GEMMs at {eff:g}x cuBLAS's MMA rate, a serialized "
    "epilogue at {fwd:g} us per forward tile and {dx:g} us per dx tile (per SM, one after "
    "another), Triton streaming passes at their occupancy (bytes in flight / {lat:g} ns "
    "latency) and at most {cap:.0%} of peak bandwidth; cuBLAS as in the optimistic line. "
    "Only a GPU decides the pick."
).format(eff=TRITON_GEMM_EFFICIENCY, fwd=EPILOGUE_S["forward"] * 1e6,
         dx=EPILOGUE_S["dx"] * 1e6, lat=DRAM_LATENCY_S * 1e9, cap=STREAM_CAP)


def launch_table(s: Shape, plan: Plan, gpus=("A100", "H100", "H200")) -> list[str]:
    head = ["phase", "launch", "MB moved", "GFLOP", *[f"{g} us" for g in gpus], "bound (H100)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ph in ("fwd", "bwd"):
        for k in plan[ph]:
            times = [f"{k.seconds(GPUS[g]) * 1e6:.1f}" for g in gpus]
            lines.append(f"| {ph} | {k.name} | {k.bytes / 1e6:.2f} | {k.flops / 1e9:.2f} | "
                         + " | ".join(times) + f" | {k.bound(GPUS['H100'])} |")
    return lines


DENSE = ("fused (kernels/)", "composition (cuBLAS)")


def ratio_table(shapes: list[Shape], labels: tuple[str, ...] | None = None,
                gpus=("A100", "H100", "H200")) -> list[str]:
    """Predicted fwd and fwd+bwd ratios to the frozen nn.Linear, one row per shape and plan
    (``labels``: the plans to show; default every one but the frozen layer itself)."""
    head = ["shape", "plan", "launches fwd/bwd",
            *[f"{g} {ph}" for g in gpus for ph in ("fwd", "fwd+bwd")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        for label, plan in plans(s, with_variants=labels is None or labels != DENSE).items():
            if label == "frozen nn.Linear" or (labels is not None and label not in labels):
                continue
            cells = []
            for g in gpus:
                rt = ratios(plan, s, GPUS[g])
                cells += [f"{rt['fwd']:.3f}", f"{rt['fwd+bwd']:.3f}"]
            lines.append(f"| {s.label()} | {label} | {len(plan['fwd'])}/{len(plan['bwd'])} | "
                         + " | ".join(cells) + " |")
    return lines


def gpu_for(name: str | None) -> list[str]:
    """The modelled GPUs matching a device name (all three when none matches)."""
    found = [g for g in GPUS if name and g in name.upper()]
    return found or list(GPUS)


def case_lines(cases: list[dict], device_name: str | None) -> list[str]:
    """Markdown beside a GPU benchmark run: the model's fwd and fwd+bwd ratios for each
    case, for the fused kernels and the composition (benchmarks/report.py)."""
    gpus = gpu_for(device_name)
    head = ["K x N", "M", "r", "p",
            *[f"{g} {plan} {ph}" for g in gpus for plan in ("fused", "composition")
              for ph in ("fwd", "fwd+bwd")]]
    lines = [f"Roofline MODEL, not a measurement (benchmarks/roofline.py; bf16 peaks of "
             f"{', '.join(GPUS[g].name for g in gpus)}): predicted time / frozen nn.Linear's.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        if c.get("dtype") not in (None, "bfloat16", "float16"):
            continue
        s = Shape(c["M"], c["K"], c["N"], c["r"], c["p"], bias=bool(c.get("bias")))
        cells = []
        for g in gpus:
            for plan in (fused(s), composition(s)):
                rt = ratios(plan, s, GPUS[g])
                cells += [f"{rt['fwd']:.3f}", f"{rt['fwd+bwd']:.3f}"]
        lines.append(f"| {c['K']}x{c['N']} | {c['M']} | {c['r']} | {c['p']:g} | "
                     + " | ".join(cells) + " |")
    return lines


def sources() -> list[str]:
    return [f"- {g.name}: {g.bandwidth / 1e12:.2f} TB/s, {g.tensor / 1e12:.0f} TFLOPS bf16 dense, "
            f"{g.alu / 1e12:.2f} T ALU instructions/s ({g.source})" for g in GPUS.values()]


def _shapes(kn_list: str, ms: str, rs: str, ps: str) -> list[Shape]:
    out = []
    for kn in kn_list.split(","):
        k, n = (int(v) for v in kn.lower().split("x"))
        for m in (int(v) for v in ms.split(",")):
            for r in (int(v) for v in rs.split(",")):
                for p in (float(v) for v in ps.split(",")):
                    out.append(Shape(m, k, n, r, p))
    return out


HEADER = ("Roofline MODEL, not a measurement: per launch t = max(bytes / bandwidth, tensor "
          "FLOPs / bf16 dense peak, ALU instructions / FP32 lane rate), summed over launches; "
          "cells are that bound over the frozen nn.Linear's (x W^T forward, dy W backward), "
          "bf16, adapters in bf16, no bias.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096",
                    help="comma list of KxN (in x out)")
    ap.add_argument("--m", default="8192", help="comma list of M")
    ap.add_argument("--r", default="16", help="comma list of ranks")
    ap.add_argument("--p", default="0,0.1", help="comma list of dropout rates")
    ap.add_argument("--variants", default="4096x4096",
                    help="KxN list for the 4-bit and DoRA rows ('' for none)")
    ap.add_argument("--band", default="4096x4096",
                    help="KxN list for the band of every candidate pairing ('' for none)")
    ap.add_argument("--launches", default="4096x4096:8192:16:0.1",
                    help="KxN:M:r:p whose launches to list ('' for none)")
    args = ap.parse_args(argv)
    print(HEADER, "Peaks used:", "", *sources(), sep="\n")
    print("\nfastlora, dense base:\n")
    print("\n".join(ratio_table(_shapes(args.shapes, args.m, args.r, args.p), DENSE)))
    if args.variants:
        variants = tuple(k for k in plans(Shape(16, 16, 16, 1)) if k not in DENSE)
        variants = tuple(k for k in variants if k != "frozen nn.Linear")
        print("\n4-bit base (bnb NF4, blocksize 64) and DoRA:\n")
        print("\n".join(ratio_table(_shapes(args.variants, args.m, args.r, args.p), variants)))
    if args.band:
        print("\n" + BAND_HEADER + "\n")
        print("\n".join(band_table(_shapes(args.band, args.m, args.r, args.p))))
    if args.launches:
        kn, m, r, p = args.launches.split(":")
        s = _shapes(kn, m, r, p)[0]
        for label in ("fused (kernels/)", "composition (cuBLAS)"):
            print(f"\n{label}, {s.label()}, per launch:\n")
            print("\n".join(launch_table(s, plans(s, with_variants=False)[label])))


if __name__ == "__main__":
    main()
