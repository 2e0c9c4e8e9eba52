"""Timers. Every result is ``{"median", "p20", "p80", "n"}`` in milliseconds.

A job is ``(setup, fn)``: ``setup()`` runs untimed and returns the argument of ``fn`` (for
``bwd`` it runs the forward, so the backward is timed on a fresh graph, never a retained one:
PEFT under torch.compile refuses ``retain_graph``), ``fn(state)`` is what is timed; its
return value is dropped only after the clock stops.

- GPU: ``triton.testing.do_bench``'s method (one warm-up call, a runtime estimate, warm-up
  and repeat counts from ``warmup_ms``/``rep_ms``, the L2 cache flushed before every run,
  one pair of CUDA events per run, quantiles 0.5/0.2/0.8). Jobs with no setup go through
  ``do_bench`` itself; jobs with one (bwd) through the same loop written out here.
- CPU: ``perf_counter_ns`` around single calls, providers interleaved within each round
  (the order rotates every round so none always runs first after another), medians over
  rounds; ``torch.get_num_threads()`` is left as it is.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Hashable

import torch

QUANTILES = (0.5, 0.2, 0.8)
Setup = Callable[[], Any]
Timed = Callable[[Any], Any]


def _stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    if len(ms) == 1:
        return {"median": ms[0], "p20": ms[0], "p80": ms[0], "n": 1}
    q = statistics.quantiles(ms, n=10, method="inclusive")  # deciles
    return {"median": statistics.median(ms), "p20": q[1], "p80": q[7], "n": len(ms)}


# --------------------------------------------------------------------------- CPU


def cpu_interleaved(
    jobs: dict[Hashable, tuple[Setup, Timed]],
    reps: int,
    warmup: int = 2,
    group: Callable[[Hashable], Hashable] = lambda key: key[0],
    deadline: float | None = None,
) -> dict[Hashable, dict]:
    """Time every job once per round for ``warmup + reps`` rounds; jobs are grouped (by
    default by ``key[0]``, the provider) and the group order rotates each round. Stops early
    (keeping at least 3 rounds) once ``time.monotonic()`` passes ``deadline``."""
    groups: dict[Hashable, list[Hashable]] = {}
    for key in jobs:
        groups.setdefault(group(key), []).append(key)
    order = list(groups)
    samples: dict[Hashable, list[float]] = {key: [] for key in jobs}
    for rnd in range(warmup + reps):
        shift = rnd % len(order)
        for g in order[shift:] + order[:shift]:
            for key in groups[g]:
                setup, fn = jobs[key]
                state = setup()
                t0 = time.perf_counter_ns()
                out = fn(state)
                t1 = time.perf_counter_ns()
                del out, state
                if rnd >= warmup:
                    samples[key].append((t1 - t0) / 1e6)
        if deadline is not None and rnd >= warmup + 2 and time.monotonic() > deadline:
            break
    # the samples in round order too: a ratio is taken within each round (``paired_ratio``)
    return {key: {**_stats(ms), "rounds": ms} for key, ms in samples.items()}


def paired_ratio(a: dict, b: dict) -> float:
    """time(a) / time(b) from two results of one run.  Where both carry their samples in
    round order (``cpu_interleaved``), the median over rounds of the ratio within a round:
    a shared machine that slows down for a while slows both alike, and the ratio cancels it,
    where a ratio of two medians can pick them from different stretches.  Otherwise (GPU
    timings) the ratio of the medians."""
    ra, rb = a.get("rounds"), b.get("rounds")
    if ra and rb and len(ra) == len(rb):
        return statistics.median(x / y for x, y in zip(ra, rb))
    return a["median"] / b["median"]


# --------------------------------------------------------------------------- GPU


def _flush_buffer() -> tuple[Callable[[], None], Any]:
    from triton import runtime

    drv = runtime.driver.active
    if hasattr(drv, "get_empty_cache_for_benchmark"):
        cache = drv.get_empty_cache_for_benchmark()
        return (lambda: drv.clear_cache(cache)), cache
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > any L2 today
    return cache.zero_, cache


def gpu_time(setup: Setup | None, fn: Timed, grads: list[torch.Tensor],
             warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median and 20/80% quantiles (ms) of ``fn``; the ``.grad`` of ``grads`` is set to None
    untimed before every call (``do_bench(grad_to_none=...)``)."""
    if setup is None:
        import triton.testing

        q = triton.testing.do_bench(lambda: fn(None), warmup=warmup_ms, rep=rep_ms,
                                    grad_to_none=grads, quantiles=list(QUANTILES))
        return {"median": q[0], "p20": q[1], "p80": q[2], "n": None}

    clear, _cache = _flush_buffer()

    def event():
        return torch.cuda.Event(enable_timing=True)

    def one(start=None, end=None):
        for t in grads:
            t.grad = None
        state = setup()
        clear()
        if start is not None:
            start.record()
        out = fn(state)
        if end is not None:
            end.record()
        return out

    one()
    torch.cuda.synchronize()
    pairs = [(event(), event()) for _ in range(5)]
    for start, end in pairs:
        one(start, end)
    torch.cuda.synchronize()
    estimate = max(sum(a.elapsed_time(b) for a, b in pairs) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        one()
    pairs = [(event(), event()) for _ in range(max(1, int(rep_ms / estimate)))]
    for start, end in pairs:
        one(start, end)
    torch.cuda.synchronize()
    return _stats([a.elapsed_time(b) for a, b in pairs])
