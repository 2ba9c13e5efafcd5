"""How steady is the floor? ``x.sum()`` and attnpool's fused one-query kernel, timed alternately for a minute.

    python benchmarks/floor_drift.py [--seconds 60] [--threads 2] [--out DIR]

The input is run.py's single-query configuration (B = 2048 sets of 1..128 rows, D = 128, float32, 64.5 MiB) and the
row is ``AttentionPool(128, score="dot")`` forward on the CPU kernel. Every round (a fifth of a second) times 15 pairs
(floor, row) *warm*, back to back as run.py does, and 15 pairs *cold*, each call after a read of a buffer three times
the last-level cache, so that ``x`` comes from memory and not partly from the cache (64.5 MiB is only twice a 32 MiB
L3). A round prints the medians and the median of its paired ratios; the end gives each series' range over the run.

Why: on a 2-vCPU VM the memory bandwidth a process gets moves with the neighbours' load, over seconds. If the row is
bandwidth-bound its time moves with the floor and the ratio stays put; if it is not, the ratio moves with the
neighbours. ``--out DIR`` writes ``floor_drift.json`` and ``floor_drift.png`` (GB/s over time) there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path

import torch

from attnpool._allocator import malloc_reuse
from attnpool._machine import cpu_name
from attnpool.kernels import use_kernel
from attnpool.nn import AttentionPool

PAIRS_PER_ROUND = 15


def last_level_cache_bytes() -> int:
    """The largest cache sysfs lists for cpu0 (64 MiB if it lists none)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=64 << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write floor_drift.json and floor_drift.png here")
    args = p.parse_args()

    malloc_reuse()  # as run.py does: no fresh pages per call
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 129, (2048,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.randn(int(offsets[-1]), 128, generator=g)
    pool = AttentionPool(128, score="dot")
    llc = last_level_cache_bytes()
    evict = torch.ones(3 * llc // 4)
    gb = x.numel() * x.element_size() / 1e9

    def floor() -> None:
        x.sum()

    def row() -> None:
        pool(x, offsets=offsets)

    def pairs(cold: bool) -> tuple[float, float, float]:
        floors, rows, ratios = [], [], []
        for _ in range(PAIRS_PER_ROUND):
            if cold:
                evict.sum()
            t0 = time.perf_counter()
            floor()
            t1 = time.perf_counter()
            if cold:
                evict.sum()
            t2 = time.perf_counter()
            row()
            t3 = time.perf_counter()
            floors.append(t1 - t0)
            rows.append(t3 - t2)
            ratios.append((t3 - t2) / (t1 - t0))
        return statistics.median(floors), statistics.median(rows), statistics.median(ratios)

    rounds = []
    with torch.no_grad(), use_kernel("cpu"):
        for _ in range(3):
            floor()
            row()
        print(f"x {gb * 1e3 / 1.048576:.1f} MiB, last-level cache {llc >> 20} MiB, {args.threads} thread(s); "
              f"per round the medians of {PAIRS_PER_ROUND} alternated pairs (GB/s = x's bytes / time)")
        print(f"{'s':>5} | {'warm: floor ms':>14} {'GB/s':>5} {'row ms':>7} {'GB/s':>5} {'ratio':>6} | "
              f"{'cold: floor ms':>14} {'GB/s':>5} {'row ms':>7} {'GB/s':>5} {'ratio':>6}")
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            t = time.perf_counter() - start
            warm, cold = pairs(False), pairs(True)
            rounds.append({"t_s": t, "warm": dict(zip(("floor_s", "row_s", "ratio"), warm)),
                           "cold": dict(zip(("floor_s", "row_s", "ratio"), cold))})
            cells = [f"{f * 1e3:14.2f} {gb / f:5.0f} {r * 1e3:7.2f} {gb / r:5.0f} {q:6.2f}" for f, r, q in (warm, cold)]
            print(f"{t:5.1f} | {cells[0]} | {cells[1]}", flush=True)

    summary = {}
    for mode in ("warm", "cold"):
        for key in ("floor_s", "row_s", "ratio"):
            vals = [r[mode][key] for r in rounds]
            summary[f"{mode}_{key}"] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    print(f"over {len(rounds)} rounds, min / median / max:")
    for mode in ("warm", "cold"):
        f, r, q = (summary[f"{mode}_{k}"] for k in ("floor_s", "row_s", "ratio"))
        print(f"  {mode}: floor {f['min'] * 1e3:.2f} / {f['median'] * 1e3:.2f} / {f['max'] * 1e3:.2f} ms "
              f"({gb / f['max']:.0f}-{gb / f['min']:.0f} GB/s); row {r['min'] * 1e3:.2f} / {r['median'] * 1e3:.2f} / "
              f"{r['max'] * 1e3:.2f} ms; ratio {q['min']:.2f} / {q['median']:.2f} / {q['max']:.2f}")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cpu = cpu_name()
        meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
                "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                "x_bytes": x.numel() * x.element_size(), "llc_bytes": llc, "pairs_per_round": PAIRS_PER_ROUND}
        (args.out / "floor_drift.json").write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds},
                                                              indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.6))
        ts = [r["t_s"] for r in rounds]
        for mode, style in (("warm", "-"), ("cold", "--")):
            ax.plot(ts, [gb / r[mode]["floor_s"] for r in rounds], style, color="tab:gray", label=f"x.sum(), {mode}")
            ax.plot(ts, [gb / r[mode]["row_s"] for r in rounds], style, color="tab:blue",
                    label=f"attnpool one-query kernel, {mode}")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("GB/s (x's bytes / median time)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{meta['date'][:10]}, {cpu}, {args.threads} threads: 64.5 MiB input", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "floor_drift.png", dpi=120)
        print(f"wrote {args.out / 'floor_drift.json'} and {args.out / 'floor_drift.png'}")


if __name__ == "__main__":
    main()
