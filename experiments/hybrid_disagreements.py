"""Where the hybrid and the single methods disagree: a handful of test queries, side by side.

    python experiments/hybrid_disagreements.py --store /tmp/kb-gcloud --beir ../shared/datasets/gcloud-man \
        --out experiments/results/kb/disagreements-gcloud-man.md

On the test half of ``kb eval``'s seeded split, with the store's own settings (``T``, ``beta``, ``w``: what
``kb eval --save-heads`` or ``kb tune`` saved), it ranks every document by ``bm25``, ``attention`` and the fused
``hybrid-score``, and picks the queries where the three put different documents first, preferring those where only
one of them is right. For each it shows the relevant document's rank under each method, its chunks' attention
weights and BM25 scores, and the text of the chunk the attention weighted most: the same numbers that
``attnpool kb search --explain`` and the web page show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attnpool.kb import KnowledgeBase
from attnpool.kb import methods as M
from attnpool.kb.evaluate import environment, load_beir, split_queries

SIGNALS = ("bm25", "attention", "hybrid-score")


def ranks_of(scores: torch.Tensor, doc: int) -> torch.Tensor:
    """``[Q]`` rank (1 = best) of document ``doc`` in each row of ``scores [Q, B]``."""
    return (scores > scores[:, doc:doc + 1]).sum(1) + 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--beir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kb = KnowledgeBase(args.store)
    data = load_beir(args.beir)
    _, test = split_queries(list(data.qrels), seed=args.seed)
    texts = [data.queries[q] for q in test]
    qv = kb.encode_queries(texts)
    signals = kb.signals(qv, "hybrid-score", texts=texts)
    scores = {"bm25": signals["bm25"], "attention": signals["attention"],
              "hybrid-score": kb.fuse(signals, "hybrid-score")}
    gold = [kb.doc_ids.index(next(d for d, r in data.qrels[q].items() if r > 0)) for q in test]
    top1 = {m: s.argmax(1) for m, s in scores.items()}
    right = {m: torch.tensor([int(top1[m][i]) == g for i, g in enumerate(gold)]) for m in SIGNALS}
    h, b, a = right["hybrid-score"], right["bm25"], right["attention"]
    counts = {
        "hybrid right, both single methods wrong": int((h & ~b & ~a).sum()),
        "hybrid right, bm25 wrong, attention right": int((h & ~b & a).sum()),
        "hybrid right, attention wrong, bm25 right": int((h & b & ~a).sum()),
        "hybrid wrong, bm25 right": int((~h & b).sum()),
        "hybrid wrong, attention right": int((~h & a).sum()),
        "all three wrong": int((~h & ~b & ~a).sum()),
    }
    # the examples: queries whose three top documents are not all the same, where exactly one method is right
    # first, then the rest; in test order (seeded by the split, not picked by hand)
    disagree = [i for i in range(len(test)) if len({int(top1[m][i]) for m in SIGNALS}) > 1]
    one_right = [i for i in disagree if sum(bool(right[m][i]) for m in SIGNALS) == 1]
    picked = (one_right + [i for i in disagree if i not in one_right])[: args.examples]
    chunks = kb.chunk_matrix()
    lexical = kb.lexical_chunk_scores([texts[i] for i in picked]) if picked else None
    settings = f"T = {kb.temperature()}, beta = {kb.first_bias()}, w = {kb.fusion_weight()}"
    env = environment()
    lines = [f"# Where the hybrid and the single methods disagree: `{Path(args.beir).name}`", "",
             f"{len(test)} test queries (seed {args.seed}); the store's settings: {settings}. {env['date']}, "
             f"{env['cpu']} ({env['cores']} cores). Command: `python experiments/hybrid_disagreements.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "Top-1 agreement with the relevant document, over all test queries:", "",
             "| case | queries |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"{len(disagree)} queries have at least two different top documents among the three methods. "
              f"{len(picked)} of them, those where exactly one method is right first:", ""]
    for j, i in enumerate(picked):
        g = gold[i]
        a, b = int(chunks.offsets[g]), int(chunks.offsets[g + 1])
        weights = M.attention_weights(chunks.vectors[a:b], qv[i], kb.temperature(), kb.first_bias())
        best = int(weights.argmax()) if b > a else 0
        rows = kb.store().chunk_texts(kb.doc_ids[g])
        # a code span, so that Markdown renderers take "[--flag=VALUE]" in a man page for text, not for a link
        snippet = " ".join(rows[best]["text"].split())[:300].replace("`", "'") if rows else ""
        lines += [f"### {j + 1}. “{texts[i]}”", "",
                  f"Relevant document: `{kb.doc_ids[g]}`.", "",
                  "| method | top document | rank of the relevant one |", "|---|---|---|"]
        for m in SIGNALS:
            lines.append(f"| {m} | `{kb.doc_ids[int(top1[m][i])]}` | {int(ranks_of(scores[m][i:i + 1], g)[0])} |")
        assert lexical is not None
        lines += ["", "Its chunks, in order: attention weight / BM25: " + ", ".join(
            f"{float(w):.2f} / {float(s):.1f}" for w, s in zip(weights, lexical[j, a:b])), "",
                  f"Chunk {best} (the heaviest): `{snippet}…`", ""]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
