"""The floor of LoRA as a composition of BLAS calls on this CPU: ``python -m benchmarks.cpu_floor``.

Times bare torch calls, no autograd and no module: the frozen layer's two GEMMs (``x W^T``,
``dy W``) against the same two plus LoRA's six skinny products (``x A^T``, ``u B^T``,
``dy B``, ``g A``, ``g^T x``, ``u^T dy``) in three orders, interleaved round by round, each
ratio the median over rounds of the ratio within a round (``timing.paired_ratio``). It is
the cost of these calls alone, with nothing around them: what the torch backend's order
("small first") can at best approach, since the module adds its autograd and Python on top.
Lower is better; a busy machine moves it.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.timing import cpu_interleaved, paired_ratio


def jobs(M: int, K: int, N: int, r: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    W = torch.randn(N, K, generator=g) * K**-0.5
    A, B = torch.randn(r, K, generator=g) * K**-0.5, torch.randn(N, r, generator=g) * r**-0.5

    def frozen(_):
        return torch.mm(x, W.t()), torch.mm(dy, W)

    def small_first(_):  # the torch backend's order: skinny product first, big GEMM onto it
        u = torch.mm(x, A.t())
        y = torch.mm(u, B.t()).addmm_(x, W.t())
        g = torch.mm(dy, B)
        dx = torch.mm(g, A).addmm_(dy, W)
        return y, dx, torch.mm(g.t(), x), torch.mm(u.t(), dy)

    def big_first(_):
        u = torch.mm(x, A.t())
        y = torch.mm(x, W.t()).addmm_(u, B.t())
        g = torch.mm(dy, B)
        dx = torch.mm(dy, W).addmm_(g, A)
        return y, dx, torch.mm(g.t(), x), torch.mm(u.t(), dy)

    def merged(_):  # forward and dx each from W + B A, formed in each (nothing kept between)
        u = torch.mm(x, A.t())
        y = torch.mm(x, torch.addmm(W, B, A).t())
        dx = torch.mm(dy, torch.addmm(W, B, A))
        g = torch.mm(dy, B)
        return y, dx, torch.mm(g.t(), x), torch.mm(u.t(), dy)

    fns = {"frozen": frozen, "small first": small_first, "big first": big_first,
           "merged W + BA": merged}
    return {(name,): (lambda: None, fn) for name, fn in fns.items()}


def check_same_function(timed: dict) -> None:
    """Every LoRA composition returns the same (y, dx, dA, dB) as the first one; y and dx
    differ from the frozen layer's (B is not zero). Raises AssertionError otherwise."""
    outs = {name: fn(None) for (name,), (_, fn) in timed.items()}
    frozen = outs.pop("frozen")
    (first, ref), *rest = outs.items()
    assert not torch.allclose(ref[0], frozen[0]), "the low-rank term vanished"
    for name, out in rest:
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=name: f"{n} differs from {first}: {m}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1024x1024", help="K x N (default 1024x1024)")
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args(argv)
    K, N = (int(v) for v in args.shape.lower().split("x"))
    timed = jobs(args.m, K, N, args.r)
    check_same_function(timed)
    res = cpu_interleaved(timed, reps=args.rounds, warmup=3)
    base = res[("frozen",)]
    print(f"K x N = {K}x{N}, M = {args.m}, r = {args.r}, fp32, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores (above the core count the ratios are unreliable)")
    print("| composition | median ms | ratio to the frozen GEMMs (lower is better) |")
    print("|---|---|---|")
    for (name,), r in res.items():
        print(f"| {name} | {r['median']:.3f} | {paired_ratio(r, base):.3f} |")


if __name__ == "__main__":
    main()
