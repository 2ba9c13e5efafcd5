"""Mean, max, attention and self-attention pooling on four synthetic set tasks, each built so that one of them fits.

    .venv/bin/python experiments/pooling_concepts.py            # the docs' table: 4 tasks x 4 pools x 3 seeds
    .venv/bin/python experiments/pooling_concepts.py --quick    # a smoke test (tests/test_examples.py runs it)

Every model is ``rho(pool(phi(x_i)))`` with the same small element MLP ``phi`` and read-out MLP ``rho``; only the
pooling differs:

* ``mean``: :class:`attnpool.nn.MeanPool`;
* ``max``: :class:`attnpool.nn.MaxPool`;
* ``attention``: :class:`attnpool.nn.AttentionPool` with 4 heads and a key projection; its query is learned, except
  on the ``query-average`` task where it is the projected query of the set (given at call time);
* ``self-attention``: one :class:`attnpool.nn.SAB` (every element attends to every other) before the same
  attention pool: a small Set Transformer encoder + pooling.

The tasks (sets of 4 to 16 elements, packed; fresh training sets every step, a fixed test set of 2048 sets):

* ``average`` (built for mean): the mean over the set of ``x_0 * x_1`` (elements ``x ~ N(0, I_4)``);
* ``max`` (built for max): the largest first feature in the set;
* ``query-average`` (built for attention): each element has one of 3 classes (one-hot) and a 2-d value; each set
  comes with a query class present in it; the target is the mean value of the elements of that class. The query
  is given to every model (concatenated to each element for mean, max and self-attention, and as the attention
  query of ``attention``);
* ``outlier`` (built for self-attention): 2-d points around a random centre (spread 0.3) and one outlier at
  distance 2 from it, each with a random scalar label; the target is the outlier's label. Which element matters
  depends on where the others are.

Every task reports the test MSE divided by the target's variance (0 is perfect, 1 is predicting the mean target).
Each cell is mean ± std over seeds. Single-threaded and seeded: the numbers are reproducible on one machine; the
wall time is not a benchmark.

Writes ``results.md``, ``results.json`` and ``plot.png`` to ``experiments/results/pooling_concepts/`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from attnpool.nn import SAB, AttentionPool, MaxPool, MeanPool

POOLS = ("mean", "max", "attention", "self-attention")
HIDDEN = 32
HEADS = 4
MIN_LEN, MAX_LEN = 4, 16


@dataclass
class Batch:
    values: Tensor  # [N, F] packed elements
    offsets: Tensor  # [B + 1]
    query: Tensor | None  # [B, Fq] for tasks with a per-set query
    target: Tensor  # [B, T]


def _lengths(b: int, g: torch.Generator) -> Tensor:
    return torch.randint(MIN_LEN, MAX_LEN + 1, (b,), generator=g)


def _offsets(lengths: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _segments(lengths: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)


def task_average(b: int, g: torch.Generator) -> Batch:
    lengths = _lengths(b, g)
    x = torch.randn(int(lengths.sum()), 4, generator=g)
    total = torch.zeros(b).index_add_(0, _segments(lengths), x[:, 0] * x[:, 1])
    return Batch(x, _offsets(lengths), None, (total / lengths).unsqueeze(1))


def task_max(b: int, g: torch.Generator) -> Batch:
    lengths = _lengths(b, g)
    x = torch.randn(int(lengths.sum()), 4, generator=g)
    top = torch.full((b,), -math.inf).scatter_reduce(0, _segments(lengths), x[:, 0], reduce="amax")
    return Batch(x, _offsets(lengths), None, top.unsqueeze(1))


CLASSES = 3


def task_query_average(b: int, g: torch.Generator) -> Batch:
    lengths = _lengths(b, g)
    n = int(lengths.sum())
    seg, offsets = _segments(lengths), _offsets(lengths)
    cls = torch.randint(0, CLASSES, (n,), generator=g)
    vals = torch.randn(n, 2, generator=g)
    asked = cls[offsets[:-1] + (torch.rand(b, generator=g) * lengths).long()]  # a class present in the set
    match = (cls == asked[seg]).float()
    total = torch.zeros(b, 2).index_add_(0, seg, vals * match[:, None])
    count = torch.zeros(b).index_add_(0, seg, match)
    onehot = nn.functional.one_hot(cls, CLASSES).float()
    query = nn.functional.one_hot(asked, CLASSES).float()
    return Batch(torch.cat([onehot, vals], 1), offsets, query, total / count[:, None])


def task_outlier(b: int, g: torch.Generator) -> Batch:
    lengths = _lengths(b, g)
    n = int(lengths.sum())
    seg, offsets = _segments(lengths), _offsets(lengths)
    center = 2 * torch.randn(b, 2, generator=g)
    pos = center[seg] + 0.3 * torch.randn(n, 2, generator=g)
    odd = offsets[:-1] + (torch.rand(b, generator=g) * lengths).long()
    angle = 2 * math.pi * torch.rand(b, generator=g)
    pos[odd] = center + 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    label = torch.randn(n, 1, generator=g)
    return Batch(torch.cat([pos, label], 1), offsets, None, label[odd])


@dataclass
class Task:
    name: str
    built_for: str
    make: Callable[[int, torch.Generator], Batch]
    in_dim: int
    query_dim: int
    out_dim: int


TASKS = [
    Task("average", "mean", task_average, 4, 0, 1),
    Task("max", "max", task_max, 4, 0, 1),
    Task("query-average", "attention", task_query_average, CLASSES + 2, CLASSES, 2),
    Task("outlier", "self-attention", task_outlier, 3, 0, 1),
]


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class SetModel(nn.Module):
    """``rho(pool(phi(x)))``; the set's query, if any, is concatenated to each element, and is the attention query
    of the ``attention`` pool."""

    def __init__(self, task: Task, pool: str) -> None:
        super().__init__()
        self.pool_name = pool
        self.query_is_attention = pool == "attention" and task.query_dim > 0
        in_dim = task.in_dim + (0 if self.query_is_attention else task.query_dim)
        self.phi = mlp(in_dim, HIDDEN, HIDDEN)
        self.encoder = SAB(HIDDEN, HEADS, layer_norm=True) if pool == "self-attention" else None
        if pool == "mean":
            self.pool: nn.Module = MeanPool()
        elif pool == "max":
            self.pool = MaxPool()
        else:
            queries = 0 if self.query_is_attention else 1
            self.pool = AttentionPool(HIDDEN, queries, HEADS, key_proj=True)
        self.query_proj = nn.Linear(task.query_dim, HIDDEN) if self.query_is_attention else None
        self.rho = mlp(HIDDEN, HIDDEN, task.out_dim)

    def forward(self, batch: Batch) -> Tensor:
        x = batch.values
        if batch.query is not None and not self.query_is_attention:
            lengths = batch.offsets.diff()
            x = torch.cat([x, batch.query.repeat_interleave(lengths, 0)], 1)
        h = self.phi(x)
        if self.encoder is not None:
            h = self.encoder(h, offsets=batch.offsets)
        if self.query_proj is not None:
            assert batch.query is not None
            pooled = self.pool(h, offsets=batch.offsets, query=self.query_proj(batch.query))
        else:
            pooled = self.pool(h, offsets=batch.offsets)
        return self.rho(pooled)


def normalized_mse(pred: Tensor, target: Tensor) -> float:
    """Test MSE over the target's variance: 0 is perfect, 1 is what predicting the mean target gets."""
    return float(((pred - target) ** 2).mean() / target.var(0).mean())


def run_one(task: Task, pool: str, seed: int, steps: int, batch_size: int, test: Batch) -> float:
    torch.manual_seed(seed)
    model = SetModel(task, pool)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        batch = task.make(batch_size, g)
        loss = nn.functional.mse_loss(model(batch), batch.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return normalized_mse(model(test), test.target)


def _fmt(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def write_results(out: Path, results: dict[str, dict[str, list[float]]], meta: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "| task (built for) | " + " | ".join(POOLS) + " |",
        "|---|" + "---|" * len(POOLS),
    ]
    for task in TASKS:
        cells = []
        means = {p: sum(results[task.name][p]) / len(results[task.name][p]) for p in POOLS}
        best = min(means.values())
        for p in POOLS:
            cell = _fmt(results[task.name][p])
            cells.append(f"**{cell}**" if means[p] == best else cell)
        lines.append(f"| `{task.name}` ({task.built_for}) | " + " | ".join(cells) + " |")
    seeds = meta["seeds"]
    lines += [
        "",
        f"Test MSE / variance of the target (0 = perfect, 1 = predicting the mean; lower is better), mean ± std "
        f"over {len(seeds)} seeds ({seeds}); **bold**: the best mean per task. "  # type: ignore[arg-type]
        f"{meta['steps']} Adam steps of {meta['batch_size']} fresh sets; test: {meta['test_sets']} sets.",
        f"Command: `{meta['command']}`; {meta['date']}, {meta['machine']}, {meta['threads']} thread, "
        f"torch {meta['torch']}, wall time {meta['wall_s']:.0f} s (1-minute load average {meta['load_start']} at "
        f"the start, {meta['load_end']} at the end).",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.2 * len(TASKS), 3.0))
    colors = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c"]
    for ax, task in zip(axes, TASKS):
        vals = [results[task.name][p] for p in POOLS]
        means = [sum(v) / len(v) for v in vals]
        stds = [(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5 for v, m in zip(vals, means)]
        ax.bar(range(len(POOLS)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(POOLS)), [p.replace("self-attention", "self-attn") for p in POOLS], rotation=30)
        ax.set_title(f"{task.name}\n(built for {task.built_for})", fontsize=9)
        ax.set_ylabel("test MSE / var (lower is better)", fontsize=8)
    fig.suptitle(f"Pooling on synthetic set tasks: mean ± std over {len(meta['seeds'])} seeds "  # type: ignore[arg-type]
                 f"({meta['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-sets", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 128 test sets: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pooling_concepts")
    parser.add_argument("--machine", default=None, help="machine description for the table (default: the CPU name)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.test_sets = 1, 20, 128
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    start, load_start = time.perf_counter(), _load()
    results: dict[str, dict[str, list[float]]] = {}
    for task in TASKS:
        test = task.make(args.test_sets, torch.Generator().manual_seed(12345))
        results[task.name] = {}
        for pool in POOLS:
            t0 = time.perf_counter()
            results[task.name][pool] = [run_one(task, pool, s, args.steps, args.batch_size, test) for s in seeds]
            print(f"{task.name:15s} {pool:15s} {_fmt(results[task.name][pool])}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    command = "python experiments/pooling_concepts.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.seeds, args.steps, args.batch_size, args.test_sets) != (3, 600, 64, 2048):
        command += f" --seeds {args.seeds} --steps {args.steps} --batch-size {args.batch_size} " \
                   f"--test-sets {args.test_sets}"
    meta = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": args.machine or _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "seeds": seeds, "steps": args.steps, "batch_size": args.batch_size,
        "test_sets": args.test_sets, "wall_s": time.perf_counter() - start, "load_start": load_start,
        "load_end": _load(),
    }
    write_results(args.out, results, meta)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
