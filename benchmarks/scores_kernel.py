"""Pooling with given scores on packed sets: the fused CPU kernel against the eager path it replaced.

    python benchmarks/scores_kernel.py [--threads 2] [--rounds 21]

`GatedAttentionPool` (Ilse et al.'s attention MIL pooling, gated and not) and `attnpool.functional.softmax_pool`
with precomputed scores, on packed input, forward and forward+backward, in two cases:

* ``mil``: 8 bags of 1..130 instances, D = 64, hidden width 64: one call of the MIL reproduction's packed layout,
  where per-call overhead dominates;
* ``large``: B = 2048 sets of 1..128 rows, D = 128 (the single-query configuration of `run.py`).

Each row is timed with the kernel (the default dispatch) and with ``use_kernel("reference")`` (the eager path:
segment softmax, then the weighted sum through an ``[N, K, D]`` product and ``index_add``), alternating in paired
rounds so that outside load hits both alike; the results are checked equal first. The floors, on the same input:
``x.sum()`` (forward) and ``x.sum().backward()`` (forward+backward). Freed blocks are kept for reuse, as in `run.py`
(`cpu_allocator.py`: otherwise every fresh gradient is page-faulted in). Medians in ms; "kernel / eager" is the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cpu_allocator import malloc_reuse

from attnpool import functional as AF
from attnpool.kernels import use_kernel
from attnpool.nn import GatedAttentionPool


def make_case(name: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    if name == "mil":
        lengths = torch.randint(1, 131, (8,), generator=g)
        dim = 64
    else:
        lengths = torch.randint(1, 129, (2048,), generator=g)
        dim = 128
    x = torch.randn(int(lengths.sum()), dim, generator=g)
    return x, lengths, dim


def bench_case(case: str, g: torch.Generator, rounds: int) -> None:
    x, lengths, dim = make_case(case, g)
    torch.manual_seed(0)
    pools = {"gated attention": GatedAttentionPool(dim, hidden_dim=64),
             "attention": GatedAttentionPool(dim, hidden_dim=64, gated=False)}
    scores = torch.randn(x.shape[0], 1, generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    xg = x.clone().requires_grad_()
    sg = scores.clone().requires_grad_()

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x, scores)
        return run

    def fwd_bwd(fn):
        def run():
            xg.grad = sg.grad = None
            for prm in pool_params:
                prm.grad = None
            out = fn(xg, sg)
            out.sum().backward()
            return out.detach(), xg.grad
        return run

    rows = {}
    pool_params = [q for pool in pools.values() for q in pool.parameters()]
    for label, pool in pools.items():
        rows[label] = lambda x, s, pool=pool: pool(x, lengths=lengths)
    rows["softmax_pool (given scores)"] = lambda x, s: AF.softmax_pool(x, s, offsets=offsets)
    print(f"\n{case}: N = {x.shape[0]}, B = {lengths.shape[0]}, D = {dim} ({x.numel() * 4 / 2**20:.1f} MiB)")
    floor_f = lambda: x.sum()  # noqa: E731

    def floor_fb():
        xg.grad = None
        xg.sum().backward()

    for mode, wrap, floor in (("forward", fwd, floor_f), ("forward+backward", fwd_bwd, floor_fb)):
        fns = {"floor": floor}
        for label, fn in rows.items():
            kernel, eager = wrap(fn), wrap(fn)
            got = kernel()
            with use_kernel("reference"):
                want = eager()
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            fns[f"{label} kernel"] = kernel
            fns[f"{label} eager"] = eager
        ts: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                if k.endswith("eager"):
                    with use_kernel("reference"):
                        t = time.perf_counter()
                        fn()
                        ts[k].append(time.perf_counter() - t)
                else:
                    t = time.perf_counter()
                    fn()
                    ts[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        print(f"  {mode}: floor {med['floor']:.3f}")
        for label in rows:
            ratio = statistics.median(a / b for a, b in zip(ts[f"{label} kernel"], ts[f"{label} eager"]))
            print(f"    {label:28s} kernel {med[f'{label} kernel']:8.3f}  eager {med[f'{label} eager']:8.3f}  "
                  f"kernel / eager {ratio:.2f}  kernel / floor {med[f'{label} kernel'] / med['floor']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    print(malloc_reuse())
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{args.threads} thread(s), median of {args.rounds} paired rounds, ms")
    for case in ("mil", "large"):
        bench_case(case, g, args.rounds)


if __name__ == "__main__":
    main()
