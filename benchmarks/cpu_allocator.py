"""How much of a CPU forward+backward is the allocator's page faults: the single-query configuration of run.py
(B=2048 sets of 1..128 rows, D=128, float32, 64.5 MiB), timed with glibc's default malloc settings and again in a
fresh process after ``mallopt`` has raised its mmap and trim thresholds (freed blocks stay in the heap, so the next
call's 64 MiB gradient reuses mapped pages instead of faulting in fresh zeroed ones).

    python benchmarks/cpu_allocator.py [--threads 2] [--reps 21]

Each process prints, per row, the median wall time and, per call, minor page faults and system CPU time (from
``getrusage``). Rows: the floors (``x.sum()``; ``x.sum().backward()`` with ``x`` requiring grad) and attnpool's
``AttentionPool(score='dot')`` on the fused kernel, forward and forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from attnpool._allocator import malloc_reuse


def measure(threads: int, reps: int) -> dict[str, dict[str, float]]:
    import torch

    from attnpool.nn import AttentionPool

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 129, (2048,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.randn(int(offsets[-1]), 128, generator=g)
    xg = x.clone().requires_grad_(True)
    pool = AttentionPool(128, score="dot")

    def floor_fwd() -> None:
        with torch.no_grad():
            x.sum()

    def floor_fwd_bwd() -> None:
        xg.grad = None
        xg.sum().backward()

    def fwd() -> None:
        with torch.no_grad():
            pool(x, offsets=offsets)

    def fwd_bwd() -> None:
        xg.grad = None
        pool.zero_grad(set_to_none=True)
        pool(xg, offsets=offsets).sum().backward()

    rows = {"floor x.sum()": floor_fwd, "floor x.sum().backward()": floor_fwd_bwd,
            "attnpool gate, forward": fwd, "attnpool gate, forward+backward": fwd_bwd}
    out = {}
    for name, fn in rows.items():
        for _ in range(3):
            fn()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {"median_ms": statistics.median(times) * 1e3,
                     "minor_faults_per_call": (r1.ru_minflt - r0.ru_minflt) / reps,
                     "sys_ms_per_call": (r1.ru_stime - r0.ru_stime) / reps * 1e3}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--child", choices=["default", "mallopt"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "mallopt":
            malloc_reuse()
        print(json.dumps(measure(args.threads, args.reps)))
        return
    results = {}
    for mode in ("default", "mallopt"):  # a fresh process each: malloc's state is process-wide
        cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--reps", str(args.reps)]
        results[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                  env=os.environ).stdout.splitlines()[-1])
    print(f"{args.threads} thread(s), median of {args.reps}; per call: minor page faults, system CPU ms")
    print(f"{'row':34s} {'default malloc':>30s} {'mallopt (no fresh pages)':>30s}")
    for name in results["default"]:
        cells = [f"{r['median_ms']:7.2f} ms {r['minor_faults_per_call']:7.0f} pf {r['sys_ms_per_call']:5.1f} sys"
                 for r in (results["default"][name], results["mallopt"][name])]
        print(f"{name:34s} {cells[0]:>30s} {cells[1]:>30s}")
    for mode in ("default", "mallopt"):
        r = {k: v["median_ms"] for k, v in results[mode].items()}
        fwd = r["attnpool gate, forward"] / r["floor x.sum()"]
        fwd_bwd = r["attnpool gate, forward+backward"] / r["floor x.sum().backward()"]
        print(f"{mode}: forward / floor {fwd:.2f}, forward+backward / floor {fwd_bwd:.2f}")


if __name__ == "__main__":
    main()
