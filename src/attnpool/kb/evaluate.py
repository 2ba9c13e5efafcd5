"""Retrieval evaluation on a BEIR directory: every document pooling method side by side, with BM25, on a seeded
tune/test split of the queries, and paired bootstrap confidence intervals on the differences.

    attnpool kb eval BEIR_DIR [--store DIR] [--out DIR] [--seed 0]

What is tuned, and on what: the ``attention`` temperature and first-chunk prior (a grid), the ``hybrid-score``
weight, and the ``learned`` and ``multi`` heads (trained on (query, relevant document) pairs) see only the tune
split; every reported figure is on the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnpool.kb.heads import build_head, doc_vectors, save_head, train_head
from attnpool.kb.knowledge_base import KnowledgeBase
from attnpool.kb.methods import METHODS
from attnpool.kb.sources import InputError, read_beir_corpus, read_beir_qrels, read_beir_queries

__all__ = ["BeirData", "EvalResult", "bootstrap_difference", "evaluate_beir", "load_beir",
           "metrics_for_ranking", "split_queries"]

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
FUSION_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TEMPERATURE_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
#: the first-chunk prior beta, in logits (``softmax(s / T + beta [i = 0])``)
FIRST_BIAS_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
#: rows reported beside the methods: attention without the first-chunk prior (T tuned alone), and the issue's
#: reference hybrid, reciprocal-rank fusion of BM25 and max
EXTRA_ROWS = ("attention-no-prior", "rrf-bm25-max")


def split_queries(query_ids: Sequence[str], seed: int = 0, tune_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """A seeded split of query ids into (tune, test), independent of the input's order: each id goes to tune when a
    hash of (seed, id) falls below ``tune_fraction``, after sorting, so that adding queries never moves others."""
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction: expected a number in (0, 1), got {tune_fraction}")
    tune, test = [], []
    for qid in sorted(set(query_ids)):
        h = int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:8], "big") / 2**64
        (tune if h < tune_fraction else test).append(qid)
    return tune, test


@dataclass
class BeirData:
    path: Path
    corpus: list[Any]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(path: str | os.PathLike[str], split: str = "test") -> BeirData:
    """Read a BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) and check that it is whole:
    every judged query exists, and at least one judged document is in the corpus."""
    path = Path(path)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (path / need).is_file():
            raise InputError(f"{path}: expected a BEIR directory with {need}, which is missing")
    corpus = read_beir_corpus(path / "corpus.jsonl")
    if not corpus:
        raise InputError(f"{path / 'corpus.jsonl'}: expected at least one document, got none")
    queries = read_beir_queries(path / "queries.jsonl")
    qrels = read_beir_qrels(path / "qrels" / f"{split}.tsv")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise InputError(f"{path / 'qrels' / f'{split}.tsv'}: {len(missing)} judged queries are not in queries.jsonl "
                         f"(first: {missing[0]!r})")
    ids = {d.doc_id for d in corpus}
    qrels = {q: {d: r for d, r in rel.items() if d in ids} for q, rel in qrels.items()}
    qrels = {q: rel for q, rel in qrels.items() if any(r > 0 for r in rel.values())}
    if not qrels:
        raise InputError(f"{path}: no query has a relevant document that is in the corpus")
    return BeirData(path, corpus, queries, qrels)


def metrics_for_ranking(ranking: Sequence[str], relevant: dict[str, int]) -> dict[str, float]:
    """nDCG@10 (linear gain, as pytrec_eval), Recall@10, Recall@100 and MRR@10 of one ranked list of doc ids."""
    gains = [relevant.get(d, 0) for d in ranking[:100]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]) if g > 0)
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    num_rel = sum(1 for r in relevant.values() if r > 0)
    mrr = next((1.0 / (i + 1) for i, g in enumerate(gains[:10]) if g > 0), 0.0)
    return {"ndcg@10": dcg / idcg if idcg else 0.0,
            "recall@10": sum(1 for g in gains[:10] if g > 0) / num_rel if num_rel else 0.0,
            "recall@100": sum(1 for g in gains if g > 0) / num_rel if num_rel else 0.0,
            "mrr@10": mrr}


def per_query_metrics(scores: Tensor, doc_ids: Sequence[str], query_ids: Sequence[str],
                      qrels: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """Metrics per query (arrays aligned with ``query_ids``) from scores ``[Q, B]``; ties broken by doc order."""
    top = torch.topk(scores, min(100, scores.shape[1]), dim=1).indices.tolist()
    rows = [metrics_for_ranking([doc_ids[i] for i in t], qrels[q]) for t, q in zip(top, query_ids)]
    return {m: np.array([r[m] for r in rows]) for m in METRICS}


def bootstrap_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` (paired per query) and its percentile bootstrap CI."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(lo), float(hi)


@dataclass
class EvalResult:
    dataset: str
    num_docs: int
    num_chunks: int
    num_tune: int
    num_test: int
    temperature: float
    first_bias: float
    fusion_weight: float
    tuning_curve: dict[str, float]
    metrics: dict[str, dict[str, float]]
    differences: list[dict[str, Any]]
    train: dict[str, Any] = field(default_factory=dict)
    fitted: bool = True
    timing: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    per_query: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def evaluate_beir(beir_dir: str | os.PathLike[str], kb: KnowledgeBase, *, seed: int = 0,
                  methods: Sequence[str] = METHODS, head_steps: int = 400,
                  save_heads: bool = False, fit: bool = True, progress: bool = True) -> EvalResult:
    """Index ``beir_dir``'s corpus into ``kb`` (unchanged documents are skipped), tune on one half of the queries and
    report every method and BM25 on the other half.

    ``fit=False`` fits nothing on the tune half: the store's own settings and heads are used as they are (the
    defaults, or what ``attnpool kb tune`` learned without labels), and ``learned``/``multi`` are reported only when
    the store has those heads. The test half is the same either way, so the two runs compare directly."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: expected names from {', '.join(METHODS)}, got {m!r}")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_beir(beir_dir)
    report = kb.index(data.corpus, delete_missing=True, progress=progress)
    timing["index_s"] = report.seconds
    doc_ids = kb.doc_ids
    position = {d: i for i, d in enumerate(doc_ids)}
    tune_ids, test_ids = split_queries(list(data.qrels), seed=seed)
    if not tune_ids or not test_ids:
        raise InputError(f"{beir_dir}: expected enough judged queries for a tune and a test split, got "
                         f"{len(data.qrels)}")
    t = time.perf_counter()
    qv = kb.encode_queries([data.queries[q] for q in tune_ids + test_ids])
    timing["encode_queries_s"] = time.perf_counter() - t
    tune_q, test_q = qv[:len(tune_ids)], qv[len(tune_ids):]

    metrics: dict[str, dict[str, np.ndarray]] = {}
    curve: dict[str, float] = {}
    temperature, first_bias = kb.temperature(), kb.first_bias()
    temperature_no_prior = temperature
    train_info: dict[str, Any] = {}
    if "attention" in methods and fit:
        t = time.perf_counter()
        for tau in TEMPERATURE_GRID:
            for beta in FIRST_BIAS_GRID:
                s = kb.score(tune_q, "attention", temperature=tau, first_bias=beta)
                curve[f"T={tau},beta={beta}"] = float(
                    per_query_metrics(s, doc_ids, tune_ids, data.qrels)["ndcg@10"].mean())
        temperature, first_bias = max(((tau, beta) for tau in TEMPERATURE_GRID for beta in FIRST_BIAS_GRID),
                                      key=lambda tb: curve[f"T={tb[0]},beta={tb[1]}"])
        temperature_no_prior = max(TEMPERATURE_GRID, key=lambda tau: curve[f"T={tau},beta=0.0"])
        timing["tune_attention_s"] = time.perf_counter() - t
        if save_heads:
            kb.save_settings(attention_temperature=temperature, first_bias=first_bias)
    fusion_weight = kb.fusion_weight()
    tune_texts = [data.queries[q] for q in tune_ids]
    test_texts = [data.queries[q] for q in test_ids]
    if "hybrid-score" in methods and fit:
        t = time.perf_counter()
        signals = kb.signals(tune_q, "hybrid-score", texts=tune_texts, temperature=temperature,
                             first_bias=first_bias)
        for w in FUSION_GRID:
            s = kb.fuse(signals, "hybrid-score", fusion_weight=w)
            curve[f"w={w}"] = float(per_query_metrics(s, doc_ids, tune_ids, data.qrels)["ndcg@10"].mean())
        fusion_weight = float(max(FUSION_GRID, key=lambda w: curve[f"w={w}"]))
        timing["tune_fusion_s"] = time.perf_counter() - t
        if save_heads:
            kb.save_settings(fusion_weight=fusion_weight)
    heads = {}
    if not fit:
        methods = [m for m in methods if m not in ("learned", "multi") or (kb.head_path(m) / "config.json").is_file()]
    for kind in ("learned", "multi"):
        if kind not in methods or not fit:
            continue
        pairs = [(i, position[next(d for d, r in data.qrels[q].items() if r > 0)]) for i, q in enumerate(tune_ids)]
        positives = torch.tensor([p for _, p in pairs])
        head = build_head(kind, tune_q.shape[1], seed=seed)
        result = train_head(head, kb.chunk_matrix(), tune_q, positives, steps=head_steps, seed=seed,
                            progress=progress, desc=f"training {kind}")
        heads[kind] = head
        train_info[kind] = {"steps": result.steps, "seconds": result.seconds, "first_loss": result.losses[0],
                            "last_loss": float(np.mean(result.losses[-20:])), "losses": result.losses}
        if save_heads:
            save_head(head, kb.head_path(kind), model_id=kb.store().meta["model_id"], seed=seed, steps=head_steps)
    if heads:
        kb._loaded()["static"].clear()
    for m in methods:
        t = time.perf_counter()
        if m in heads:
            with torch.inference_mode():
                from attnpool.kb.methods import static_scores

                s = static_scores(doc_vectors(heads[m], kb.chunk_matrix()), test_q)
        else:
            s = kb.score(test_q, m, texts=test_texts, temperature=temperature, first_bias=first_bias,
                         fusion_weight=fusion_weight)
        timing[f"score_{m}_s"] = time.perf_counter() - t
        metrics[m] = per_query_metrics(s, doc_ids, test_ids, data.qrels)
    if "attention" in methods and fit and first_bias != 0:
        s = kb.score(test_q, "attention", temperature=temperature_no_prior, first_bias=0.0)
        metrics["attention-no-prior"] = per_query_metrics(s, doc_ids, test_ids, data.qrels)
    if "bm25" in methods and "max" in methods:
        from attnpool.kb.methods import reciprocal_rank_fusion

        s = reciprocal_rank_fusion([kb.score(test_q, "bm25", texts=test_texts), kb.score(test_q, "max")])
        metrics["rrf-bm25-max"] = per_query_metrics(s, doc_ids, test_ids, data.qrels)
    differences = []
    pairs_to_compare: list[tuple[str, str]] = []
    baselines = [m for m in ("first", "mean", "max") if m in metrics]
    if baselines:
        best = max(baselines, key=lambda m: metrics[m]["ndcg@10"].mean())
        for m in ("attention", "learned", "multi"):
            if m in metrics:
                pairs_to_compare.append((m, best))
        if "learned" in metrics and best != "mean" and "mean" in metrics:
            pairs_to_compare.append(("learned", "mean"))
    if "bm25" in metrics:
        pairs_to_compare += [(m, "bm25") for m in methods if m != "bm25"]
    if "hybrid" in metrics and "max" in metrics:
        pairs_to_compare.append(("hybrid", "max"))
    if "rrf-bm25-max" in metrics:
        pairs_to_compare += [(m, "rrf-bm25-max") for m in ("hybrid", "hybrid-score") if m in metrics]
    if "attention-no-prior" in metrics:
        pairs_to_compare.append(("attention", "attention-no-prior"))
    for a, b in pairs_to_compare:
        for metric in ("ndcg@10", "mrr@10"):
            mean, lo, hi = bootstrap_difference(metrics[a][metric], metrics[b][metric], seed=seed)
            differences.append({"a": a, "b": b, "metric": metric, "difference": mean, "ci_low": lo, "ci_high": hi})
    timing["total_s"] = time.perf_counter() - t0
    return EvalResult(
        dataset=str(beir_dir), num_docs=len(doc_ids), num_chunks=kb.num_chunks, num_tune=len(tune_ids),
        num_test=len(test_ids), temperature=temperature, first_bias=first_bias, fusion_weight=fusion_weight,
        tuning_curve=curve,
        metrics={m: {k: float(v.mean()) for k, v in per_q.items()} for m, per_q in metrics.items()},
        differences=differences, train=train_info, fitted=fit, timing=timing, environment=environment(),
        per_query={m: {k: v.tolist() for k, v in per_q.items()} for m, per_q in metrics.items()})


def environment() -> dict[str, str]:
    from attnpool._machine import cpu_name

    cpu = cpu_name()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu, "cores": str(os.cpu_count()),
            "torch": torch.__version__, "python": platform.python_version()}


def format_markdown(result: EvalResult, command: str = "") -> str:
    env = result.environment
    fitted = ("(both chosen on the tune split)." if result.fitted else
              "(the store's own settings and heads: nothing fitted on labels).")
    lines = [f"# Retrieval on `{Path(result.dataset).name}`", "",
             f"{result.num_docs} documents, {result.num_chunks} chunks; {result.num_tune} tune and {result.num_test} "
             f"test queries (seeded split). Attention temperature T = {result.temperature}, first-chunk prior "
             f"beta = {result.first_bias}, hybrid-score weight w = {result.fusion_weight} {fitted} "
             f"Date {env.get('date')}, {env.get('cpu')} ({env.get('cores')} "
             f"cores), torch {env.get('torch')}.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for m, vals in result.metrics.items():
        lines.append(f"| {m} | " + " | ".join(f"{vals[k]:.3f}" for k in METRICS) + " |")
    lines += ["", "Paired bootstrap (2000 resamples over test queries), 95% CI of the difference:", "",
              "| comparison | metric | difference | 95% CI |", "|---|---|---|---|"]
    for d in result.differences:
        lines.append(f"| {d['a']} - {d['b']} | {d['metric']} | {d['difference']:+.3f} | "
                     f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    if result.tuning_curve:
        lines += ["", "Tuning on the tune split (nDCG@10): " +
                  ", ".join(f"{t}: {v:.3f}" for t, v in result.tuning_curve.items())]
    if result.train:
        lines += ["", "Heads trained on the tune split: " + "; ".join(
            f"{k}: {v['steps']} steps, loss {v['first_loss']:.3f} → {v['last_loss']:.3f}, {v['seconds']:.1f} s"
            for k, v in result.train.items())]
    lines += ["", "Time: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timing.items())]
    return "\n".join(lines) + "\n"


def write_results(result: EvalResult, out: str | os.PathLike[str], command: str = "") -> list[Path]:
    """``results.md``, ``results.json`` and ``comparison.png`` (nDCG@10 per method with bootstrap 95% CIs)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(format_markdown(result, command), encoding="utf-8")
    js = out / "results.json"
    js.write_text(json.dumps({**vars(result), "command": command}, indent=1), encoding="utf-8")
    written = [md, js]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    names = list(result.metrics)
    means, errs = [], []
    rng = np.random.default_rng(0)
    for m in names:
        v = np.asarray(result.per_query[m]["ndcg@10"])
        boots = v[rng.integers(0, len(v), size=(2000, len(v)))].mean(1)
        lo, hi = np.quantile(boots, [0.025, 0.975])
        means.append(v.mean())
        errs.append([v.mean() - lo, hi - v.mean()])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#4C72B0" if m in ("attention", "learned", "multi") else "#999999" for m in names]
    ax.bar(names, means, yerr=np.array(errs).T, color=colors, capsize=4)
    ax.set_ylabel("nDCG@10 (test split)")
    ax.set_ylim(max(0.0, min(means) - 0.1), min(1.0, max(means) + 0.05))
    ax.set_title(f"{Path(result.dataset).name}: document pooling methods (95% bootstrap CI)")
    for i, v in enumerate(means):
        ax.text(i, v + 0.005, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    png = out / "comparison.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    return written
