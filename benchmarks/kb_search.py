"""Knowledge-base speed: search latency over a 100k-chunk store, query encoding included, and where indexing time
goes. Not a test; writes Markdown and JSON to benchmarks/results/.

    python benchmarks/kb_search.py [--chunks 100000] [--queries 200] [--source-store DIR] [--beir DIR]

The 100k-chunk store: no 100k-chunk corpus is embedded on this machine (MiniLM embeds ~10 chunks/s on 2 cores), so
the store is made from the real chunk vectors of a gcloud-man index (``--source-store``), each repeated with small
Gaussian noise (sigma 0.02 per coordinate before renormalizing) into documents of the same lengths, until
``--chunks`` chunks; each copy keeps its chunks' real text, so the full-text index (BM25, for ``bm25`` and the
hybrids) holds 100k real chunk texts too. The queries are the real gcloud-man queries, encoded by the real model on
every search. Search latency = one ``KnowledgeBase.search`` call (encode the query, score every document, top 10),
timed per query.

Indexing: a real ``KnowledgeBase.index`` run on ``--index-docs`` gcloud-man documents into a fresh store;
``IndexReport`` splits its wall time into the encoder's share and the rest (chunking, hashing, LanceDB writes,
compaction).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnpool.kb import KnowledgeBase, read_documents  # noqa: E402
from attnpool.kb.evaluate import environment  # noqa: E402
from attnpool.kb.methods import attention_scores, max_scores  # noqa: E402
from attnpool.kb.sources import read_beir_queries  # noqa: E402
from attnpool.kb.store import ChunkRows, LanceStore  # noqa: E402


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def build_synthetic_store(source: KnowledgeBase, path: Path, num_chunks: int, seed: int = 0) -> LanceStore:
    chunks = source.chunk_matrix()
    lengths = chunks.lengths.tolist()
    rng = np.random.default_rng(seed)
    meta = dict(source.store().meta)
    meta.pop("format", None)
    store = LanceStore(path, meta)
    base = chunks.vectors.numpy()
    rows = source.store().chunk_texts_of(source.doc_ids)
    texts = [[r["text"] for r in rows.get(d, [])] for d in source.doc_ids]
    batch, total, copy = [], 0, 0
    while total < num_chunks:
        for d, n in enumerate(lengths):
            if total >= num_chunks:
                break
            n = min(n, num_chunks - total)
            if n == 0:
                continue
            a = int(chunks.offsets[d])
            v = base[a:a + n] + 0.02 * rng.standard_normal((n, base.shape[1])).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            batch.append(ChunkRows(f"copy{copy}-{source.doc_ids[d]}", "h", "", "", texts[d][:n], [0] * n, [0] * n,
                                   [0] * n, v.astype(np.float32)))
            total += n
            if len(batch) == 2000:
                store.write(batch)
                batch = []
        copy += 1
    store.write(batch)
    store.optimize()
    return store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--source-store", default="/tmp/kb-gcloud", help="a gcloud-man store built by `attnpool kb index`")
    ap.add_argument("--beir", default=str(ROOT.parent / "shared" / "datasets" / "gcloud-man"))
    ap.add_argument("--index-docs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = KnowledgeBase(args.source_store)
    queries = list(read_beir_queries(Path(args.beir) / "queries.jsonl").values())[: args.queries]
    results: dict[str, object] = {"environment": environment(), "command": "python benchmarks/kb_search.py " +
                                  " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_synthetic_store(source, Path(tmp) / "kb", args.chunks)
        results["build_store_s"] = time.perf_counter() - t
        kb = KnowledgeBase(Path(tmp) / "kb")
        t = time.perf_counter()
        cm = kb.chunk_matrix()
        results["load_s"] = time.perf_counter() - t
        results["num_chunks"], results["num_docs"] = kb.num_chunks, kb.num_documents
        kb.search(queries[0], method="hybrid-score")  # loads the model and the full-text index, warms up
        search: dict[str, dict[str, float]] = {}
        for method in ("hybrid-score", "hybrid", "bm25", "attention", "max", "mean", "first"):
            lat = []
            for q in queries:
                t = time.perf_counter()
                kb.search(q, method=method, k=10)
                lat.append(1000 * (time.perf_counter() - t))
            search[method] = {"p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "max_ms": max(lat)}
        results["search"] = search
        # the parts of one query, timed apart
        qv = kb.encode_queries(queries[:1])
        enc, att, mx, dot, lex = [], [], [], [], []
        for q in queries:
            t = time.perf_counter()
            kb.lexical_chunk_scores([q])
            lex.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            qv = kb.encode_queries([q])
            enc.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            attention_scores(cm, qv, kb.temperature())
            att.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            max_scores(cm, qv)
            mx.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            cm.vectors @ qv[0]
            dot.append(1000 * (time.perf_counter() - t))
        floor = []
        for _ in range(50):
            t = time.perf_counter()
            cm.vectors.sum()
            floor.append(1000 * (time.perf_counter() - t))
        results["parts_ms"] = {
            "encode_query": {"p50": percentile(enc, 50), "p95": percentile(enc, 95)},
            "bm25_full_text_index": {"p50": percentile(lex, 50), "p95": percentile(lex, 95)},
            "attention_pooling_all_docs": {"p50": percentile(att, 50), "p95": percentile(att, 95)},
            "maxsim_all_docs": {"p50": percentile(mx, 50), "p95": percentile(mx, 95)},
            "chunk_dot_products": {"p50": percentile(dot, 50), "p95": percentile(dot, 95)},
            "floor_one_read_x_sum": {"p50": statistics.median(floor)},
        }
    # indexing: where the time goes
    docs = read_documents([args.beir])[: args.index_docs]
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase(Path(tmp) / "kb")
        kb.encoder  # noqa: B018 - model loading is not indexing
        report = kb.index(docs, progress=False)
        results["index"] = {"docs": len(docs), "chunks": report.chunks, "seconds": report.seconds,
                            "encode_seconds": report.encode_seconds,
                            "outside_encoder_fraction": report.outside_encoder_fraction}
    env = results["environment"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kb-search-{env['date']}"  # type: ignore[index]
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# Knowledge-base search and indexing, {env['date']}", "",  # type: ignore[index]
             f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, {args.threads} threads. "  # type: ignore[index]
             f"Command: `{results['command']}`.", "",
             f"Store: {results['num_chunks']} chunks in {results['num_docs']} documents (synthetic from gcloud-man's "
             f"real chunk vectors, see the script's docstring); loaded into memory in {results['load_s']:.2f} s.", "",
             "| method | p50 ms | p95 ms | max ms |", "|---|---|---|---|"]
    for m, v in search.items():
        lines.append(f"| {m} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['max_ms']:.1f} |")
    lines += ["", "One query's parts (ms):", "", "| part | p50 | p95 |", "|---|---|---|"]
    for part, v in results["parts_ms"].items():  # type: ignore[attr-defined]
        lines.append(f"| {part} | {v['p50']:.2f} | {v.get('p95', float('nan')):.2f} |")
    ix = results["index"]
    lines += ["", f"Indexing {ix['docs']} gcloud-man documents ({ix['chunks']} chunks): {ix['seconds']:.1f} s, "  # type: ignore[index]
              f"{ix['encode_seconds']:.1f} s in the encoder, {100 * ix['outside_encoder_fraction']:.1f}% outside it."]  # type: ignore[index]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
