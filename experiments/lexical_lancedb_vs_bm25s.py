"""Issue 10's first question: does LanceDB's own full-text index rank as well as bm25s?

    python experiments/lexical_lancedb_vs_bm25s.py --store /tmp/kb-gcloud --beir ../shared/datasets/gcloud-man

Both run on the same knowledge base and the same test half of the queries (`kb eval`'s seeded split):

* bm25s over documents (their text rebuilt from their chunks), Lucene BM25, English stopwords, Snowball stemming:
  the knowledge base's `bm25` method before this comparison moved it to LanceDB;
* bm25s over chunks, a document scored by its best chunk (separates the engine from the granularity);
* LanceDB FTS: a native full-text index (stemming, stopwords, lower case) on a copy of the store's chunk table; a
  document's score is its best chunk's score (the top 1000 chunks per query), as LanceDB ranks rows, not documents.

Writes a Markdown table with nDCG@10, Recall@10, MRR@10 and the paired bootstrap CI of the difference; the store is
only read (the index is built on a temporary copy).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnpool.kb import KnowledgeBase
from attnpool.kb.evaluate import bootstrap_difference, environment, load_beir, per_query_metrics, split_queries


def lancedb_scores(store_path: Path, doc_ids: list[str], queries: list[str], limit: int = 1000) -> torch.Tensor:
    import lancedb

    position = {d: i for i, d in enumerate(doc_ids)}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(store_path / "lance", Path(tmp) / "lance")
        table = lancedb.connect(str(Path(tmp) / "lance")).open_table("chunks")
        table.create_fts_index("text", stem=True, remove_stop_words=True, lower_case=True, replace=True)
        out = torch.zeros(len(queries), len(doc_ids))
        for i, q in enumerate(queries):
            rows = (table.search(q, query_type="fts").select(["doc_id", "_score"]).limit(limit).to_arrow().to_pydict())
            for d, s in zip(rows["doc_id"], rows["_score"]):
                j = position.get(d)
                if j is not None and s > out[i, j]:
                    out[i, j] = float(s)
        return out


def bm25s_scores(texts: list[str], queries: list[str]) -> torch.Tensor:
    """``[Q, len(texts)]`` bm25s scores: Lucene BM25 (k1 = 1.5, b = 0.75), English stopwords, Snowball stemming
    (what the knowledge base's `bm25` method used before it moved to LanceDB's index)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokenized = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False)
    vocab_inv = {v: k for k, v in tokenized.vocab.items()}
    out = torch.zeros(len(queries), len(texts))
    for i, ids in enumerate(tokenized.ids):
        words = [vocab_inv[t] for t in ids]
        if words:
            out[i] = torch.from_numpy(retriever.get_scores(words))
    return out


def bm25s_chunk_scores(kb: KnowledgeBase, queries: list[str]) -> torch.Tensor:
    """bm25s over the chunks, a document scored by its best chunk (the granularity LanceDB ranks at)."""
    rows = kb.store().chunk_texts_of(kb.doc_ids)
    texts = [r["text"] for d in kb.doc_ids for r in rows.get(d, [])]
    offsets = kb.chunk_matrix().offsets.expand(len(queries), -1).contiguous()
    return torch.segment_reduce(bm25s_scores(texts, queries), "max", offsets=offsets, axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--beir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    kb = KnowledgeBase(args.store)
    data = load_beir(args.beir)
    _, test = split_queries(list(data.qrels), seed=args.seed)
    texts = [data.queries[q] for q in test]
    t = time.perf_counter()
    bm25s_m = per_query_metrics(bm25s_scores(kb.store().document_texts(kb.doc_ids), texts), kb.doc_ids, test,
                                data.qrels)
    t_bm25s = time.perf_counter() - t
    t = time.perf_counter()
    chunk_m = per_query_metrics(bm25s_chunk_scores(kb, texts), kb.doc_ids, test, data.qrels)
    t_chunk = time.perf_counter() - t
    t = time.perf_counter()
    lance_m = per_query_metrics(lancedb_scores(Path(args.store), kb.doc_ids, texts), kb.doc_ids, test, data.qrels)
    t_lance = time.perf_counter() - t
    env = environment()
    lines = [f"# Lexical side: LanceDB full-text index vs bm25s on `{Path(args.beir).name}`", "",
             f"{len(test)} test queries (seed {args.seed}), {kb.num_documents} documents, {kb.num_chunks} chunks. "
             f"{env['date']}, {env['cpu']} ({env['cores']} cores). Command: `python "
             f"experiments/lexical_lancedb_vs_bm25s.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| lexical index | nDCG@10 | Recall@10 | MRR@10 | seconds |", "|---|---|---|---|---|"]
    for name, m, s in (("bm25s (documents)", bm25s_m, t_bm25s), ("bm25s (best chunk)", chunk_m, t_chunk),
                       ("LanceDB FTS (best chunk)", lance_m, t_lance)):
        lines.append(f"| {name} | {m['ndcg@10'].mean():.3f} | {m['recall@10'].mean():.3f} | {m['mrr@10'].mean():.3f}"
                     f" | {s:.1f} |")
    d, lo, hi = bootstrap_difference(lance_m["ndcg@10"], bm25s_m["ndcg@10"], seed=args.seed)
    lines += ["", "Seconds: all queries, each row's index built inside its own timing (LanceDB's on a copy of the "
              "store's chunks).", "",
              f"LanceDB FTS - bm25s, nDCG@10: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired bootstrap, 95%)."]
    d2, lo2, hi2 = bootstrap_difference(lance_m["ndcg@10"], chunk_m["ndcg@10"], seed=args.seed)
    lines.append(f"LanceDB FTS - bm25s over chunks, nDCG@10: {d2:+.3f} [{lo2:+.3f}, {hi2:+.3f}].")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0 if np.isfinite(d) else 1


if __name__ == "__main__":
    sys.exit(main())
