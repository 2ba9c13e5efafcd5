"""What a diagnostics capture costs: forward time with no capture, after one (off), and during one (on).

    .venv/bin/python benchmarks/bench_capture_overhead.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_capture_overhead.py --quick    # seconds: a smoke test

"off" must equal "never": with no hook registered the modules compute no weights at all. "on" is the price of
recording (weights computed, copied to the CPU, split per set). "on, other model" is a capture of another model
running at the same time: the weights hook is global, so a module computes its weights whenever any capture is
active, and the capture then drops them. All runs are under ``torch.no_grad()`` in eval mode, the way diagnostics
are meant to run. Medians over ``--repeat`` timed calls after warm-up, "off", "on" and "other" interleaved call by
call; the floor is ``x.sum()`` over the packed input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable

import torch

from attnpool.diagnostics import capture
from attnpool.nn import PMA, AttentionPool, GatedAttentionPool


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    return interleaved_ms([fn], repeat, warmup)[0]


def interleaved_ms(fns: list[Callable[[], object]], repeat: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each function, timed in rounds (one call of each per round), so that a change in the
    machine's load affects all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy machine, thread-pool waits swamp small kernels)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sets, args.dim, args.max_len, args.repeat = 32, 64, 32, 5

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.max_len + 1, (args.sets,), generator=g)
    sets = [torch.randn(int(n), args.dim, generator=g) for n in lengths]
    packed = torch.cat(sets)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    padded = torch.nn.utils.rnn.pad_sequence(sets, batch_first=True)
    mask = torch.arange(padded.shape[1]) < lengths[:, None]
    d = args.dim
    cases: list[tuple[str, torch.nn.Module, Callable[[torch.nn.Module], object]]] = [
        ("AttentionPool, packed (fused kernel)", AttentionPool(d), lambda m: m(packed, offsets=offsets)),
        ("AttentionPool 4 heads + k/v proj, padded", AttentionPool(d, 1, 4, key_proj=True, value_proj=True),
         lambda m: m(padded, mask)),
        ("GatedAttentionPool, packed", GatedAttentionPool(d), lambda m: m(packed, offsets=offsets)),
        ("PMA 4 heads, packed", PMA(d, 1, 4), lambda m: m(packed, offsets=offsets)),
    ]
    other = AttentionPool(d)
    print(f"# Capture overhead, {dt.date.today()}, {platform.node()} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n{args.sets} sets of 1..{args.max_len} elements (N = {packed.shape[0]}), D = {d}; medians of "
          f"{args.repeat} calls. floor (x.sum()): {median_ms(lambda: packed.sum(), args.repeat):.3f} ms\n")
    print("| module | never (ms) | off, after a capture | on, recording | on, other model's capture |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, module, call in cases:
            module.eval()
            never = median_ms(lambda m=module, c=call: c(m), args.repeat)
            with capture(module):
                call(module)

            def recording(m=module, c=call) -> None:
                with capture(m):
                    c(m)

            def foreign_capture(m=module, c=call) -> None:
                with capture(other):
                    c(m)

            off, on, foreign = interleaved_ms([lambda m=module, c=call: c(m), recording, foreign_capture],
                                              args.repeat)
            print(f"| {name} | {never:.3f} | {off:.3f} ({off / never:.2f}x) | {on:.3f} ({on / never:.2f}x) | "
                  f"{foreign:.3f} ({foreign / never:.2f}x) |")


if __name__ == "__main__":
    main()
