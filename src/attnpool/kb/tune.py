"""``attnpool kb tune``: adapt a knowledge base's pooling to its corpus without labels.

Pseudo-queries come from the corpus itself, by the inverse cloze task (Lee et al. 2019, "Latent Retrieval for Weakly
Supervised Open Domain QA"): one sentence is taken out of one chunk of a document and becomes a query whose positive is
that document. The sentence is taken *out*: its chunk is dropped from the document's chunk vectors and the sentence
from its BM25 text, for every document, so a pseudo-query never finds its own words. The encoder stays frozen and
the stored chunk vectors are reused; only the pseudo-queries are encoded.

What is learned, each on the pseudo-queries only (never on evaluation queries):

* the ``attention`` temperature ``T`` (a grid, by nDCG@10);
* the ``hybrid-score`` fusion weight ``w`` (a grid, by nDCG@10);
* the ``learned`` and ``multi`` heads (:mod:`attnpool.kb.heads`), InfoNCE with in-batch negatives plus each
  positive's nearest document (by mean chunk vector) as a hard negative.

The results are saved beside the index (``settings.json``, ``heads/``), and search uses them from then on.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnpool.kb import methods as M
from attnpool.kb.evaluate import FUSION_GRID, TEMPERATURE_GRID, metrics_for_ranking
from attnpool.kb.heads import build_head, save_head, train_head
from attnpool.kb.knowledge_base import KnowledgeBase
from attnpool.kb.lexical import LexicalIndex

__all__ = ["PseudoQueries", "TuneReport", "make_pseudo_queries", "tune"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def _candidate_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    out = []
    for part in _SENTENCE.split(text):
        s = " ".join(part.split())
        words = s.split()
        if not (min_words <= len(words) <= max_words):
            continue
        alpha = len(_WORD.findall(s))
        if alpha < 0.7 * len(words) or s.startswith(("$", "--", "-")):  # skip command lines and flag lists
            continue
        out.append(s)
    return out


@dataclass
class PseudoQueries:
    texts: list[str]
    doc_index: list[int]  # the positive document of each query (kb.doc_ids order)
    chunk_index: list[int]  # the chunk each query was taken from (dropped from its document)
    doc_texts: list[str]  # every document's text with the query sentences removed


def make_pseudo_queries(kb: KnowledgeBase, *, max_queries: int = 1000, min_words: int = 5, max_words: int = 24,
                        seed: int = 0) -> PseudoQueries:
    """One inverse-cloze pseudo-query for each of up to ``max_queries`` documents with at least two chunks."""
    rng = np.random.default_rng(seed)
    store = kb.store()
    chunks = kb.chunk_matrix()
    lengths = chunks.lengths.tolist()
    eligible = [d for d, n in enumerate(lengths) if n >= 2]
    rng.shuffle(eligible)
    texts, docs, source_chunks = [], [], []
    removed: dict[int, str] = {}
    for d in eligible:
        if len(texts) >= max_queries:
            break
        rows = store.chunk_texts(kb.doc_ids[d])
        order = rng.permutation(len(rows))
        for j in order:
            cands = _candidate_sentences(rows[j]["text"], min_words, max_words)
            if cands:
                s = cands[int(rng.integers(len(cands)))]
                texts.append(s)
                docs.append(d)
                source_chunks.append(int(rows[j]["chunk_index"]))
                removed[d] = s
                break
    full = store.document_texts(kb.doc_ids)
    doc_texts = []
    for d, t in enumerate(full):
        s = removed.get(d)
        doc_texts.append(" ".join(t.split()).replace(s, " ") if s else t)
    return PseudoQueries(texts, docs, source_chunks, doc_texts)


def _without_source_chunks(chunks: M.ChunkMatrix, pq: PseudoQueries) -> M.ChunkMatrix:
    keep = torch.ones(chunks.vectors.shape[0], dtype=torch.bool)
    for d, j in zip(pq.doc_index, pq.chunk_index):
        keep[int(chunks.offsets[d]) + j] = False
    doc = chunks.doc_of_chunk()[keep]
    counts = torch.bincount(doc, minlength=chunks.num_docs)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return M.ChunkMatrix(chunks.vectors[keep], offsets)


def _ndcg(scores: torch.Tensor, positives: list[int]) -> float:
    top = torch.topk(scores, min(10, scores.shape[1]), dim=1).indices.tolist()
    return float(np.mean([metrics_for_ranking([str(i) for i in t], {str(p): 1})["ndcg@10"]
                          for t, p in zip(top, positives)]))


@dataclass
class TuneReport:
    num_pseudo_queries: int
    temperature: float
    fusion_weight: float
    curve: dict[str, float] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        heads = ", ".join(f"{k} loss {v['first_loss']:.2f} -> {v['last_loss']:.2f}" for k, v in self.heads.items())
        return (f"{self.num_pseudo_queries} pseudo-queries; T = {self.temperature}, w = {self.fusion_weight}; "
                f"{heads}; {self.seconds:.0f} s")


def tune(kb: KnowledgeBase, *, max_queries: int = 1000, head_steps: int = 400, heads: tuple[str, ...] = ("learned",
         "multi"), seed: int = 0, save: bool = True, progress: bool = True) -> TuneReport:
    """Learn the temperature, the fusion weight and the heads from pseudo-queries; save them beside the index."""
    start = time.perf_counter()
    steps_total = 3 + len(heads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_total, desc="tuning", unit="step")

    def advance(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    pq = make_pseudo_queries(kb, max_queries=max_queries, seed=seed)
    if len(pq.texts) < 8:
        raise ValueError(f"the corpus: expected documents of at least two chunks with prose sentences to make "
                         f"pseudo-queries from, got {len(pq.texts)} pseudo-queries")
    queries = kb.encode_queries(pq.texts)
    advance("pseudo-queries encoded")
    chunks = _without_source_chunks(kb.chunk_matrix(), pq)
    lexical = torch.from_numpy(LexicalIndex.build(pq.doc_texts).scores(pq.texts))
    curve: dict[str, float] = {}
    with torch.inference_mode():
        dense_by_t = {t: M.attention_scores(chunks, queries, t) for t in TEMPERATURE_GRID}
        for t, s in dense_by_t.items():
            curve[f"T={t}"] = _ndcg(s, pq.doc_index)
        temperature = float(max(TEMPERATURE_GRID, key=lambda t: curve[f"T={t}"]))
        advance(f"T = {temperature}")
        for w in FUSION_GRID:
            s = M.zscore_fusion([lexical, dense_by_t[temperature]], [w, 1 - w])
            curve[f"w={w}"] = _ndcg(s, pq.doc_index)
        fusion_weight = float(max(FUSION_GRID, key=lambda w: curve[f"w={w}"]))
        curve["bm25"] = _ndcg(lexical, pq.doc_index)
        curve["mean"] = _ndcg(M.static_scores(M.mean_vectors(chunks), queries), pq.doc_index)
        advance(f"w = {fusion_weight}")
    report = TuneReport(len(pq.texts), temperature, fusion_weight, curve, examples=pq.texts[:5])
    positives = torch.tensor(pq.doc_index)
    for kind in heads:
        head = build_head(kind, queries.shape[1], seed=seed)
        result = train_head(head, chunks, queries, positives, steps=head_steps, seed=seed, progress=progress,
                            desc=f"training {kind}", hard_negatives=True)
        report.heads[kind] = {"steps": result.steps, "first_loss": result.losses[0],
                              "last_loss": float(np.mean(result.losses[-20:])), "seconds": result.seconds}
        if save:
            save_head(head, kb.head_path(kind), model_id=kb.store().meta["model_id"], seed=seed, steps=head_steps,
                      trained_on="pseudo-queries (inverse cloze)")
        advance(f"{kind} trained")
    if save:
        kb.save_settings(attention_temperature=temperature, fusion_weight=fusion_weight, tuned=True)
        kb._loaded()["static"].clear()
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report
