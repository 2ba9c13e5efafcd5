"""Compare pooling choices on one pipeline, with bootstrap confidence intervals and paired differences.

    from attnpool.compare import compare

    def pipeline(pool: nn.Module, seed: int) -> list[float]:
        model = MyModel(pool)                      # the same model with another pooling
        train(model, train_set, seed=seed)
        return per_example_accuracy(model, test_set)   # one value per test example, the same examples every run

    result = compare(pipeline, ["mean", "max", "cls", "attention", "gated"], dim=128, seeds=[0, 1, 2],
                     baseline="mean", state="runs/compare.json")
    print(result.to_markdown())

Every (pooling, seed) run is one call of ``pipeline``; its per-example values are written to ``state`` as soon as it
finishes (to a temporary file, then :func:`os.replace`, so that a killed run never corrupts the file). Calling
``compare`` again with the same ``state`` skips the finished runs: Ctrl-C and resume.

The metric of a pooling is the mean over seeds of the mean over examples (or of ``metric(targets, predictions)``
for a metric that does not decompose, such as AUC). Its confidence interval is a percentile bootstrap that resamples
the examples and, with several seeds, the seeds; the difference to the baseline resamples both poolings with the
*same* draws (paired), so the shared difficulty of the examples cancels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["POOLINGS", "Comparison", "Difference", "PoolingResult", "compare", "load_runs", "make_pooling",
           "summarize_runs"]

FORMAT = "attnpool.compare/1"

Factory = Callable[[], nn.Module]
Pipeline = Callable[[nn.Module, int], Any]
Metric = Callable[[np.ndarray, np.ndarray], float]


def _attention(dim: int, **kw: Any) -> nn.Module:
    from attnpool.nn import AttentionPool

    return AttentionPool(dim, **kw)


def _heads(dim: int) -> int:
    return next(h for h in (4, 2, 1) if dim % h == 0)


def _registry() -> dict[str, Callable[[int], nn.Module]]:
    from attnpool import nn as ap

    return {
        "mean": lambda d: ap.MeanPool(),
        "max": lambda d: ap.MaxPool(),
        "sum": lambda d: ap.SumPool(),
        "cls": lambda d: ap.ClsPool(),
        "last": lambda d: ap.LastTokenPool(),
        "attention": lambda d: _attention(d),
        "attention-multihead": lambda d: _attention(d, num_heads=_heads(d), key_proj=True, value_proj=True),
        "attention-additive": lambda d: _attention(d, score="additive"),
        "gated": lambda d: ap.GatedAttentionPool(d),
        "pma": lambda d: ap.PMA(d, 1, _heads(d)),
        "map": lambda d: ap.MAPHead(d, _heads(d)),
        "latent": lambda d: ap.LatentCrossAttention(d, 1, _heads(d)),
    }


#: the pooling choices known by name; every one maps ``[sets of D-vectors]`` to ``[B, D]``
POOLINGS: tuple[str, ...] = ("mean", "max", "sum", "cls", "last", "attention", "attention-multihead",
                             "attention-additive", "gated", "pma", "map", "latent")


def make_pooling(name: str, dim: int) -> nn.Module:
    """A pooling module by name (one of :data:`POOLINGS`) for elements of size ``dim``, with default settings."""
    reg = _registry()
    if name not in reg:
        raise ValueError(f"name: expected one of {list(reg)}, got {name!r}")
    return reg[name](dim)


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PoolingResult:
    name: str
    value: float
    ci: tuple[float, float]
    seeds: list[int]
    per_seed: list[float]
    seconds: float


@dataclass
class Difference:
    """``name - baseline`` of the metric, paired: ``prob_better`` is the share of bootstrap draws in which
    ``name`` beats the baseline (in the metric's direction)."""

    name: str
    baseline: str
    value: float
    ci: tuple[float, float]
    prob_better: float

    @property
    def significant(self) -> bool:
        """Whether the confidence interval excludes 0."""
        return self.ci[0] > 0 or self.ci[1] < 0


@dataclass
class Comparison:
    metric_name: str
    higher_is_better: bool
    baseline: str | None
    confidence: float
    n_boot: int
    num_examples: int
    results: dict[str, PoolingResult]
    differences: dict[str, Difference]
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "format": "attnpool.comparison/1", "metric": self.metric_name, "higher_is_better": self.higher_is_better,
            "baseline": self.baseline, "confidence": self.confidence, "n_boot": self.n_boot,
            "examples": self.num_examples, "missing_runs": self.missing,
            "results": {n: {"value": f(r.value), "ci": [f(r.ci[0]), f(r.ci[1])], "seeds": r.seeds,
                            "per_seed": [f(v) for v in r.per_seed], "seconds": r.seconds}
                        for n, r in self.results.items()},
            "differences": {n: {"baseline": d.baseline, "value": f(d.value), "ci": [f(d.ci[0]), f(d.ci[1])],
                                "prob_better": d.prob_better, "significant": d.significant}
                            for n, d in self.differences.items()},
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        pct = round(self.confidence * 100)
        better = "higher" if self.higher_is_better else "lower"
        lines = [f"{self.metric_name} ({better} is better) on {self.num_examples} examples; {pct}% percentile "
                 f"bootstrap intervals ({self.n_boot} draws), differences paired against `{self.baseline}`.", "",
                 f"| pooling | {self.metric_name} [{pct}% CI] | Δ vs {self.baseline} [{pct}% CI] | P(better) | "
                 "seeds |", "|---|---|---|---|---|"]
        for n, r in self.results.items():
            d = self.differences.get(n)
            diff = "baseline" if n == self.baseline else (
                f"{d.value:+.4g} [{d.ci[0]:+.4g}, {d.ci[1]:+.4g}]{' *' if d.significant else ''}" if d else "n/a")
            prob = f"{d.prob_better:.2f}" if d else "n/a"
            lines.append(f"| {n} | {r.value:.4g} [{r.ci[0]:.4g}, {r.ci[1]:.4g}] | {diff} | {prob} | "
                         f"{len(r.seeds)} |")
        if any(d.significant for d in self.differences.values()):
            lines += ["", "\\* the interval excludes 0."]
        if self.missing:
            lines.append(f"\nNot finished: {', '.join(self.missing)}.")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """The comparison chart (matplotlib); written to ``path`` as PNG when given, else the figure."""
        from attnpool.diagnostics.plots import comparison_chart, figure_png

        fig = comparison_chart(self)
        if path is None:
            return fig
        Path(path).write_bytes(figure_png(fig))
        return None


# ---------------------------------------------------------------------------------------------------------------
# The state file
# ---------------------------------------------------------------------------------------------------------------


def _key(name: str, seed: int) -> str:
    return f"{name}@{seed}"


def load_runs(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The finished runs in a state file, by ``"pooling@seed"``; empty when the file does not exist.

    A leftover temporary file of an interrupted write is ignored (and removed). A state file that is not valid JSON
    raises ValueError: it is left as it is, for you to inspect.
    """
    p = Path(path)
    for stale in p.parent.glob(f".{p.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    if not p.exists():
        return {}
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"state: {p} is not valid JSON ({e}); move it away to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("runs"), dict):
        raise ValueError(f"state: {p} is not an attnpool.compare state file (expected format {FORMAT!r})")
    return state["runs"]


def _save_runs(path: Path, runs: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Atomically: a complete temporary file beside ``path``, flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"format": FORMAT, **meta, "runs": runs}, fh, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def _outcome(result: Any, metric: Metric | None, name: str) -> dict[str, list[float]]:
    """A pipeline's return value as JSON-ready lists, checked."""
    if metric is None:
        values = np.asarray(result, dtype=float).reshape(-1) if not isinstance(result, dict) else None
        if values is None:
            raise TypeError(f"pipeline: without a metric, expected per-example values (a 1-D array or list) for "
                            f"{name!r}, got a dict")
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"pipeline: expected finite per-example values for {name!r}, got "
                             f"{values.size} values, {int((~np.isfinite(values)).sum())} not finite")
        return {"values": values.tolist()}
    if isinstance(result, dict):
        targets, predictions = result.get("targets"), result.get("predictions")
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        targets, predictions = result
    else:
        raise TypeError(f"pipeline: with a metric, expected (targets, predictions) or a dict with those keys for "
                        f"{name!r}, got {type(result).__name__}")
    t, p = np.asarray(targets, dtype=float), np.asarray(predictions, dtype=float)
    if t.shape[0] != p.shape[0] or t.shape[0] == 0:
        raise ValueError(f"pipeline: targets and predictions for {name!r} must have the same, non-zero number of "
                         f"examples; got {t.shape} and {p.shape}")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError(f"pipeline: non-finite targets or predictions for {name!r}")
    return {"targets": t.tolist(), "predictions": p.tolist()}


class _Progress:
    """tqdm when it is installed, else one line per run on stderr."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar: Any = None
        self.enabled, self.total, self.count = enabled, total, done
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, desc="compare", unit="run")
            except ImportError:
                self.bar = None

    def start(self, key: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(key)
        elif self.enabled:
            print(f"[{self.count + 1}/{self.total}] {key} ...", file=sys.stderr, flush=True)

    def finish(self, key: str, value: float, seconds: float) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{key}: {value:.4g}")
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.count}/{self.total}] {key}: {value:.4g} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _factories(poolings: Sequence[str] | Mapping[str, Factory], dim: int | None) -> dict[str, Factory]:
    if isinstance(poolings, Mapping):
        out = dict(poolings)
        for n, f in out.items():
            if not callable(f):
                raise TypeError(f"poolings: the factory of {n!r} must be callable () -> nn.Module, "
                                f"got {type(f).__name__}")
        return out
    if isinstance(poolings, str) or not isinstance(poolings, Iterable):
        raise TypeError(f"poolings: expected a list of names or a dict name -> factory, got {type(poolings).__name__}")
    names = list(poolings)
    if dim is None:
        raise ValueError("dim: naming poolings needs the element size dim")
    for n in names:
        if n not in POOLINGS:
            raise ValueError(f"poolings: unknown pooling {n!r}; expected one of {list(POOLINGS)} or a dict of "
                             "factories")
    return {n: functools.partial(make_pooling, n, dim) for n in names}


def compare(
    pipeline: Pipeline,
    poolings: Sequence[str] | Mapping[str, Factory],
    *,
    dim: int | None = None,
    seeds: Sequence[int] = (0,),
    baseline: str | None = None,
    metric: Metric | None = None,
    metric_name: str = "metric",
    higher_is_better: bool = True,
    state: str | os.PathLike[str] | None = None,
    confidence: float = 0.95,
    n_boot: int = 2000,
    bootstrap_seed: int = 0,
    progress: bool = True,
) -> Comparison:
    """Run ``pipeline`` once per pooling and seed, and compare the poolings' metric.

    Args:
        pipeline: ``pipeline(pool, seed)``: build the model around ``pool`` (constructed right after seeding torch,
            numpy and ``random`` with ``seed``), train it and evaluate it on a fixed set of examples. Returns one
            value per example (e.g. 1/0 correct, a loss), the same examples in the same order in every run; or,
            with ``metric``, ``(targets, predictions)`` per example.
        poolings: names from :data:`POOLINGS` (with ``dim``), or a dict ``name -> factory()`` returning a fresh
            module.
        dim: the element size, for named poolings.
        seeds: one run per seed and pooling.
        baseline: the pooling the others are compared with (paired); default the first.
        metric: ``metric(targets, predictions) -> float`` for metrics that are not a mean over examples.
        metric_name, higher_is_better: how to name and read the metric.
        state: a JSON file that keeps the finished runs; an existing one is resumed.
        confidence, n_boot, bootstrap_seed: the bootstrap.
        progress: show a progress bar (tqdm if installed).

    Raises:
        KeyboardInterrupt: re-raised after an interruption; every run finished before it is in ``state``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    if n_boot < 100:
        raise ValueError(f"n_boot: expected at least 100 bootstrap draws, got {n_boot}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, at least one, got {seeds}")
    factories = _factories(poolings, dim)
    if not factories:
        raise ValueError("poolings: expected at least one pooling")
    baseline = next(iter(factories)) if baseline is None else baseline
    if baseline not in factories:
        raise ValueError(f"baseline: expected one of {list(factories)}, got {baseline!r}")

    path = Path(state) if state is not None else None
    runs: dict[str, Any] = load_runs(path) if path is not None else {}
    meta = {"metric": metric_name, "higher_is_better": higher_is_better}
    todo = [(n, s) for n in factories for s in seeds if _key(n, s) not in runs]
    bar = _Progress(len(factories) * len(seeds), len(factories) * len(seeds) - len(todo), progress)
    try:
        for name, seed in todo:
            key = _key(name, seed)
            bar.start(key)
            _seed_everything(seed)
            pool = factories[name]()
            t0 = time.perf_counter()
            outcome = _outcome(pipeline(pool, seed), metric, key)
            seconds = time.perf_counter() - t0
            runs[key] = {"pooling": name, "seed": seed, "seconds": seconds, **outcome}
            if path is not None:
                _save_runs(path, runs, meta)
            bar.finish(key, _point(runs[key], metric), seconds)
    finally:
        bar.close()
    return summarize_runs(runs, list(factories), seeds=seeds, baseline=baseline, metric=metric,
                          metric_name=metric_name, higher_is_better=higher_is_better, confidence=confidence,
                          n_boot=n_boot, bootstrap_seed=bootstrap_seed)


def _point(run: Mapping[str, Any], metric: Metric | None) -> float:
    if metric is None:
        return float(np.mean(run["values"]))
    return float(metric(np.asarray(run["targets"]), np.asarray(run["predictions"])))


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------------


def _draws(n_boot: int, n: int, s: int, rng: np.random.Generator, chunk: int) -> Iterator[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """Bootstrap draws in chunks: example indices ``[b, n]`` and seed indices ``[b, s]``."""
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        ex = rng.integers(0, n, (b, n))
        sd = rng.integers(0, s, (b, s)) if s > 1 else np.zeros((b, 1), dtype=np.int64)
        yield ex, sd


def summarize_runs(
    runs: Mapping[str, Mapping[str, Any]],
    poolings: Sequence[str],
    *,
    seeds: Sequence[int],
    baseline: str,
    metric: Metric | None = None,
    metric_name: str = "metric",
    higher_is_better: bool = True,
    confidence: float = 0.95,
    n_boot: int = 2000,
    bootstrap_seed: int = 0,
) -> Comparison:
    """The :class:`Comparison` of finished runs (from :func:`load_runs`, say). A pooling missing some seeds is
    summarized on the seeds it has; the paired differences use the seeds both poolings have."""
    have = {n: [s for s in seeds if _key(n, s) in runs] for n in poolings}
    missing = [_key(n, s) for n in poolings for s in seeds if _key(n, s) not in runs]
    sizes = {len(runs[_key(n, s)]["values" if metric is None else "targets"]) for n in poolings for s in have[n]}
    if len(sizes) > 1:
        raise ValueError(f"runs: every run must evaluate the same examples; got runs with {sorted(sizes)} examples")
    n_ex = sizes.pop() if sizes else 0

    def matrix(name: str, use: list[int]) -> Any:
        if metric is None:
            return np.array([runs[_key(name, s)]["values"] for s in use], dtype=float)  # [S, N]
        return [(np.asarray(runs[_key(name, s)]["targets"]), np.asarray(runs[_key(name, s)]["predictions"]))
                for s in use]

    def stat(m: Any, ex: np.ndarray, sd: np.ndarray) -> np.ndarray:
        """The metric under each draw: ``[b]``."""
        if metric is None:
            # mean over the drawn seeds of the mean over the drawn examples
            per_seed = m[:, ex].mean(-1)  # [S, b]
            return np.take_along_axis(per_seed.T, sd, axis=1).mean(1)
        out = np.empty(ex.shape[0])
        for i in range(ex.shape[0]):
            out[i] = np.mean([metric(m[j][0][ex[i]], m[j][1][ex[i]]) for j in sd[i]])
        return out

    def point(m: Any) -> tuple[float, list[float]]:
        if metric is None:
            per = m.mean(1)
        else:
            per = np.array([metric(t, p) for t, p in m])
        return float(per.mean()), per.tolist()

    alpha = (1 - confidence) / 2
    chunk = max(1, min(n_boot, 2_000_000 // max(n_ex, 1)))
    results: dict[str, PoolingResult] = {}
    for k, name in enumerate(poolings):
        use = have[name]
        if not use:
            continue
        m = matrix(name, use)
        rng = np.random.default_rng([bootstrap_seed, k])
        boots = np.concatenate([stat(m, ex, sd) for ex, sd in _draws(n_boot, n_ex, len(use), rng, chunk)])
        value, per = point(m)
        lo, hi = np.quantile(boots, [alpha, 1 - alpha])
        results[name] = PoolingResult(name, value, (float(lo), float(hi)), use, per,
                                      float(sum(runs[_key(name, s)].get("seconds", 0.0) for s in use)))

    differences: dict[str, Difference] = {}
    if baseline in results:
        for k, name in enumerate(poolings):
            if name == baseline or name not in results:
                continue
            use = [s for s in have[name] if s in have[baseline]]
            if not use:
                continue
            a, b = matrix(name, use), matrix(baseline, use)
            rng = np.random.default_rng([bootstrap_seed, 10_000 + k])
            diffs = np.concatenate([stat(a, ex, sd) - stat(b, ex, sd)
                                    for ex, sd in _draws(n_boot, n_ex, len(use), rng, chunk)])
            value = point(a)[0] - point(b)[0]
            lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
            wins = diffs > 0 if higher_is_better else diffs < 0
            differences[name] = Difference(name, baseline, value, (float(lo), float(hi)), float(wins.mean()))
    return Comparison(metric_name, higher_is_better, baseline, confidence, n_boot, n_ex, results, differences,
                      missing)
