"""What a call costs around the fused CPU kernel: the C entry point, the Python wrapper, and the module.

    python benchmarks/call_overhead.py [--threads 2] [--rounds 200] [--baseline GIT_REV]

Two inputs, both float32 at D = 128: a small batch (B = 8 sets of 1..64 rows, 128 KiB: the call is mostly overhead,
as in a MIL step or a knowledge-base query) and run.py's single-query configuration (B = 2048 sets of 1..128 rows,
64.5 MiB). Each round times, one after the other, ``x.sum()`` (the floor), the kernel through its C entry point,
``attnpool.kernels.cpu.segment_attention_pool`` and ``AttentionPool(score='dot')`` (forward, no grad). The C call
inside each is timed too (the library's ``ap_forward`` is wrapped), so the table gives, besides the medians, the
median time *outside* the C call: the Python around the kernel. On the large input that Python runs right after a
64 MiB stream has evicted its code and data from the caches, so it costs several times what it costs on the small
one.

``--baseline REV`` also times the module of git revision REV in the same process, alternating with this one (its
``src/attnpool`` exported with ``git archive`` and imported as ``attnpool_baseline``; the kernel library is built from
REV's sources too), and prints the median of the per-round ratios this / REV, for before/after figures that outside
load hits alike. Freed blocks are kept in the heap (as run.py does), so no call pays page faults.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from attnpool._allocator import malloc_reuse
from attnpool._machine import cpu_name
from attnpool.kernels import cpu, use_kernel
from attnpool.nn import AttentionPool

ROOT = Path(__file__).resolve().parent.parent
CASES = [("B=8, L 1..64", 8, 64), ("B=2048, L 1..128", 2048, 128)]
D = 128


def import_revision(rev: str):
    """``src/attnpool`` at ``rev`` as the package ``attnpool_baseline`` (imports inside it renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix="attnpool-rev-"))
    blob = subprocess.run(["git", "archive", rev, "src/attnpool"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp, filter="data")
    pkg = tmp / "src" / "attnpool"
    statement = re.compile(r"\b(from|import) attnpool(\.|\b)")
    module_name = re.compile(r"([\"'])attnpool\.")  # importlib.import_module(f"attnpool.kernels.{name}")
    for path in pkg.rglob("*.py"):
        text = statement.sub(r"\1 attnpool_baseline\2", path.read_text())
        path.write_text(module_name.sub(r"\1attnpool_baseline.", text))
    pkg.rename(tmp / "attnpool_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("attnpool_baseline")


def time_c_calls(lib) -> list[float]:
    """Wrap ``lib.ap_forward`` so that each call appends its duration to the returned list."""
    inner, spent = lib.ap_forward, []

    def timed(*args):
        t = time.perf_counter()
        status = inner(*args)
        spent.append(time.perf_counter() - t)
        return status
    lib.ap_forward = timed
    return spent


def c_entry(x: torch.Tensor, offsets: torch.Tensor, q: torch.Tensor, scale: float) -> Callable[[], object]:
    lib = cpu.build()
    b, m = offsets.shape[0] - 1, q.shape[1]
    out, lse = torch.empty(b, m, D), torch.empty(b, m)

    def run() -> None:
        status = lib.ap_forward(0, x.data_ptr(), D, x.shape[0], D, offsets.data_ptr(), b, q.data_ptr(), 1, m, scale,
                                out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
        assert status == 0, status
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=200, help="rounds on the small input (a tenth on the large one)")
    p.add_argument("--baseline", metavar="REV", help="also time the module of this git revision, calls alternating")
    args = p.parse_args()
    malloc_reuse()
    torch.set_num_threads(args.threads)
    base = import_revision(args.baseline) if args.baseline else None
    c_time = {"now": time_c_calls(cpu.build())}
    if base is not None:
        c_time["baseline"] = time_c_calls(importlib.import_module("attnpool_baseline.kernels.cpu").build())
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; medians in us; 'outside C' is the "
          "median time of a call outside its C call")
    for name, b, max_len in CASES:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(1, max_len + 1, (b,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        x = torch.randn(int(offsets[-1]), D, generator=g)
        pool = AttentionPool(D, score="dot")
        q = pool.query.detach().reshape(1, 1, D).contiguous()
        scale = D**-0.5
        rows: dict[str, Callable[[], object]] = {
            "floor x.sum()": x.sum,
            "C entry point": c_entry(x, offsets, q, scale),
            "cpu.segment_attention_pool": partial(cpu.segment_attention_pool, x, offsets, q, scale),
            "AttentionPool(score='dot')": partial(pool, x, offsets=offsets),
        }
        if base is not None:
            old = base.nn.AttentionPool(D, score="dot")
            old.load_state_dict(pool.state_dict())
            rows[f"AttentionPool at {args.baseline}"] = partial(old, x, offsets=offsets)
        rounds = args.rounds if b < 100 else max(11, args.rounds // 10)
        times: dict[str, list[float]] = {k: [] for k in rows}
        outside: dict[str, list[float]] = {k: [] for k in rows}
        lib_of = {k: "baseline" if k.endswith(f"at {args.baseline}") else "now" for k in rows}
        forced = [use_kernel("cpu")] + ([base.kernels.use_kernel("cpu")] if base is not None else [])
        for ctx in forced:
            ctx.__enter__()
        try:
            with torch.no_grad():
                reference = rows["AttentionPool(score='dot')"]()
                if base is not None:
                    torch.testing.assert_close(rows[f"AttentionPool at {args.baseline}"](), reference)
                for fn in rows.values():
                    fn()
                for _ in range(rounds):
                    for k, fn in rows.items():
                        spent = c_time[lib_of[k]]
                        spent.clear()
                        t = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
                        if k != "floor x.sum()":
                            outside[k].append(times[k][-1] - sum(spent))
        finally:
            for ctx in reversed(forced):
                ctx.__exit__(None, None, None)
        print(f"\n{name} ({x.numel() * 4 / 2**20:.2f} MiB), {rounds} rounds")
        print("| call | median (us) | outside C (us) |\n|---|--:|--:|")
        for k, v in times.items():
            out = f"{statistics.median(outside[k]) * 1e6:.1f}" if outside[k] else ""
            print(f"| {k} | {statistics.median(v) * 1e6:.1f} | {out} |")
        if base is not None:
            ratio = statistics.median(a / b for a, b in zip(times["AttentionPool(score='dot')"],
                                                             times[f"AttentionPool at {args.baseline}"]))
            print(f"module now / at {args.baseline}: {ratio:.3f} (median of the per-round ratios)")


if __name__ == "__main__":
    main()
