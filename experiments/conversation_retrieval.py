"""Conversational retrieval on gcloud-man: which query vector finds the document of a conversation's last turn?

    python experiments/conversation_retrieval.py --store /tmp/kb-gcloud        # the full run (a few minutes)

The conversations come from :func:`attnpool.conversation.generate_conversations` (seeded; see its docstring). They are
split by command group (a seeded hash, :func:`attnpool.kb.evaluate.split_queries` on the group names) into a tune half
and a test half, so that no resource seen while tuning appears in the test. Query vectors compared, each scored against
the knowledge base with its ``attention`` document method:

* ``last``: the last turn alone;
* ``concat``: the whole conversation's text, oldest first, encoded as one text;
* ``mean``: the mean of the turns' vectors (the last turn included);
* ``recency``: :class:`attnpool.conversation.HistoryPool` without the relevance term (decay and current-message bias
  tuned);
* ``attention``: HistoryPool with relevance, decay prior and role bias (T, decay, current bias and assistant bias
  tuned on a grid); ``attention-no-prior`` is the same with the decay fixed at 0 (an ablation).

Writes results.md, results.json and comparison.png (nDCG@10 and Recall@10 with 95% bootstrap CIs, overall and per
conversation kind) to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "gcloud-man"
DEFAULT_OUT = REPO / "experiments" / "results" / "conversation"
GRID = {"temperature": (0.05, 0.1, 0.2, 0.5), "decay": (0.0, 0.5, 1.0, 2.0),
        "current_bias": (-2.0, -1.0, 0.0, 1.0), "assistant_bias": (-1.0, 0.0, 1.0)}
RECENCY_GRID = {"temperature": (1e9,), "decay": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
                "current_bias": (-1.0, 0.0, 1.0, 2.0, 3.0)}
METRICS = ("ndcg@10", "recall@10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="a knowledge base of gcloud-man (opened read-only)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the gcloud-man BEIR directory")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0, help="generator, split and bootstrap seed")
    ap.add_argument("--per-group", type=int, default=4, help="conversations per command group")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--machine", default="2-core AMD EPYC VM, shared with other jobs at the time")
    ap.add_argument("--date", default=None, help="the date written in results.md (default: today, UTC)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite results.md and comparison.png in --out from its results.json")
    return ap.parse_args(argv)


def pad(conv_vectors: list[torch.Tensor], roles: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """History turns padded ``[C, L, D]`` with mask and roles, and the current messages ``[C, D]``."""
    longest = max(v.shape[0] - 1 for v in conv_vectors)
    dim = conv_vectors[0].shape[1]
    turns = torch.zeros(len(conv_vectors), longest, dim)
    mask = torch.zeros(len(conv_vectors), longest, dtype=torch.bool)
    role = torch.zeros(len(conv_vectors), longest, dtype=torch.long)
    for i, (v, r) in enumerate(zip(conv_vectors, roles)):
        n = v.shape[0] - 1
        # right-aligned, so that position means the same distance in every row (the pool counts it from the mask)
        turns[i, longest - n:] = v[:-1]
        mask[i, longest - n:] = True
        role[i, longest - n:] = torch.tensor(r[:-1], dtype=torch.long)
    current = torch.stack([v[-1] for v in conv_vectors])
    return turns, mask, role, current


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        result = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
        (args.out / "results.md").write_text(markdown(result), encoding="utf-8")
        plot(result, args.out / "comparison.png")
        return 0
    torch.set_num_threads(args.threads)
    from attnpool.conversation import KINDS, ROLES, HistoryPool, default_history_pool, generate_conversations
    from attnpool.kb import KnowledgeBase
    from attnpool.kb.evaluate import bootstrap_difference, environment, load_beir, per_query_metrics, split_queries

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    data = load_beir(args.data_dir)
    convs = generate_conversations(data.corpus, data.queries, data.qrels, seed=args.seed, per_group=args.per_group)
    tune_groups, test_groups = split_queries(sorted({c.group for c in convs}), seed=args.seed)
    tune = [c for c in convs if c.group in set(tune_groups)]
    test = [c for c in convs if c.group in set(test_groups)]
    print(f"{len(convs)} conversations over {len(tune_groups) + len(test_groups)} command groups: {len(tune)} tune, "
          f"{len(test)} test", flush=True)
    qrels = {c.conv_id: {c.target: 1} for c in convs}

    kb = KnowledgeBase(args.store)
    doc_ids = kb.doc_ids
    t = time.perf_counter()
    texts = sorted({t.text for c in convs for t in c.turns})
    vec = dict(zip(texts, kb.encode_queries(texts)))
    concat_texts = [" ".join(t.text for t in c.turns) for c in convs]
    concat_vec = dict(zip([c.conv_id for c in convs], kb.encode_queries(concat_texts)))
    timing["encode_s"] = time.perf_counter() - t
    max_tokens = max(len(kb.encoder.tokenizer(x)["input_ids"]) for x in concat_texts)
    print(f"encoded {len(texts)} turns and {len(convs)} conversations in {timing['encode_s']:.1f} s "
          f"(longest conversation {max_tokens} tokens, encoder limit {kb.encoder.max_seq_length})", flush=True)

    def tensors(part: list[Any]) -> tuple[torch.Tensor, ...]:
        return pad([torch.stack([vec[t.text] for t in c.turns]) for c in part],
                   [[ROLES.index(t.role) for t in c.turns] for c in part])

    def pooled(pool: HistoryPool, part: list[Any]) -> torch.Tensor:
        turns, mask, role, current = tensors(part)
        with torch.no_grad():
            out = pool(turns, current, mask=mask, roles=role)
        return torch.nn.functional.normalize(out, dim=-1)  # type: ignore[arg-type]

    def evaluate(queries: torch.Tensor, part: list[Any]) -> dict[str, np.ndarray]:
        scores = kb.score(queries, "attention")
        return per_query_metrics(scores, doc_ids, [c.conv_id for c in part], qrels)

    def make_pool(cfg: dict[str, float], relevance: bool = True) -> HistoryPool:
        # without relevance, T = 1e9 leaves only the prior (and the current message's bias) in the logits
        return default_history_pool(**{**cfg, "temperature": cfg["temperature"] if relevance else 1e9})

    def tune_grid(grid: dict[str, tuple[float, ...]], relevance: bool, label: str) -> tuple[dict[str, float], list]:
        t = time.perf_counter()
        curve = []
        for values in itertools.product(*grid.values()):
            cfg = dict(zip(grid, values))
            if relevance and label == "attention-no-prior" and cfg["decay"] != 0.0:
                continue
            ndcg = float(evaluate(pooled(make_pool(cfg, relevance), tune), tune)["ndcg@10"].mean())
            curve.append({**cfg, "ndcg@10": ndcg})
        best = max(curve, key=lambda r: r["ndcg@10"])
        timing[f"tune_{label}_s"] = time.perf_counter() - t
        print(f"tuned {label} over {len(curve)} settings in {timing[f'tune_{label}_s']:.1f} s: {best}", flush=True)
        return {k: v for k, v in best.items() if k != "ndcg@10"}, curve

    chosen: dict[str, dict[str, float]] = {}
    curves: dict[str, list] = {}
    chosen["attention"], curves["attention"] = tune_grid(GRID, True, "attention")
    chosen["attention-no-prior"], curves["attention-no-prior"] = tune_grid(GRID, True, "attention-no-prior")
    chosen["recency"], curves["recency"] = tune_grid(RECENCY_GRID, False, "recency")

    t = time.perf_counter()
    queries = {
        "last": torch.stack([vec[c.turns[-1].text] for c in test]),
        "concat": torch.stack([concat_vec[c.conv_id] for c in test]),
        "mean": torch.nn.functional.normalize(torch.stack([torch.stack([vec[t.text] for t in c.turns]).mean(0)
                                                           for c in test]), dim=-1),
        "recency": pooled(make_pool(chosen["recency"], relevance=False), test),
        "attention-no-prior": pooled(make_pool(chosen["attention-no-prior"]), test),
        "attention": pooled(make_pool(chosen["attention"]), test),
    }
    per_query = {m: evaluate(q, test) for m, q in queries.items()}
    timing["test_s"] = time.perf_counter() - t
    kinds = np.array([c.kind for c in test])

    def summary(values: np.ndarray) -> dict[str, float]:
        mean, lo, hi = bootstrap_difference(values, np.zeros_like(values), resamples=args.resamples, seed=args.seed)
        return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(values)}

    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for m, pq in per_query.items():
        table[m] = {"all": {k: summary(pq[k]) for k in METRICS}}
        for kind in KINDS:
            table[m][kind] = {k: summary(pq[k][kinds == kind]) for k in METRICS}
    differences = []
    for other in per_query:
        if other == "attention":
            continue
        for scope in ("all", *KINDS):
            sel = np.ones(len(test), bool) if scope == "all" else kinds == scope
            for k in METRICS:
                mean, lo, hi = bootstrap_difference(per_query["attention"][k][sel], per_query[other][k][sel],
                                                    resamples=args.resamples, seed=args.seed)
                differences.append({"a": "attention", "b": other, "scope": scope, "metric": k, "difference": mean,
                                    "ci_low": lo, "ci_high": hi})

    # where the attention pool puts its weight, on average, per kind (test split)
    pool = make_pool(chosen["attention"])
    turns, mask, role, current = tensors(test)
    with torch.no_grad():
        _, w = pool(turns, current, mask=mask, roles=role, return_weights=True)
    weight_notes = {}
    for kind in KINDS:
        sel = torch.from_numpy(kinds == kind)
        weight_notes[kind] = {"current": float(w[sel, -1].mean()), "previous_turn": float(w[sel, -2].mean()),
                              "older": float(w[sel, :-2].sum(1).mean())}
    timing["total_s"] = time.perf_counter() - t_start
    env = environment()
    if args.date:
        env["date"] = args.date
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    result = {"command": command, "machine": args.machine, "environment": env, "store": str(args.store),
              "store_meta": kb.store().meta, "document_temperature": kb.temperature(), "seed": args.seed,
              "num_conversations": len(convs), "num_tune": len(tune), "num_test": len(test),
              "tune_groups": tune_groups, "test_groups": test_groups, "chosen": chosen, "grid": GRID,
              "recency_grid": RECENCY_GRID, "tune_curves": curves, "table": table, "differences": differences,
              "weights_by_kind": weight_notes, "timing": timing, "max_conversation_tokens": max_tokens,
              "per_query": {m: {k: v.tolist() for k, v in pq.items()} for m, pq in per_query.items()},
              "test_kinds": kinds.tolist(), "examples": [c.to_dict() for c in test[:8]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (args.out / "results.md").write_text(markdown(result), encoding="utf-8")
    plot(result, args.out / "comparison.png")
    print(markdown(result))
    print(f"wrote {args.out}/results.md, results.json, comparison.png")
    return 0


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def markdown(r: dict[str, Any]) -> str:
    from attnpool.conversation import KINDS

    env = r["environment"]
    lines = ["# Conversational retrieval on gcloud-man", "",
             f"Date {env['date']}; {r['machine']} ({env['cpu']}, {env['cores']} cores visible), torch {env['torch']}."
             f" Wall time {r['timing']['total_s']:.0f} s.", "", f"Command: `{r['command']}`", "",
             f"{r['num_conversations']} seeded conversations (`attnpool.conversation.generate_conversations`, seed "
             f"{r['seed']}), split by command group: {r['num_tune']} tune ({len(r['tune_groups'])} groups), "
             f"{r['num_test']} test ({len(r['test_groups'])} groups). Documents scored with the knowledge base's "
             f"`attention` method (T = {r['document_temperature']}), store `{r['store']}` "
             f"({r['store_meta'].get('model_id')}, {r['store_meta'].get('max_tokens')}-token chunks).", "",
             "## The benchmark", "",
             "Generator: `attnpool.conversation.generate_conversations(corpus, queries, qrels, seed, per_group)` "
             "(documented in its docstring). Pages are grouped by command group (`gcloud sql instances`); a "
             "conversation walks through 2-3 commands of one group (e.g. create, then list, then delete). The first "
             "question is the page's one-line description; follow-ups are elliptical: the resource's noun phrase is "
             "replaced by a pronoun (`elide_resource`: 'delete a Cloud SQL instance' -> 'delete it'). Each user "
             "turn but the last is answered by an assistant turn that names the command and quotes its description. "
             "The target is the page of the last turn. Four kinds, in equal numbers: `follow-up` (the chain alone), "
             "`topic-shift` (a chain about another group first), `chit-chat` (two small-talk turns just before the "
             "last turn), `off-topic` (an unrelated question and its answer just before the last turn, which starts "
             "'Back to my earlier question: ...'). Example (test split):", "",
             *_example(r), "",
             "Settings chosen on the tune split (nDCG@10): " + "; ".join(
                 f"{m}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) for m, cfg in r["chosen"].items()), "",
             "## Test split: mean with 95% bootstrap CI", "",
             "| query vector | nDCG@10 | Recall@10 |", "|---|---|---|"]
    for m, t in r["table"].items():
        lines.append(f"| {m} | {_cell(t['all']['ndcg@10'])} | {_cell(t['all']['recall@10'])} |")
    lines += ["", "## nDCG@10 by conversation kind (test split)", "",
              "| query vector | " + " | ".join(f"{k} (n={r['table']['last'][k]['ndcg@10']['n']})" for k in KINDS)
              + " |", "|---" * (len(KINDS) + 1) + "|"]
    for m, t in r["table"].items():
        lines.append(f"| {m} | " + " | ".join(_cell(t[k]["ndcg@10"]) for k in KINDS) + " |")
    lines += ["", "## attention minus each other query vector (paired bootstrap, 95% CI)", "",
              "| vs | scope | metric | difference | 95% CI |", "|---|---|---|---|---|"]
    for d in r["differences"]:
        if d["scope"] == "all" or d["metric"] == "ndcg@10":
            lines.append(f"| {d['b']} | {d['scope']} | {d['metric']} | {d['difference']:+.3f} | "
                         f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    lines += ["", "Mean attention weight on the current message, the turn just before it, and older turns (test):", ""]
    lines += [f"- {k}: current {v['current']:.2f}, previous turn {v['previous_turn']:.2f}, older {v['older']:.2f}"
              for k, v in r["weights_by_kind"].items()]
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timing"].items()), ""]
    return "\n".join(lines)


def _example(r: dict[str, Any]) -> list[str]:
    out = []
    seen = set()
    for ex in r["examples"]:
        if ex["kind"] in seen or ex["kind"] not in ("off-topic", "topic-shift"):
            continue
        seen.add(ex["kind"])
        out.append(f"- `{ex['kind']}`, target `{ex['target']}` ({ex['group']}):")
        out += [f"  - {t['role']}: {t['text']}" for t in ex["turns"]]
    return out


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnpool.conversation import KINDS

    methods = list(r["table"])
    scopes = ["all", *KINDS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for ax, metric in zip(axes, METRICS):
        for i, m in enumerate(methods):
            cells = [r["table"][m][s][metric] for s in scopes]
            means = np.array([c["mean"] for c in cells])
            err = np.array([[c["mean"] - c["ci_low"] for c in cells], [c["ci_high"] - c["mean"] for c in cells]])
            ax.bar(np.arange(len(scopes)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=err,
                   capsize=2, label=m, color=None if m != "attention" else "#C44E52")
        ax.set_xticks(np.arange(len(scopes)), scopes)
        ax.set_ylabel(f"{metric} (test split)")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle("Conversational retrieval on gcloud-man: query vector from the history (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
