"""Multi-document QA passage selection on gcloud-man: how much of the gold document gets into a token budget?

    python experiments/passage_selection.py --store /tmp/kb-gcloud          # the full run (a few minutes)

For each query (a page's one-line description), the candidates are every passage (chunk) of the 10 best documents by
the knowledge base's ``attention`` method. A selector fills a budget of 256, 512 and 1024 tokens (the passages' own
token counts; greedy, a passage that does not fit is skipped):

* ``top-k similarity``: passages by cosine with the question;
* ``top-k similarity + MMR``: the same with :func:`attnpool.passages.select_passages`' diversity (tuned);
* ``attention``: :func:`attnpool.passages.passage_weights` (hierarchical: document weight x passage weight within
  its document), no diversity;
* ``attention + diversity``: the same with the MMR-style diversity and near-duplicate exclusion (tuned).

Metrics per budget: passage recall (the gold document's passages selected / all its passages), gold hit (at least one
of them selected), and the distinct documents in the selection. Temperatures and diversity are tuned on the tune half
of the queries (seeded split, :func:`attnpool.kb.evaluate.split_queries`); all figures are on the test half, with
paired bootstrap 95% CIs against ``top-k similarity``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "gcloud-man"
DEFAULT_OUT = REPO / "experiments" / "results" / "passages"
BUDGETS = (256, 512, 1024)
T_GRID = (0.05, 0.1, 0.2, 0.5)
TDOC_GRID = (0.01, 0.03, 0.1)
DIVERSITY_GRID = (0.1, 0.3, 0.5)
METRICS = ("passage_recall", "gold_hit", "documents")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="a knowledge base of gcloud-man (opened read-only)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-docs", type=int, default=10, help="documents whose passages are candidates")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--machine", default="2-core AMD EPYC VM, shared with other jobs at the time")
    ap.add_argument("--date", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from attnpool.kb import KnowledgeBase
    from attnpool.kb.evaluate import bootstrap_difference, environment, load_beir, split_queries
    from attnpool.passages import PassageTable, passage_weights, select_passages

    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    data = load_beir(args.data_dir)
    kb = KnowledgeBase(args.store)
    table = PassageTable(kb)
    gold_count = Counter(p.doc_id for p in table.passages)
    tune_ids, test_ids = split_queries(list(data.qrels), seed=args.seed)
    ids = tune_ids + test_ids
    qv = kb.encode_queries([data.queries[q] for q in ids])
    scores = kb.score(qv, "attention")
    top = torch.topk(scores, args.num_docs, dim=1).indices.tolist()
    cands = []
    for i, q in enumerate(ids):
        passages, vectors = table.of_documents(top[i])
        gold = {d for d, r in data.qrels[q].items() if r > 0}
        cands.append((q, qv[i], passages, vectors, gold))
    timing["candidates_s"] = time.perf_counter() - t0
    print(f"{len(tune_ids)} tune, {len(test_ids)} test queries; {np.mean([len(c[2]) for c in cands]):.1f} candidate "
          f"passages per query ({timing['candidates_s']:.1f} s)", flush=True)

    def run(part: list[Any], method: str, cfg: dict[str, float], budgets: tuple[int, ...] = BUDGETS
            ) -> dict[int, dict[str, np.ndarray]]:
        out = {b: {m: [] for m in METRICS} for b in budgets}
        for _q, q, passages, vectors, gold in part:
            if method.startswith("top-k"):
                w = vectors @ q
            else:
                w = passage_weights(q, vectors, [p.doc_id for p in passages], temperature=cfg["temperature"],
                                    doc_temperature=cfg["doc_temperature"])
            n_gold = sum(gold_count.get(d, 0) for d in gold)
            for b in budgets:
                sel = select_passages(passages, vectors, w, budget=b, diversity=cfg.get("diversity", 0.0))
                hits = sum(1 for p in sel.passages if p.doc_id in gold)
                out[b]["passage_recall"].append(hits / n_gold if n_gold else 0.0)
                out[b]["gold_hit"].append(float(hits > 0))
                out[b]["documents"].append(float(len({p.doc_id for p in sel.passages})))
        return {b: {m: np.asarray(v) for m, v in vals.items()} for b, vals in out.items()}

    def objective(res: dict[int, dict[str, np.ndarray]]) -> float:
        return float(np.mean([res[b]["passage_recall"].mean() for b in res]))

    tune = cands[:len(tune_ids)]
    test = cands[len(tune_ids):]
    t = time.perf_counter()
    curves: dict[str, list[dict[str, float]]] = {"attention": [], "attention + diversity": [],
                                                 "top-k similarity + MMR": []}
    for temp, tdoc in itertools.product(T_GRID, TDOC_GRID):
        cfg = {"temperature": temp, "doc_temperature": tdoc}
        curves["attention"].append({**cfg, "objective": objective(run(tune, "attention", cfg))})
    best = max(curves["attention"], key=lambda r: r["objective"])
    chosen: dict[str, dict[str, float]] = {"top-k similarity": {},
                                           "attention": {k: v for k, v in best.items() if k != "objective"}}
    for div in DIVERSITY_GRID:
        cfg = {**chosen["attention"], "diversity": div}
        curves["attention + diversity"].append({**cfg, "objective": objective(run(tune, "attention", cfg))})
        curves["top-k similarity + MMR"].append({"diversity": div,
                                                 "objective": objective(run(tune, "top-k", {"diversity": div}))})
    for m in ("attention + diversity", "top-k similarity + MMR"):
        chosen[m] = {k: v for k, v in max(curves[m], key=lambda r: r["objective"]).items() if k != "objective"}
    timing["tune_s"] = time.perf_counter() - t
    print(f"tuned in {timing['tune_s']:.1f} s: {chosen}", flush=True)

    t = time.perf_counter()
    results = {m: run(test, m, cfg) for m, cfg in chosen.items()}
    timing["test_s"] = time.perf_counter() - t
    table_out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    differences = []
    for m, res in results.items():
        table_out[m] = {}
        for b in BUDGETS:
            table_out[m][str(b)] = {}
            for k in METRICS:
                v = res[b][k]
                mean, lo, hi = bootstrap_difference(v, np.zeros_like(v), resamples=args.resamples, seed=args.seed)
                table_out[m][str(b)][k] = {"mean": mean, "ci_low": lo, "ci_high": hi}
                if m != "top-k similarity" and k != "documents":
                    d, dlo, dhi = bootstrap_difference(v, results["top-k similarity"][b][k], resamples=args.resamples,
                                                       seed=args.seed)
                    differences.append({"a": m, "b": "top-k similarity", "budget": b, "metric": k, "difference": d,
                                        "ci_low": dlo, "ci_high": dhi})
    timing["total_s"] = time.perf_counter() - t0
    env = environment()
    if args.date:
        env["date"] = args.date
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    gold_in_candidates = float(np.mean([any(p.doc_id in c[4] for p in c[2]) for c in test]))
    result = {"command": command, "machine": args.machine, "environment": env, "store": str(args.store),
              "store_meta": kb.store().meta, "num_tune": len(tune), "num_test": len(test),
              "num_docs": args.num_docs, "candidates_per_query": float(np.mean([len(c[2]) for c in test])),
              "gold_in_candidates": gold_in_candidates, "chosen": chosen, "tune_curves": curves,
              "table": table_out, "differences": differences, "timing": timing,
              "per_query": {m: {str(b): {k: v.tolist() for k, v in r[b].items()} for b in BUDGETS}
                            for m, r in results.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (args.out / "results.md").write_text(markdown(result), encoding="utf-8")
    plot(result, args.out / "recall.png")
    print(markdown(result))
    return 0


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = ["# Passage selection within a token budget on gcloud-man", "",
             f"Date {env['date']}; {r['machine']} ({env['cpu']}, {env['cores']} cores visible), torch {env['torch']}."
             f" Wall time {r['timing']['total_s']:.0f} s.", "", f"Command: `{r['command']}`", "",
             f"{r['num_test']} test queries ({r['num_tune']} tune). Candidates: every passage of the "
             f"{r['num_docs']} best documents (knowledge base `attention` method), {r['candidates_per_query']:.1f} "
             f"per query; the gold document is among them for {100 * r['gold_in_candidates']:.1f}% of the test "
             f"queries. Store `{r['store']}` ({r['store_meta'].get('model_id')}, {r['store_meta'].get('max_tokens')}"
             f"-token chunks, overlap {r['store_meta'].get('overlap')}).", "",
             "Settings chosen on the tune split (mean passage recall over the three budgets): " + "; ".join(
                 f"{m}: " + (", ".join(f"{k}={v}" for k, v in cfg.items()) or "none")
                 for m, cfg in r["chosen"].items()),
             "", "## Test split: mean with 95% bootstrap CI", ""]
    for metric, label in (("passage_recall", "Passage recall (gold document's passages selected / all of them)"),
                          ("gold_hit", "Gold hit (at least one gold passage selected)"),
                          ("documents", "Distinct documents in the selection")):
        lines += [f"### {label}", "", "| selector | " + " | ".join(f"{b} tokens" for b in BUDGETS) + " |",
                  "|---" * (len(BUDGETS) + 1) + "|"]
        for m, t in r["table"].items():
            lines.append(f"| {m} | " + " | ".join(_cell(t[str(b)][metric]) for b in BUDGETS) + " |")
        lines.append("")
    lines += ["## Difference to top-k similarity (paired bootstrap, 95% CI)", "",
              "| selector | budget | metric | difference | 95% CI |", "|---|---|---|---|---|"]
    for d in r["differences"]:
        lines.append(f"| {d['a']} | {d['budget']} | {d['metric']} | {d['difference']:+.3f} | "
                     f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timing"].items()), ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("passage_recall", "gold_hit")):
        for m, t in r["table"].items():
            cells = [t[str(b)][metric] for b in BUDGETS]
            means = np.array([c["mean"] for c in cells])
            err = np.array([[c["mean"] - c["ci_low"] for c in cells], [c["ci_high"] - c["mean"] for c in cells]])
            ax.errorbar(BUDGETS, means, yerr=err, marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        ax.set_xlabel("token budget")
        ax.set_ylabel(f"{metric} (test split)")
    axes[0].legend(fontsize=8)
    fig.suptitle("gcloud-man: gold-document passages within a token budget (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
