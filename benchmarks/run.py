"""attnpool against its peers, side by side in one process: same function, same parameters, outputs checked first.

    scripts/bench-venv.sh && .venv-bench/bin/python benchmarks/run.py            # everything (most of an hour)
    .venv-bench/bin/python benchmarks/run.py --quick                             # tiny sizes, seconds: a smoke test
    .venv/bin/python benchmarks/run.py --quick                                   # peers that import there only

Writes ``<out>/<date>-<machine>[-quick].{md,json,png}`` (default ``benchmarks/results/``). See benchmarks/README.md
for what each column means.

For every configuration: the floor (``x.sum()`` over the packed input; for forward+backward, ``x.sum()`` forward and
backward with ``x`` requiring grad), then for every pooled function (a *task*) the float64 ground truth (attnpool's
module in float64 on its reference kernel) and every implementation (a *row*). A row's output and its input gradient
are checked against the truth before it is timed; a row that does not match is reported and not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from peers import PREBUILT, Batch, Row, Task, make_batch

import attnpool
from attnpool import kernels as ap_kernels

ROOT = Path(__file__).resolve().parent.parent
ATTNPOOL = "attnpool"
X = "\u00d7"  # the multiplication sign of the report's ratios

# A row matches when max|y - truth| / max|truth| is at most this (see tolerance()), its input gradient likewise.
# The truth is float64; a float32 row is expected near 1e-6, a half-precision row near its rounding (bf16: 2^-8).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def tolerance(batch: Batch) -> float:
    """:data:`TOLERANCE` of the input dtype, widened by ``sqrt(L_max / 1024)`` for longer sets: rounding in a float32
    sum of ``L`` terms grows like ``sqrt(L)`` (the skewed batch's set of 1M elements)."""
    return TOLERANCE[batch.x.dtype] * max(1.0, math.sqrt(batch.max_len / 1024))


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    name: str
    title: str
    lengths: Callable[[torch.Generator], Tensor]
    dim: int
    dtype: torch.dtype
    tasks: list[tuple[str, dict[str, Any]]]
    group: str = ""  # "scaling-N", "scaling-D": drawn as curves
    seed: int = 0


def uniform(batch_size: int, lo: int, hi: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(lo, hi + 1, (batch_size,), generator=g)


def skewed(big: int, small_sets: int, hi: int) -> Callable[[torch.Generator], Tensor]:
    """``small_sets`` sets of 1..hi with one set of ``big`` elements in the middle."""
    def make(g: torch.Generator) -> Tensor:
        small = torch.randint(1, hi + 1, (small_sets,), generator=g)
        half = small_sets // 2
        return torch.cat([small[:half], torch.tensor([big]), small[half:]])
    return make


GATE_LIKE: list[tuple[str, dict[str, Any]]] = [("gate", {}), ("softmax_agg", {})]


def configs(quick: bool) -> list[Config]:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if quick:
        out = [
            Config("single-query", "single query, B=64, L in 1..16, D=32", uniform(64, 1, 16), 32, f32,
                   [*GATE_LIKE, ("mha", {"heads": 1})]),
            Config("single-query-bf16", "single query, bf16", uniform(64, 1, 16), 32, bf16, [("gate", {})]),
            Config("pma-map", "PMA/MAP, 4 heads, B=8, L in 1..32, D=32", uniform(8, 1, 32), 32, f32,
                   [("pma", {"heads": 4}), ("map", {"heads": 4}), ("mha", {"heads": 4})]),
            Config("tiny-sets", "many tiny sets, B=128, L in 1..4, D=16", uniform(128, 1, 4), 16, f32, GATE_LIKE),
            Config("skewed", "one set of 2000 beside 100 sets of 1..8, D=16", skewed(2000, 100, 8), 16, f32,
                   GATE_LIKE),
        ]
        out += [Config(f"scaling-N/B={b}", f"gate, B={b}, L in 1..16, D=32", uniform(b, 1, 16), 32, f32,
                       [("gate", {})], group="scaling-N") for b in (32, 128)]
        out += [Config(f"scaling-D/D={d}", f"gate, B=64, L in 1..16, D={d}", uniform(64, 1, 16), d, f32,
                       [("gate", {})], group="scaling-D") for d in (16, 32)]
        return out
    out = [
        Config("single-query", "single query: B=2048, L uniform in 1..128, D=128", uniform(2048, 1, 128), 128, f32,
               [*GATE_LIKE, ("mha", {"heads": 1})]),
        Config("single-query-bf16", "single query, bfloat16: B=2048, L in 1..128, D=128", uniform(2048, 1, 128), 128,
               bf16, GATE_LIKE),
        Config("single-query-fp16", "single query, float16: B=2048, L in 1..128, D=128", uniform(2048, 1, 128), 128,
               f16, [("gate", {})]),
        Config("pma-map", "PMA and MAP, 4 heads: B=256, L uniform in 1..1024, D=256", uniform(256, 1, 1024), 256, f32,
               [("pma", {"heads": 4}), ("map", {"heads": 4}), ("mha", {"heads": 4})]),
        Config("pma-map-bf16", "MAP, 4 heads, bfloat16: B=256, L in 1..1024, D=256", uniform(256, 1, 1024), 256, bf16,
               [("map", {"heads": 4})]),
        Config("tiny-sets", "many tiny sets: B=16384, L uniform in 1..16, D=64", uniform(16384, 1, 16), 64, f32,
               [*GATE_LIKE, ("mha", {"heads": 1})]),
        Config("skewed", "skewed: one set of 1,000,000 beside 10,000 sets of 1..8, D=64",
               skewed(1_000_000, 10_000, 8), 64, f32, GATE_LIKE),
    ]
    out += [Config(f"scaling-N/B={b}", f"gate, B={b}, L in 1..128, D=128", uniform(b, 1, 128), 128, f32,
                   [("gate", {})], group="scaling-N") for b in (256, 1024, 4096, 8192)]
    out += [Config(f"scaling-D/D={d}", f"gate, B=2048, L in 1..128, D={d}", uniform(2048, 1, 128), d, f32,
                   [("gate", {})], group="scaling-D") for d in (32, 64, 128, 256, 512)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


SLOW_ROW_S, SLOW_ROW_RUNS = 5.0, 3  # a row whose first call takes longer gets this many timed runs


@dataclasses.dataclass
class Timing:
    warmup: int
    min_runs: int
    max_runs: int
    budget_s: float


def median_time(fn: Callable[[], object], t: Timing) -> dict[str, float]:
    """Median wall time of ``fn`` in seconds, after warmup: at least ``min_runs`` runs, more while the budget
    lasts (a slow first call counts as the whole warmup; a first call over ``SLOW_ROW_S`` means 3 runs)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first < 1.0:
        for _ in range(t.warmup - 1):
            fn()
    # a row whose one call takes seconds (timm's bfloat16 MAP head on the CPU: 69 s forward+backward) is far from
    # the fastest rows whatever its spread: 3 runs, so that it cannot hold the whole benchmark up for half an hour
    min_runs = min(t.min_runs, SLOW_ROW_RUNS) if first > SLOW_ROW_S else t.min_runs
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < t.max_runs and time.perf_counter() - start < t.budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "min": min(times), "runs": len(times)}


PAIRED_ROUNDS = 21
PAIRED_ROUNDS_SLOW = 5  # where one call of the row takes over PAIRED_SLOW_S


PAIRED_SLOW_S = 0.1


def paired_floor_ratio(fn: Callable[[], object], floor_fn: Callable[[], object], rounds: int) -> dict[str, float]:
    """``fn``'s time over the floor's, the two called alternately: the median of the per-round ratios.

    On a VM the memory bandwidth moves with the neighbours' load (the floor of one configuration read 39 to 57 GB/s
    in runs minutes apart), so a floor timed once and a row timed a minute later can be 1.5x apart for no reason in
    the row; alternating calls see the same bandwidth."""
    fn()
    floor_fn()
    ratios, times, floors = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        floor_fn()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        times.append(t2 - t1)
        floors.append(t1 - t0)
    return {"ratio": statistics.median(ratios), "median": statistics.median(times),
            "floor_median": statistics.median(floors), "rounds": rounds}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the C++ side's stderr (the profiler's start/stop lines) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def forward_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of the bytes allocated and not yet freed during one forward (``torch.no_grad``), from the memory events
    of ``torch.profiler`` (CPU allocator: every tensor torch allocates, the output included; the inputs and the
    parameters, already allocated, are not counted). None where the profiler gives no events."""
    try:
        with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as prof, torch.no_grad():
            out = fn()
            del out
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    if not events:
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def kernel_spy() -> Iterator[list[str]]:
    """Record which attnpool kernels the dispatcher hands out (nothing: the eager path ran). Both lookups are
    watched: the attention pools' (``attnpool.functional.pool.get_kernel``) and the per-channel pool's
    (``attnpool.kernels.get_kernel``)."""
    import attnpool.functional.pool as pool_mod
    import attnpool.kernels as kernels_mod

    calls: list[str] = []
    original = getattr(pool_mod, "get_kernel", None)
    if original is None:
        calls.append("?")
        yield calls
        return

    def spy(*args: Any, **kwargs: Any) -> Any:
        choice = original(*args, **kwargs)
        calls.append(str(choice[0]) if isinstance(choice, tuple) else "?")
        return choice

    pool_mod.get_kernel = spy
    kernels_mod.get_kernel = spy
    try:
        yield calls
    finally:
        pool_mod.get_kernel = original
        kernels_mod.get_kernel = original


def rel_err(y: Tensor, truth: Tensor, keep: Tensor | None) -> float:
    """``max |y - truth| / max |truth|`` over the kept rows (all when ``keep`` is None); inf for NaN or Inf."""
    y = y.detach().double().reshape(truth.shape)
    if keep is not None:
        y, truth = y[keep], truth[keep]
    if truth.numel() == 0:
        return 0.0
    err = float((y - truth).abs().max() / truth.abs().max().clamp_min(1e-300))
    return err if math.isfinite(err) else math.inf


def resolved_kernel(x: Tensor) -> str:
    """The backend the dispatcher picks for ``x`` now (its signature has grown a dtype; older ones lack it)."""
    try:
        return ap_kernels.get_kernel(x.device.type, x.dtype)[0]
    except TypeError:
        return ap_kernels.get_kernel(x.device.type)[0]


def kernel_context(row: Row) -> contextlib.AbstractContextManager[None]:
    return ap_kernels.use_kernel(row.kernel) if row.kernel else contextlib.nullcontext()


def run_row(row: Row, batch: Batch, task: Task, truth_grad: Tensor, grad_out: Tensor, timing: Timing | None,
            memory: bool, floors: dict[str, Callable[[], object]] | None = None) -> dict[str, Any]:
    """Check one row against the truth, then (``timing`` given) time it and measure its memory; with ``floors``,
    an attnpool row on a kernel other than the reference is also timed alternately with the floor."""
    res: dict[str, Any] = {"task": task.name, "name": row.name, "library": row.library, "input": row.input,
                           "kernel": row.kernel, "note": row.note, "status": "ok"}
    tol = tolerance(batch)
    base = batch.padded if row.input == PREBUILT else batch.x
    assert base is not None
    keep_elems = None if row.compare is None else row.compare[batch.index]
    if task.grad_skip is not None:
        keep_elems = ~task.grad_skip if keep_elems is None else keep_elems & ~task.grad_skip
        res["grad_skipped_elements"] = int(task.grad_skip.sum())
    try:
        with kernel_context(row):
            if row.kernel:
                res["kernel_resolved"] = resolved_kernel(batch.x)
            with torch.no_grad(), kernel_spy() as calls:
                out = row.fn(base)
            if row.library == ATTNPOOL:
                res["path"] = "+".join(sorted(set(calls))) if calls else "eager"
            res["err"] = rel_err(out, task.truth, row.compare)
            if res["err"] > tol:
                res["status"] = "mismatch"
                res["message"] = (f"output differs from the float64 truth: max rel err {res['err']:.2e} > "
                                  f"tolerance {tol:.0e}; not timed")
                return res

            def forward() -> Tensor:
                with torch.no_grad():
                    return row.fn(base)

            pair = timing is not None and floors is not None and row.library == ATTNPOOL and bool(row.kernel) and \
                row.kernel != "reference"

            def paired(fn: Callable[[], object], key: str, one_call_s: float) -> None:
                if pair and floors is not None:
                    rounds = PAIRED_ROUNDS_SLOW if one_call_s > PAIRED_SLOW_S else PAIRED_ROUNDS
                    res[f"{key}_paired"] = paired_floor_ratio(fn, floors[key], rounds)

            if timing:
                res["fwd"] = median_time(forward, timing)
                paired(forward, "fwd", res["fwd"]["median"])

            inp = base.detach().requires_grad_(True)
            g = grad_out.to(out.dtype)

            def step() -> None:
                for p in row.params:
                    p.grad = None
                inp.grad = None
                row.fn(inp).backward(g)

            try:
                step()
                assert inp.grad is not None
                gx = inp.grad[batch.index, batch.pos] if row.input == PREBUILT else inp.grad
                res["grad_err"] = rel_err(gx, truth_grad, keep_elems)
                if res["grad_err"] > tol:
                    res["status"] = "grad mismatch"
                    res["message"] = (f"input gradient differs from the float64 truth: max rel err "
                                      f"{res['grad_err']:.2e} > tolerance {tol:.0e}; forward+backward not timed")
                elif timing:
                    res["fwd_bwd"] = median_time(step, timing)
                    paired(step, "fwd_bwd", res["fwd_bwd"]["median"])
            except Exception as e:  # a path without a backward, say
                res["status"] = "backward error"
                res["message"] = f"forward+backward failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                for p in row.params:
                    p.grad = None
            if memory and timing:
                res["peak_bytes"] = forward_peak_bytes(forward)
                res["input_bytes"] = base.nbytes
    except Exception as e:
        res["status"] = "error"
        res["message"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return res


def floor_fns(x: Tensor) -> dict[str, Callable[[], object]]:
    """The floors: ``x.sum()`` (one read of ``x``), and forward+backward (one read of ``x``, one write of its
    gradient)."""
    def fwd() -> Tensor:
        with torch.no_grad():
            return x.sum()

    xg = x.detach().requires_grad_(True)

    def fwd_bwd() -> None:
        xg.grad = None
        xg.sum().backward()

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def floor_times(fns: dict[str, Callable[[], object]], timing: Timing) -> dict[str, Any]:
    return {key: median_time(fn, timing) for key, fn in fns.items()}


def task_truth_grad(task: Task, batch: Batch, grad_out: Tensor) -> Tensor:
    x64 = batch.x.detach().double().requires_grad_(True)
    task.truth_fn(x64).backward(grad_out.double())
    assert x64.grad is not None
    return x64.grad


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace, kernels: list[str]) -> dict[str, Any]:
    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception as e:
            return f"not importable ({type(e).__name__})"

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except Exception:
        commit = "unknown"
    cpu_reason = None
    try:
        from attnpool.kernels import cpu as cpu_kernel

        if not cpu_kernel.is_available():
            cpu_reason = getattr(cpu_kernel, "unavailable_reason", lambda: "is_available() is False")()
    except Exception as e:
        cpu_reason = f"{type(e).__name__}: {e}"
    if cpu_reason:  # a compiler's log: its first line and its first error are enough here
        lines = str(cpu_reason).splitlines()
        cpu_reason = " … ".join(dict.fromkeys([lines[0], *[ln.strip() for ln in lines if "error" in ln][:1]]))
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnpool": f"{attnpool.__version__} @ {commit}",
        "torch_geometric": version("torch_geometric"),
        "timm": version("timm"),
        "kernels_available": ap_kernels.available_kernels(),
        "auto_kernel_on_cpu": resolved_kernel(torch.empty(0)),
        "cpu_kernel_unavailable": cpu_reason,
        "kernels_run": kernels,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "load_average_at_start": os.getloadavg()[0],
        "malloc": getattr(args, "malloc_note", "glibc default"),
        "note": args.note,
    }


def machine_slug(env: dict[str, Any]) -> str:
    cpu = re.sub(r"\((R|TM)\)|CPU|Processor|@.*|\d+-Core", "", env["cpu"], flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or platform.machine()
    return f"{slug}-{env['cores']}cpu"


def parse_kernels(spec: str | None) -> list[str]:
    if spec is None:  # every backend that runs on the CPU here
        return [k for k in ap_kernels.available_kernels() if k != "triton"]
    names = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in names if k not in ("auto", "reference", "cpu", "triton")]
    if bad:
        raise SystemExit(f"--kernels: expected names among auto, reference, cpu, triton; got {bad}")
    return names


def fmt_ms(t: dict[str, float] | None) -> str:
    if not t:
        return "—"
    ms = t["median"] * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def run(args: argparse.Namespace, on_config: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every configuration of ``args``; ``on_config(results)`` after each one, with the results so far."""
    if args.threads is None and args.quick:
        # a smoke test: one thread finishes in seconds even when other work shares the cores, where a thread pool
        # waits at every barrier for a descheduled worker
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = parse_kernels(args.kernels)
    env = environment(args, kernels)
    timing = (Timing(warmup=1, min_runs=3, max_runs=3, budget_s=0.0) if args.quick
              else Timing(warmup=2, min_runs=5, max_runs=50, budget_s=args.budget))
    cfgs = [c for c in configs(args.quick) if not args.only or any(re.search(p, c.name) for p in args.only)]
    print(f"attnpool benchmark: {len(cfgs)} configurations on {env['cpu']} ({env['torch_threads']} threads), "
          f"torch {env['torch']}, kernels {kernels} (available: {env['kernels_available']}; auto -> "
          f"{env['auto_kernel_on_cpu']})", flush=True)
    if env["cpu_kernel_unavailable"]:
        print(f"  cpu kernel unavailable: {env['cpu_kernel_unavailable']}", flush=True)
    results: dict[str, Any] = {"environment": env, "tolerance": {str(k): v for k, v in TOLERANCE.items()},
                               "configs": []}
    started = time.perf_counter()
    told: set[tuple[str, str]] = set()  # skip reasons already printed
    for ci, cfg in enumerate(cfgs, 1):
        gen = torch.Generator().manual_seed(cfg.seed)
        batch = make_batch(cfg.lengths(gen), cfg.dim, cfg.dtype, seed=cfg.seed + 1,
                           pad_limit_bytes=int(args.pad_limit_gib * 2**30))
        n = batch.x.shape[0]
        floors = floor_fns(batch.x)
        floor = floor_times(floors, timing)
        gbps = batch.x.nbytes / floor["fwd"]["median"] / 1e9
        print(f"[{ci}/{len(cfgs)}] {cfg.name}: {cfg.title}; N={n:,}, x {batch.x.nbytes / 2**20:.1f} MiB, "
              f"floor fwd {fmt_ms(floor['fwd'])} ms ({gbps:.1f} GB/s), fwd+bwd {fmt_ms(floor['fwd_bwd'])} ms "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
        cres: dict[str, Any] = {"name": cfg.name, "title": cfg.title, "group": cfg.group, "B": batch.batch_size,
                                "N": n, "D": cfg.dim, "dtype": str(cfg.dtype).replace("torch.", ""),
                                "L_max": batch.max_len, "x_bytes": batch.x.nbytes, "padded_bytes": batch.padded_bytes,
                                "floor": floor, "floor_GBps": gbps, "tasks": []}
        for task_name, kw in cfg.tasks:
            if args.tasks and task_name not in args.tasks:
                continue
            try:
                task = peers.BUILDERS[task_name](batch, kernels, cfg.seed + 2, **kw)
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"    {task_name}: could not be built: {msg}", flush=True)
                cres["tasks"].append({"name": task_name, "title": "", "error": msg, "rows": [], "skipped": []})
                continue
            grad_out = torch.randn(task.truth.shape, generator=torch.Generator().manual_seed(cfg.seed + 3),
                                   dtype=torch.float64)
            truth_grad = task_truth_grad(task, batch, grad_out)
            tres: dict[str, Any] = {"name": task.name, "title": task.title, "rows": [],
                                    "skipped": [{"name": a, "reason": b} for a, b in task.skipped]}
            for name, reason in task.skipped:
                if (name, reason) not in told:
                    told.add((name, reason))
                    print(f"    {task.name}: skipped {name}: {reason}", flush=True)
            for row in task.rows:
                r = run_row(row, batch, task, truth_grad, grad_out, None if args.check_only else timing,
                            not args.no_memory, floors)
                tres["rows"].append(r)
                print("    " + progress_line(r, floor, batch), flush=True)
            add_ratios(tres, floor)
            cres["tasks"].append(tres)
        results["configs"].append(cres)
        del batch
        gc.collect()
        if on_config is not None and ci < len(cfgs):
            env["load_average_at_end"] = os.getloadavg()[0]  # so far
            on_config(dict(results, elapsed_s=time.perf_counter() - started, targets=[],
                           partial=f"stopped or still running after {ci} of {len(cfgs)} configurations"))
    results["elapsed_s"] = time.perf_counter() - started
    env["load_average_at_end"] = os.getloadavg()[0]
    # the targets are stated for the full sizes: a quick run's tiny sets measure overheads, not the kernels
    results["targets"] = [] if args.quick else targets(results)
    return results


def label(r: dict[str, Any]) -> str:
    k = r.get("kernel")
    if k == "auto":
        k = f"auto→{r.get('kernel_resolved')}"
    return r["name"] + (f" [{k}]" if k else "")


def progress_line(r: dict[str, Any], floor: dict[str, Any], batch: Batch) -> str:
    head = f"{r['task']:<14} {r['library']:<8} {label(r)} ({r['input']})"
    if r["status"] not in ("ok", "grad mismatch", "backward error"):
        return f"{head}: {r['status'].upper()}: {r.get('message', '')}"
    if not r.get("fwd"):
        return f"{head}: matches (err {r['err']:.1e}, input gradient {r.get('grad_err', math.nan):.1e})" + (
            f", path {r['path']}" if r.get("path") else "") + (
            f"; {r['status'].upper()}: {r.get('message', '')}" if r["status"] != "ok" else "")
    def paired(key: str) -> str:
        p = r.get(f"{key}_paired")
        return f"; {p['ratio']:.2f}x paired" if p else ""

    parts = [f"fwd {fmt_ms(r.get('fwd'))} ms ({r['fwd']['median'] / floor['fwd']['median']:.1f}x floor{paired('fwd')})"]
    if r.get("fwd_bwd"):
        parts.append(f"fwd+bwd {fmt_ms(r['fwd_bwd'])} ms "
                     f"({r['fwd_bwd']['median'] / floor['fwd_bwd']['median']:.1f}x floor{paired('fwd_bwd')})")
    if r.get("peak_bytes") is not None:
        parts.append(f"mem {mem_ratio(r, batch.x.nbytes):.2f}x x")
    parts.append(f"err {r['err']:.1e}")
    if r.get("path"):
        parts.append(f"path {r['path']}")
    if r["status"] != "ok":
        parts.append(f"{r['status'].upper()}: {r.get('message', '')}")
    return f"{head}: " + ", ".join(parts)


def mem_ratio(r: dict[str, Any], x_bytes: int) -> float:
    """(the input the row reads + the peak it allocates during a forward) / the packed input."""
    return (r["input_bytes"] + r["peak_bytes"]) / x_bytes


def add_ratios(tres: dict[str, Any], floor: dict[str, Any]) -> None:
    rows = tres["rows"]
    for key in ("fwd", "fwd_bwd"):
        peer_rows = [r for r in rows if r["library"] != ATTNPOOL and r.get(key)]
        ragged = [r for r in peer_rows if r["input"] != PREBUILT]
        best = min(peer_rows, key=lambda r: r[key]["median"], default=None)
        best_ragged = min(ragged, key=lambda r: r[key]["median"], default=None)
        tres[f"best_peer_{key}"] = None if best is None else {"label": label(best), "input": best["input"],
                                                               "median": best[key]["median"]}
        tres[f"best_ragged_peer_{key}"] = None if best_ragged is None else {
            "label": label(best_ragged), "input": best_ragged["input"], "median": best_ragged[key]["median"]}
        for r in rows:
            if r.get(key):
                r[f"{key}_x_floor"] = r[key]["median"] / floor[key]["median"]
                r[f"{key}_x_best_peer"] = None if best is None else r[key]["median"] / best[key]["median"]
        ours = [r for r in rows if r["library"] == ATTNPOOL and r.get("kernel") and r.get(key)]
        fastest = min(ours, key=lambda r: r[key]["median"], default=None)
        tres[f"attnpool_{key}"] = None if fastest is None else {
            "label": label(fastest), "median": fastest[key]["median"],
            "x_floor": fastest[f"{key}_x_floor"],
            "x_floor_paired": (fastest.get(f"{key}_paired") or {}).get("ratio"),
            "speedup_vs_best_peer": None if best is None else best[key]["median"] / fastest[key]["median"],
            "speedup_vs_best_ragged_peer": None if best_ragged is None
            else best_ragged[key]["median"] / fastest[key]["median"],
            "peak_x_input": None if fastest.get("peak_bytes") is None
            else fastest["peak_bytes"] / fastest["input_bytes"],
        }


# ---------------------------------------------------------------------------------------------------------------
# Targets of issue 4, read off this run
# ---------------------------------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: str, ok: bool | None, where: str) -> None:
        out.append({"target": what, "where": where, "measured": value, "goal": goal,
                    "met": None if value is None else ok})

    by_name = {c["name"]: c for c in results["configs"]}
    for cname in ("single-query", "pma-map"):
        c = by_name.get(cname)
        if not c:
            continue
        # the attention pools; softmax_agg (PyG's per-channel function, attnpool's ChannelSoftmaxPool) has no target
        for t in (t for t in c["tasks"] if t["name"].startswith(("gate", "mha", "pma", "map"))):
            where = f"{cname} / {t['name']}"
            f, fb = t.get("attnpool_fwd"), t.get("attnpool_fwd_bwd")
            # the floor timed alternately with the row where it was (paired_floor_ratio), else the two medians
            if f:
                v = f.get("x_floor_paired") or f["x_floor"]
                add("forward / floor", v, "≤ 1.5", v <= 1.5, where)
            if fb:
                v = fb.get("x_floor_paired") or fb["x_floor"]
                add("forward+backward / floor", v, "≤ 2", v <= 2, where)
            if f and f["peak_x_input"] is not None:
                total = 1 + f["peak_x_input"]
                add("forward peak memory / packed input (input included)", total, "≤ 1.2", total <= 1.2, where)
            goal = 5.0 if t["name"].startswith(("pma", "map")) else 3.0 if t["name"] == "gate" else None
            if f and goal and f["speedup_vs_best_peer"] is not None:
                add("forward speedup vs the fastest peer (any input)", f["speedup_vs_best_peer"], f"≥ {goal:g}",
                    f["speedup_vs_best_peer"] >= goal, where)
            if f and goal and f["speedup_vs_best_ragged_peer"] is not None:
                add("forward speedup vs the fastest peer on ragged input", f["speedup_vs_best_ragged_peer"],
                    f"≥ {goal:g}", f["speedup_vs_best_ragged_peer"] >= goal, where)
    scaling = [c for c in results["configs"] if c["group"] == "scaling-N"]
    if len(scaling) >= 2:
        pts = [(c["N"], c["tasks"][0]["attnpool_fwd"]["median"]) for c in scaling
               if c["tasks"] and c["tasks"][0].get("attnpool_fwd")]
        if len(pts) >= 2:
            xs, ys = [math.log(p[0]) for p in pts], [math.log(p[1]) for p in pts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
            add("time ∝ N^slope (forward, log-log fit)", slope, "≤ 1.1 (linear)", slope <= 1.1, "scaling-N / gate")
    sk, tiny = by_name.get("skewed"), by_name.get("tiny-sets")
    if sk and tiny and sk["tasks"] and tiny["tasks"]:
        a, b = sk["tasks"][0].get("attnpool_fwd"), tiny["tasks"][0].get("attnpool_fwd")
        if a and b:
            ratio = (a["median"] / sk["N"]) / (b["median"] / tiny["N"])
            add("no cliff: time per element, skewed / tiny-sets", ratio, "≤ 1.5", ratio <= 1.5, "gate, D=64")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def faster(speedup: float) -> str:
    return f"{fmt_ratio(speedup)}{X} faster than" if speedup >= 1 else f"{fmt_ratio(1 / speedup)}{X} slower than"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# attnpool benchmark, {env['date'][:10]}",
        "",
        f"- command: `{env['command']}` ({results['elapsed_s']:.0f} s)",
        f"- machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']} ({env['host']})",
        f"- python {env['python']}, torch {env['torch']}, attnpool {env['attnpool']}, "
        f"torch_geometric {env['torch_geometric']}, timm {env['timm']}",
        f"- attnpool kernels run: {', '.join(env['kernels_run'])} (available: {', '.join(env['kernels_available'])};"
        f" automatic choice on CPU: {env['auto_kernel_on_cpu']})"
        + (f"; cpu kernel unavailable: {env['cpu_kernel_unavailable']}" if env["cpu_kernel_unavailable"] else ""),
        "- float32 unless the configuration says otherwise; times are medians in ms; correctness is checked before "
        "timing against attnpool's module in float64 on its reference kernel (max |y - truth| / max |truth|, "
        "tolerance " + ", ".join(f"{k.replace('torch.', '')} {v:.0e}" for k, v in results["tolerance"].items())
        + ", times sqrt(L_max / 1024) where L_max > 1024); the input gradient is checked the same way before "
        "forward+backward is timed (PMA: leaving out the elements where its ReLU's input is within 1e-5 of 0)",
    ]
    lines.append(f"- 1-minute load average {env['load_average_at_start']:.1f} at the start, "
                 f"{env['load_average_at_end']:.1f} at the end"
                 + (" — **other work shared the cores: these timings are noisy**"
                    if max(env["load_average_at_start"], env["load_average_at_end"]) > 0.5 * (env["cores"] or 1)
                    else ""))
    lines.append(f"- allocator: {env.get('malloc', 'glibc default')}")
    if env.get("note"):
        lines.append(f"- note: {env['note']}")
    if results.get("partial"):
        lines.append(f"- **partial report**: {results['partial']}")
    lines.append("")
    if results["targets"]:
        lines += ["## Targets (issue 4)", "",
                  "The ratios to the floor are those of the row timed alternately with the floor (median of the "
                  "per-round ratios; below each task), where it was.", "",
                  "| target | where | measured | goal | met |", "|---|---|---|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
            lines.append(f"| {t['target']} | {t['where']} | {fmt_ratio(t['measured'])} | {t['goal']} | {met} |")
        lines.append("")
    for c in results["configs"]:
        fl = c["floor"]
        lines += [
            f"## {c['name']}: {c['title']}",
            "",
            f"B={c['B']:,}, N={c['N']:,}, D={c['D']}, {c['dtype']}, L_max={c['L_max']:,}; packed input "
            f"{c['x_bytes'] / 2**20:.1f} MiB, padded {c['padded_bytes'] / 2**20:,.1f} MiB. Floor: forward "
            f"{fmt_ms(fl['fwd'])} ms ({c['floor_GBps']:.1f} GB/s), forward+backward {fmt_ms(fl['fwd_bwd'])} ms.",
            "",
        ]
        for t in c["tasks"]:
            lines.append(f"**{t['name']}**: {t['title']}" if t["title"] else f"**{t['name']}**")
            if t.get("error"):
                lines += ["", f"could not be built: {t['error']}", ""]
                continue
            lines += [
                "",
                f"| library | implementation | input | path | fwd ms | {X}floor | {X}best peer | fwd+bwd ms | {X}floor "
                f"| {X}best peer | mem {X}x | err | note |",
                "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
            ]
            for r in t["rows"]:
                note = r["note"]
                if r["status"] != "ok":
                    note = f"**{r['status']}**: {r.get('message', '')}" + (f"; {note}" if note else "")
                mem = "—" if r.get("peak_bytes") is None else fmt_ratio(mem_ratio(r, c["x_bytes"]))
                err = f"{r['err']:.0e}" if "err" in r else "—"
                lines.append(
                    f"| {r['library']} | {label(r)} | {r['input']} | {r.get('path', '')} | {fmt_ms(r.get('fwd'))} "
                    f"| {fmt_ratio(r.get('fwd_x_floor'))} | {fmt_ratio(r.get('fwd_x_best_peer'))} "
                    f"| {fmt_ms(r.get('fwd_bwd'))} | {fmt_ratio(r.get('fwd_bwd_x_floor'))} "
                    f"| {fmt_ratio(r.get('fwd_bwd_x_best_peer'))} | {mem} | {err} | {note} |")
            lines.append("")
            for key, what in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
                ours, best, ragged = t.get(f"attnpool_{key}"), t.get(f"best_peer_{key}"), t.get(
                    f"best_ragged_peer_{key}")
                if ours and best:
                    s = (f"- {what}: attnpool {ours['label']} is {faster(ours['speedup_vs_best_peer'])} the fastest "
                         f"peer, {best['label']} ({best['input']})")
                    if ragged and ragged["label"] + ragged["input"] != best["label"] + best["input"]:
                        s += (f", and {faster(ours['speedup_vs_best_ragged_peer'])} the fastest on ragged input, "
                              f"{ragged['label']} ({ragged['input']})")
                    lines.append(s)
            for r in t["rows"]:
                pairs = [(what, r.get(f"{key}_paired")) for key, what in (("fwd", "forward"),
                                                                           ("fwd_bwd", "forward+backward"))]
                said = [f"{what} {fmt_ratio(p['ratio'])}{X} ({fmt_ms({'median': p['median']})} against "
                        f"{fmt_ms({'median': p['floor_median']})} ms, {p['rounds']} rounds)" for what, p in pairs if p]
                if said:
                    lines.append(f"- {label(r)}, timed alternately with the floor: " + ", ".join(said))
            for s in t["skipped"]:
                lines.append(f"- skipped {s['name']}: {s['reason']}")
            lines.append("")
    lines += [
        "Columns: *input* — packed (attnpool, PyG), pads itself (a padded peer given the packed input: the padding "
        "is timed), prebuilt padded (the same peer on a padded copy made outside the timing); *path* — the "
        f"attnpool kernel the dispatcher handed out (eager: no kernel); {X}floor — the median over the floor's median "
        f"measured in this run; {X}best peer — over the fastest peer's (below 1 is faster); *mem {X}x* — (bytes of "
        "the input the row reads + peak bytes allocated during one forward, from torch.profiler's memory events) / "
        "bytes of the packed input; *err* — max |y - truth| / max |truth| against float64.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [c for c in results["configs"] if not c["group"]]
    groups = [g for g in ("scaling-N", "scaling-D") if any(c["group"] == g for c in results["configs"])]
    heights = [max(2.0, 0.22 * sum(len(t["rows"]) for t in c["tasks"]) + 0.8) for c in bars]
    heights += [4.5] * len(groups)
    fig, axes = plt.subplots(len(heights), 1, figsize=(12, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, c in zip(axes[:, 0], bars):
        rows = [(t["name"], r) for t in c["tasks"] for r in t["rows"]]
        names = [f"{tn} · {label(r)} ({r['input']})" for tn, r in rows]
        ys = range(len(rows))
        fwd = [r.get("fwd_x_floor") or 0 for _, r in rows]
        fb = [r.get("fwd_bwd_x_floor") or 0 for _, r in rows]
        colors = ["tab:blue" if r["library"] == ATTNPOOL else "tab:gray" for _, r in rows]
        ax.barh([y - 0.2 for y in ys], fwd, height=0.4, color=colors, label="forward / floor")
        ax.barh([y + 0.2 for y in ys], fb, height=0.4, color=colors, alpha=0.5, hatch="//",
                label="forward+backward / floor")
        ax.set_yticks(list(ys), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1, color="k", lw=0.8)
        ax.set_title(f"{c['name']}: {c['title']} (N={c['N']:,}; floor fwd {fmt_ms(c['floor']['fwd'])} ms)",
                     fontsize=9)
        ax.set_xlabel("time / floor (log; 1 = x.sum())", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
    for ax, g in zip(axes[len(bars):, 0], groups):
        pts = [c for c in results["configs"] if c["group"] == g]
        xkey = "N" if g == "scaling-N" else "D"
        series: dict[str, list[tuple[float, float]]] = {}
        ours: set[str] = set()
        for c in pts:
            series.setdefault("floor x.sum()", []).append((c[xkey], c["floor"]["fwd"]["median"] * 1e3))
            for t in c["tasks"]:
                for r in t["rows"]:
                    if r.get("fwd"):
                        name = f"{label(r)} ({r['input']})"
                        if r["library"] == ATTNPOOL:
                            ours.add(name)
                        series.setdefault(name, []).append((c[xkey], r["fwd"]["median"] * 1e3))
        for name, p in series.items():
            p.sort()
            style = {"color": "k", "ls": "--"} if name.startswith("floor") else {}
            lw = 2.2 if name in ours else 1.0
            ax.plot([a for a, _ in p], [b for _, b in p], marker="o", ms=3, lw=lw, label=name, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_ylabel("forward median, ms")
        ax.set_title(f"{g}: gate score, forward (thick: attnpool)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(which="both", alpha=0.3)
    env = results["environment"]
    fig.suptitle(f"attnpool vs peers, {env['date'][:10]}, {env['cpu']} ({env['torch_threads']} threads), "
                 f"torch {env['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / sum(heights)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 5 runs per row: a smoke test in seconds")
    p.add_argument("--kernels", help="comma-separated attnpool backends to run: auto, reference, cpu, triton "
                                     "(default: every backend available for the CPU here)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="directory for <date>-<machine>.{md,json,png} (default: benchmarks/results)")
    p.add_argument("--only", nargs="*", help="regular expressions: run only the configurations they match")
    p.add_argument("--tasks", nargs="*", choices=sorted(peers.BUILDERS), help="run only these functions")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="seconds of timed runs per row and mode after the first 5 (full mode; default 0.5)")
    p.add_argument("--pad-limit-gib", type=float, default=4.0,
                   help="skip padded peers whose padded input would exceed this (default 4 GiB)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--check-only", action="store_true",
                   help="check every row's output and input gradient against the truth, time nothing")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--note", default="", help="a line for the report, e.g. 'machine shared: noisy'")
    p.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                   help="reuse (default): glibc's malloc keeps freed blocks (mallopt), for every row and floor alike, "
                        "so that no call pays for fresh zeroed pages, which are not memory bandwidth (on the Zen 3 "
                        "VM they made the forward+backward floor 36-101 ms instead of 8.5; benchmarks/"
                        "cpu_allocator.py). default: glibc's own settings; the report's name ends in -malloc-default")
    args = p.parse_args(argv)
    args.malloc_note = "glibc default"
    if args.malloc == "reuse":
        from attnpool._allocator import malloc_reuse

        try:
            args.malloc_note = malloc_reuse()
        except OSError as e:
            args.malloc_note = f"the C library's default ({e})"

    args.out.mkdir(parents=True, exist_ok=True)

    def write(results: dict[str, Any]) -> Path:
        stem = f"{results['environment']['date'][:10]}-{machine_slug(results['environment'])}" + (
            "-quick" if args.quick else "") + ("-malloc-default" if args.malloc == "default" else "")
        base = args.out / stem
        # each file replaced whole (a killed run leaves the last complete report, never half a file)
        for suffix, text in ((".json", json.dumps(results, indent=1, default=str) + "\n"), (".md", markdown(results))):
            tmp = base.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, base.with_suffix(suffix))
        return base

    # the report so far after every configuration: a run stopped part-way keeps what it measured
    results = run(args, on_config=write)
    base = write(results)
    written = [base.with_suffix(".md"), base.with_suffix(".json")]
    if not args.no_plot:
        try:
            plot(results, base.with_suffix(".png"))
            written.append(base.with_suffix(".png"))
        except ImportError as e:
            print(f"no plot: matplotlib is not importable here ({e})")
    print(f"done in {results['elapsed_s']:.0f} s; wrote " + ", ".join(str(w) for w in written))
    bad = [(c["name"], r["task"], label(r), r["status"]) for c in results["configs"] for t in c["tasks"]
           for r in t["rows"] if r["status"] != "ok"]
    for b in bad:
        print(f"  not ok: {' / '.join(b)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
