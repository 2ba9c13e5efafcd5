"""Figures with matplotlib, imported only when a figure is asked for (``pip install attnpool[diagnostics]``)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from attnpool.compare import Comparison
    from attnpool.diagnostics.analysis import Example, ModuleSummary

__all__ = ["comparison_chart", "figure_png", "heatmap", "histograms", "position_curves"]


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised where matplotlib is absent
        raise ImportError("attnpool's plots need matplotlib: pip install 'attnpool[diagnostics]'") from e
    return plt


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap(example: Example, title: str = "", max_rows: int = 16, max_elements: int = 64) -> Any:
    """The weights of one set: a row per (head, query), a column per element, labelled when labels were given."""
    plt = _plt()
    w = example.weights.double()
    h, q, n = w.shape
    rows = w.reshape(h * q, n)[:max_rows, :max_elements].numpy()
    names = [f"h{i}q{j}" if h > 1 else f"q{j}" for i in range(h) for j in range(q)][:max_rows]
    labels = example.labels[:max_elements] if example.labels is not None else [str(i) for i in range(rows.shape[1])]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * rows.shape[1] + 1.5), max(1.6, 0.35 * rows.shape[0] + 1.2)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(rows.max()), 1e-12))
    ax.set_xticks(range(rows.shape[1]))
    ax.set_xticklabels([lbl[:18] for lbl in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(rows.shape[0]))
    ax.set_yticklabels(names, fontsize=7)
    more = "" if n <= max_elements else f" (first {max_elements} of {n} elements)"
    ax.set_title((title or f"call {example.call}, set {example.index}") + more, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return fig


def histograms(summary: ModuleSummary) -> Any:
    """Per-set normalized entropy and effective fraction, with the uniform and one-hot ends marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 2.8))
    for ax, key, label in ((axes[0], "normalized_entropy", "normalized entropy (1 = uniform)"),
                           (axes[1], "effective_fraction", "effective N / set size (1 = uniform)")):
        v = summary.per_set[key]
        v = v[~np.isnan(v)]
        ax.hist(v, bins=np.linspace(0, 1, 26), color="#3b6ea8")
        ax.axvline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("sets", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{summary.name or '(model)'}: concentration over {summary.num_sets} sets", fontsize=9)
    return fig


def position_curves(summary: ModuleSummary) -> Any:
    """Position bias: mass relative to uniform by position from the start, from the end, and by relative position.
    A flat line at 1 is no bias."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    pos = summary.position
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.8), sharey=True)
    for ax, key, label in ((axes[0], "lift_first", "position from the start"),
                           (axes[1], "lift_last", "position from the end (recency)")):
        y = np.asarray(pos[key], dtype=float)
        ax.plot(range(len(y)), y, marker="o", ms=3)
        ax.set_xlabel(label, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rel = np.asarray(pos["relative_lift"], dtype=float)
    axes[2].plot((np.arange(len(rel)) + 0.5) / len(rel), rel, marker="o", ms=3)
    axes[2].set_xlabel("relative position i / n", fontsize=8)
    axes[0].set_ylabel("mass / uniform mass", fontsize=8)
    for ax in axes:
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{summary.name or '(model)'}: position bias", fontsize=9)
    return fig


def comparison_chart(comparison: Comparison) -> Any:
    """Left: the metric of every pooling with its confidence interval, the baseline marked. Right: the paired
    difference to the baseline with its interval; an interval clear of 0 is a measured difference."""
    plt = _plt()
    names = list(comparison.results)
    y = np.arange(len(names))[::-1]
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(10.0, 0.45 * len(names) + 1.3), sharey=True)
    for i, n in enumerate(names):
        r = comparison.results[n]
        color = "#c44e52" if n == comparison.baseline else "#3b6ea8"
        ax.errorbar(r.value, y[i], xerr=[[r.value - r.ci[0]], [r.ci[1] - r.value]], fmt="o", color=color, capsize=3)
        d = comparison.differences.get(n)
        if d is not None:
            color = "#2e8b57" if d.significant else "#777777"
            axd.errorbar(d.value, y[i], xerr=[[d.value - d.ci[0]], [d.ci[1] - d.value]], fmt="o", color=color,
                         capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    if comparison.baseline in comparison.results:
        ax.axvline(comparison.results[comparison.baseline].value, color="#c44e52", ls="--", lw=0.8)
    axd.axvline(0.0, color="grey", ls="--", lw=0.8)
    pct = round(comparison.confidence * 100)
    ax.set_xlabel(f"{comparison.metric_name} ({pct}% bootstrap CI)", fontsize=8)
    axd.set_xlabel(f"difference to {comparison.baseline} (paired, {pct}% CI)", fontsize=8)
    for a in (ax, axd):
        a.tick_params(labelsize=7)
    return fig
