"""``attnpool kb tune``: adapt a knowledge base's pooling to its corpus without labels.

Pseudo-queries come from the corpus itself. Each is one sentence of a document, and its positive is that document:

* ``lead`` (the default): the document's first prose sentence, the one that usually says what the page is about,
  which is what real questions paraphrase;
* ``cloze``: a random prose sentence of a random chunk, the inverse cloze task (Lee et al. 2019, "Latent Retrieval
  for Weakly Supervised Open Domain QA").

The sentence is taken *out* of its document: its chunk is encoded again without it, and its words leave that chunk's
text in the BM25 index built for tuning, so a pseudo-query never finds its own words. The encoder stays frozen and
the other stored chunk vectors are reused; only the pseudo-queries and their source chunks are encoded.

What is learned, on the pseudo-queries only (never on evaluation queries), each by nDCG@10 on a grid:

* the ``attention`` temperature ``T`` and first-chunk prior ``beta`` (:func:`attnpool.kb.methods.attention_scores`);
* the ``hybrid-score`` fusion weight ``w``, at most ``max_fusion_weight``: pseudo-queries share exact words with
  their pages more than real questions do, so left alone the weight drifts to pure BM25;
* optionally (``heads``) the ``learned`` and ``multi`` heads (:mod:`attnpool.kb.heads`), InfoNCE with in-batch
  negatives plus each positive's nearest document as a hard negative.

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
from attnpool.kb.evaluate import FIRST_BIAS_GRID, FUSION_GRID, TEMPERATURE_GRID, metrics_for_ranking
from attnpool.kb.heads import build_head, save_head, train_head
from attnpool.kb.knowledge_base import KnowledgeBase
from attnpool.kb.lexical import ChunkLexicalIndex, document_scores

__all__ = ["KINDS", "PseudoQueries", "TuneReport", "make_pseudo_queries", "tune"]

KINDS = ("lead", "cloze")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_CODE = re.compile(r"[\[\]{}|<>=$`]| --|\w\(|^\w+\.\w+")  # synopses, flags, calls, dotted names: not prose
_HEADING = re.compile(r"^(?:[A-Z][A-Z0-9_ -]{2,}\s+)+")  # "DESCRIPTION ", "NAME ": section titles of man pages


def _candidate_sentences(text: str, min_words: int, max_words: int) -> list[tuple[str, str]]:
    """Prose sentences of ``text`` in order, as ``(query, raw)``: ``raw`` is the span as it stands in ``text``,
    ``query`` the same with whitespace collapsed and a leading section title removed. Command lines, flag lists
    and fragments that are mostly not words are skipped."""
    out = []
    for raw in _SENTENCE.split(text):
        s = _HEADING.sub("", " ".join(raw.split()))
        words = s.split()
        if not (min_words <= len(words) <= max_words):
            continue
        alpha = len(_WORD.findall(s))
        if alpha < 0.7 * len(words) or s.startswith(("$", "--", "-", ">>>")) or _CODE.search(s):
            continue
        out.append((s, raw.strip()))
    return out


@dataclass
class PseudoQueries:
    texts: list[str]
    doc_index: list[int]  # the positive document of each query (kb.doc_ids order)
    chunk_index: list[int]  # the chunk each query was taken from, within its document
    chunk_texts: list[str]  # the source chunk's text without the query sentence (to encode in its place)
    kind: str = "lead"


def make_pseudo_queries(kb: KnowledgeBase, *, kind: str = "lead", max_queries: int = 500, min_words: int = 5,
                        max_words: int = 30, seed: int = 0) -> PseudoQueries:
    """One pseudo-query (a ``lead`` or ``cloze`` sentence, see the module) for each of up to ``max_queries``
    documents, drawn in a seeded order."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(kb.chunk_matrix().num_docs).tolist()
    store = kb.store()
    pq = PseudoQueries([], [], [], [], kind)
    for start in range(0, len(order), 256):
        if len(pq.texts) >= max_queries:
            break
        batch = [kb.doc_ids[d] for d in order[start:start + 256]]
        rows_of = store.chunk_texts_of(batch)
        for d, doc_id in zip(order[start:start + 256], batch):
            if len(pq.texts) >= max_queries:
                break
            rows = rows_of.get(doc_id, [])
            chunk_order = range(len(rows)) if kind == "lead" else rng.permutation(len(rows)).tolist()
            for j in chunk_order:
                cands = _candidate_sentences(rows[j]["text"], min_words, max_words)
                if not cands:
                    continue
                query, raw = cands[0] if kind == "lead" else cands[int(rng.integers(len(cands)))]
                pq.texts.append(query)
                pq.doc_index.append(d)
                pq.chunk_index.append(int(rows[j]["chunk_index"]))
                pq.chunk_texts.append(rows[j]["text"].replace(raw, " ", 1))
                break
    return pq


def _with_source_chunks_replaced(kb: KnowledgeBase, pq: PseudoQueries) -> tuple[M.ChunkMatrix, list[str]]:
    """The chunk vectors and texts with each source chunk encoded again without its query sentence."""
    chunks = kb.chunk_matrix()
    vectors = chunks.vectors.clone()
    rows = [int(chunks.offsets[d]) + j for d, j in zip(pq.doc_index, pq.chunk_index)]
    if rows:
        vectors[torch.tensor(rows)] = torch.from_numpy(kb.encoder.encode(pq.chunk_texts))
    by_doc = kb.store().chunk_texts_of(kb.doc_ids)
    texts = [r["text"] for d in kb.doc_ids for r in by_doc.get(d, [])]
    for r, t in zip(rows, pq.chunk_texts):
        texts[r] = t
    return M.ChunkMatrix(vectors, chunks.offsets), texts


def _ndcg(scores: torch.Tensor, positives: list[int]) -> float:
    top = torch.topk(scores, min(10, scores.shape[1]), dim=1).indices.tolist()
    return float(np.mean([metrics_for_ranking([str(i) for i in t], {str(p): 1})["ndcg@10"]
                          for t, p in zip(top, positives)]))


@dataclass
class TuneReport:
    num_pseudo_queries: int
    kind: str
    temperature: float
    first_bias: float
    fusion_weight: float
    curve: dict[str, float] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        heads = "".join(f"; {k} loss {v['first_loss']:.2f} -> {v['last_loss']:.2f}" for k, v in self.heads.items())
        return (f"{self.num_pseudo_queries} {self.kind} pseudo-queries; T = {self.temperature}, "
                f"beta = {self.first_bias}, w = {self.fusion_weight}{heads}; {self.seconds:.0f} s")


def tune(kb: KnowledgeBase, *, kind: str = "lead", max_queries: int = 500, heads: tuple[str, ...] = (),
         head_steps: int = 100, max_fusion_weight: float = 0.7, seed: int = 0, save: bool = True,
         progress: bool = True) -> TuneReport:
    """Learn ``T``, ``beta``, ``w`` (and ``heads``) from pseudo-queries; save them beside the index."""
    if not 0.0 <= max_fusion_weight <= 1.0:
        raise ValueError(f"max_fusion_weight: expected a number in [0, 1], got {max_fusion_weight}")
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=4 + len(heads), desc="tuning", unit="step")

    def advance(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    pq = make_pseudo_queries(kb, kind=kind, max_queries=max_queries, seed=seed)
    if len(pq.texts) < 8:
        raise ValueError(f"the corpus: expected documents with prose sentences to make pseudo-queries from, got "
                         f"{len(pq.texts)} pseudo-queries")
    queries = kb.encode_queries(pq.texts)  # checks the encoder against the index first
    chunks, texts = _with_source_chunks_replaced(kb, pq)
    advance("pseudo-queries encoded")
    lexical = document_scores(ChunkLexicalIndex.from_texts(texts).chunk_scores(pq.texts), chunks.offsets)
    advance("BM25 scored")
    curve: dict[str, float] = {}
    with torch.inference_mode():
        best, dense = -1.0, None
        temperature, first_bias = TEMPERATURE_GRID[0], FIRST_BIAS_GRID[0]
        for t in TEMPERATURE_GRID:
            for b in FIRST_BIAS_GRID:
                s = M.attention_scores(chunks, queries, t, first_bias=b)
                curve[f"T={t},beta={b}"] = score = _ndcg(s, pq.doc_index)
                if score > best:
                    best, dense, temperature, first_bias = score, s, t, b
        assert dense is not None
        advance(f"T = {temperature}, beta = {first_bias}")
        grid = [w for w in FUSION_GRID if w <= max_fusion_weight]
        for w in grid:
            curve[f"w={w}"] = _ndcg(M.zscore_fusion([lexical, dense], [w, 1 - w]), pq.doc_index)
        fusion_weight = max(grid, key=lambda w: curve[f"w={w}"])
        curve["bm25"] = _ndcg(lexical, pq.doc_index)
        curve["first"] = _ndcg(M.static_scores(M.first_vectors(chunks), queries), pq.doc_index)
        curve["mean"] = _ndcg(M.static_scores(M.mean_vectors(chunks), queries), pq.doc_index)
        advance(f"w = {fusion_weight}")
    report = TuneReport(len(pq.texts), kind, float(temperature), float(first_bias), float(fusion_weight), curve,
                        examples=pq.texts[:5])
    positives = torch.tensor(pq.doc_index)
    for head_kind in heads:
        head = build_head(head_kind, queries.shape[1], seed=seed)
        result = train_head(head, chunks, queries, positives, steps=head_steps, seed=seed, progress=progress,
                            desc=f"training {head_kind}", hard_negatives=True)
        report.heads[head_kind] = {"steps": result.steps, "first_loss": result.losses[0],
                                   "last_loss": float(np.mean(result.losses[-20:])), "seconds": result.seconds}
        if save:
            save_head(head, kb.head_path(head_kind), model_id=kb.store().meta["model_id"], seed=seed,
                      steps=head_steps, trained_on=f"pseudo-queries ({kind})")
        advance(f"{head_kind} trained")
    if save:
        kb.save_settings(attention_temperature=report.temperature, first_bias=report.first_bias,
                         fusion_weight=report.fusion_weight, tuned=True, tuned_on=f"{len(pq.texts)} {kind} "
                         "pseudo-queries")
        kb._loaded()["static"].clear()
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report
