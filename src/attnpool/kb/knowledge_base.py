"""The knowledge base: documents chunked, embedded and stored; searched by any document pooling method."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnpool.kb import methods as M
from attnpool.kb.heads import load_head
from attnpool.kb.sources import Document, InputError, content_hash
from attnpool.kb.store import ChunkRows, LanceStore, StoreError, write_json_atomic
from attnpool.text.chunking import chunk_text

__all__ = ["ChunkHit", "Hit", "IndexReport", "KnowledgeBase"]

# The zero-shot settings of a knowledge base that was never tuned: the grid point with the best mean nDCG@10 over the
# tune halves of the two development sets (gcloud-man, pydoc-stdlib; experiments/README.md), checked on their test
# halves and on a third set made afterwards (man pages), which nothing was chosen on.
DEFAULT_TEMPERATURE = 0.3
DEFAULT_FIRST_BIAS = 3.0
DEFAULT_FUSION_WEIGHT = 0.2
SETTINGS_FILE = "settings.json"


@dataclass
class IndexReport:
    """What an indexing run did, and where its time went."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    orphans_removed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0

    @property
    def outside_encoder_fraction(self) -> float:
        return 1.0 - self.encode_seconds / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.deleted} deleted "
                f"({self.chunks} chunks embedded) in {self.seconds:.1f} s, "
                f"{100 * self.outside_encoder_fraction:.1f}% of it outside the encoder")


@dataclass
class ChunkHit:
    index: int
    weight: float
    similarity: float
    start: int
    end: int
    text: str = ""
    lexical: float | None = None  # the chunk's BM25 score, for the methods that read the query's words


@dataclass
class Hit:
    doc_id: str
    score: float
    title: str
    chunks: list[ChunkHit] = field(default_factory=list)
    #: with ``explain``, the document's score and rank (1 = best) under each signal a hybrid fuses
    signals: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "score": self.score, "title": self.title,
                "chunks": [vars(c) for c in self.chunks], "signals": self.signals}


class KnowledgeBase:
    """Documents pooled from their chunks, searched with a query-conditioned or static document representation.

    Args:
        path: the store's directory (created on first :meth:`index`).
        encoder: an :class:`attnpool.text.Encoder`, or a model directory, or ``None`` for the default model.
        max_tokens, overlap: chunking (see :func:`attnpool.text.chunk_text`); fixed when the store is created.

    The encoder is built on first use, so opening a knowledge base to inspect it loads no model.
    """

    def __init__(self, path: str | os.PathLike[str], encoder: Any = None, *, max_tokens: int = 256,
                 overlap: int = 32) -> None:
        self.path = Path(path)
        self._encoder = encoder
        self.max_tokens, self.overlap = max_tokens, overlap
        self._store: LanceStore | None = None
        self._cache: dict[str, Any] | None = None
        self._settings: dict[str, Any] | None = None

    # -- parts -----------------------------------------------------------------------------------------------------

    @property
    def encoder(self) -> Any:
        if self._encoder is None or isinstance(self._encoder, (str, os.PathLike)):
            from attnpool.text.encoder import Encoder

            self._encoder = Encoder(self._encoder)
        return self._encoder

    def _settings_meta(self) -> dict[str, Any]:
        enc = self.encoder
        return {"model_id": enc.model_id, "model_path": str(enc.path), "dim": enc.dim, "max_tokens": self.max_tokens,
                "overlap": self.overlap}

    def store(self, *, create: bool = False) -> LanceStore:
        if self._store is None:
            if create:
                self._store = LanceStore(self.path, self._settings_meta())
            else:
                self._store = LanceStore(self.path, create=False)
                if self._encoder is not None:
                    enc = self.encoder
                    if (self._store.meta["dim"], self._store.meta["model_id"]) != (enc.dim, enc.model_id):
                        raise StoreError(f"{self.path}: indexed with model {self._store.meta['model_id']} "
                                         f"({self._store.meta['dim']}-d); the encoder given is {enc.model_id} "
                                         f"({enc.dim}-d)")
        return self._store

    def _default_encoder_from_store(self) -> None:
        if self._encoder is None:
            path = self.store().meta.get("model_path")
            self._encoder = path if path and Path(path).is_dir() else None

    @property
    def settings(self) -> dict[str, Any]:
        """What tuning saved beside the index (temperature, fusion weight); read once, then kept."""
        if self._settings is None:
            p = self.path / SETTINGS_FILE
            import json

            self._settings = dict(json.loads(p.read_text(encoding="utf-8"))) if p.is_file() else {}
        return dict(self._settings)

    def save_settings(self, **values: Any) -> None:
        merged = {**self.settings, **values}
        write_json_atomic(self.path / SETTINGS_FILE, merged)
        self._settings = merged

    # -- indexing --------------------------------------------------------------------------------------------------

    def index(self, docs: Sequence[Document], *, delete_missing: bool = False, batch_docs: int = 64,
              progress: bool = True) -> IndexReport:
        """Add new documents, re-embed changed ones (by content hash) and skip unchanged ones.

        ``delete_missing`` deletes stored documents that ``docs`` does not contain. Safe to kill at any point: the
        store stays consistent and running the same call again finishes the job (see :mod:`attnpool.kb.store`).
        """
        if not docs:
            raise InputError("docs: expected at least one document, got none")
        start = time.perf_counter()
        report = IndexReport()
        store = self.store(create=True)
        settings = f"{store.meta['model_id']}|{self.max_tokens}|{self.overlap}"
        report.orphans_removed = store.remove_orphans()
        existing = store.document_hashes()
        todo: list[tuple[Document, str]] = []
        for doc in docs:
            h = content_hash(doc, settings)
            if existing.get(doc.doc_id) == h:
                report.unchanged += 1
            else:
                todo.append((doc, h))
                if doc.doc_id in existing:
                    report.updated += 1
                else:
                    report.added += 1
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="indexing", unit="doc")
        enc = self.encoder
        for i in range(0, len(todo), batch_docs):
            part = todo[i:i + batch_docs]
            chunked = [chunk_text(d.full_text, enc.tokenizer, max_tokens=self.max_tokens, overlap=self.overlap)
                       for d, _ in part]
            texts = [c.text for cs in chunked for c in cs]
            t0 = time.perf_counter()
            vectors = enc.encode(texts)
            report.encode_seconds += time.perf_counter() - t0
            rows, at = [], 0
            for (doc, h), cs in zip(part, chunked):
                rows.append(ChunkRows(doc.doc_id, h, doc.title, doc.source, [c.text for c in cs],
                                      [c.start for c in cs], [c.end for c in cs], [c.num_tokens for c in cs],
                                      vectors[at:at + len(cs)]))
                at += len(cs)
            store.write(rows)
            report.chunks += len(texts)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        if delete_missing:
            report.deleted = store.delete(set(existing) - {d.doc_id for d in docs})
        if todo or report.deleted or report.orphans_removed:
            store.optimize()
        self._cache = None
        report.seconds = time.perf_counter() - start
        return report

    def delete(self, doc_ids: Sequence[str]) -> int:
        n = self.store().delete(doc_ids)
        self._cache = None
        return n

    # -- searching -------------------------------------------------------------------------------------------------

    def _loaded(self) -> dict[str, Any]:
        if self._cache is None:
            stored = self.store().load()
            chunks = M.ChunkMatrix(torch.from_numpy(stored.vectors), torch.from_numpy(stored.offsets))
            self._cache = {"stored": stored, "chunks": chunks, "static": {}}
        return self._cache

    @property
    def num_documents(self) -> int:
        return len(self._loaded()["stored"].doc_ids)

    @property
    def num_chunks(self) -> int:
        return self._loaded()["stored"].num_chunks

    def chunk_matrix(self) -> M.ChunkMatrix:
        return self._loaded()["chunks"]  # type: ignore[no-any-return]

    @property
    def doc_ids(self) -> list[str]:
        return self._loaded()["stored"].doc_ids  # type: ignore[no-any-return]

    def head_path(self, kind: str) -> Path:
        return self.path / "heads" / kind

    def _static_vectors(self, method: str) -> Tensor:
        cache = self._loaded()["static"]
        if method not in cache:
            chunks = self.chunk_matrix()
            if method == "mean":
                cache[method] = M.mean_vectors(chunks)
            elif method == "first":
                cache[method] = M.first_vectors(chunks)
            else:
                path = self.head_path(method)
                if not (path / "config.json").is_file():
                    raise StoreError(f"method {method!r}: no trained head at {path}; train one with "
                                     f"`attnpool kb eval BEIR_DIR --store {self.path} --save-heads` (or use another "
                                     f"method)")
                head, meta = load_head(path)
                if meta.get("model_id") != self.store().meta["model_id"]:
                    raise StoreError(f"{path}: trained on model {meta.get('model_id')}, the index holds "
                                     f"{self.store().meta['model_id']}")
                with torch.inference_mode():
                    cache[method] = _head_vectors(head, chunks)
            # unit norm once here, not on every query
            cache[method] = torch.nn.functional.normalize(cache[method], dim=-1, eps=1e-12).contiguous()
        return cache[method]  # type: ignore[no-any-return]

    def temperature(self) -> float:
        return float(self.settings.get("attention_temperature", DEFAULT_TEMPERATURE))

    def first_bias(self) -> float:
        return float(self.settings.get("first_bias", DEFAULT_FIRST_BIAS))

    def lexical(self) -> Any:
        """The store's full-text index, its hits mapped to the loaded chunk rows
        (:class:`attnpool.kb.lexical.ChunkLexicalIndex`)."""
        cache = self._loaded()
        if "lexical" not in cache:
            from attnpool.kb.lexical import ChunkLexicalIndex

            stored = cache["stored"]
            cache["lexical"] = ChunkLexicalIndex.for_store(self.store(), stored.doc_ids, stored.doc_hashes,
                                                           stored.offsets.tolist())
        return cache["lexical"]

    def lexical_chunk_scores(self, texts: Sequence[str]) -> Tensor:
        """``[Q, N]`` BM25 score of every chunk for each query text (0 where none of its words occur)."""
        return self.lexical().chunk_scores(list(texts))  # type: ignore[no-any-return]

    def fusion_weight(self) -> float:
        return float(self.settings.get("fusion_weight", DEFAULT_FUSION_WEIGHT))

    def score(self, queries: Tensor, method: str = "attention", *, texts: Sequence[str] | None = None,
              temperature: float | None = None, fusion_weight: float | None = None,
              first_bias: float | None = None) -> Tensor:
        """``[Q, B]`` scores of every document (in :attr:`doc_ids` order) for unit-norm query vectors ``[Q, D]``.

        ``bm25`` and the hybrids also need the queries' ``texts``. ``hybrid`` is reciprocal-rank fusion
        (``1/(60 + rank)`` summed) of BM25 and ``attention``; ``hybrid-score`` fuses their scores after
        standardizing each over the documents (z-scores), as ``w * z_bm25 + (1 - w) * z_attention``.
        ``temperature``, ``fusion_weight`` and ``first_bias`` override the store's settings.
        """
        signals = self.signals(queries, method, texts=texts, temperature=temperature, first_bias=first_bias)
        return self.fuse(signals, method, fusion_weight=fusion_weight)

    def fuse(self, signals: dict[str, Tensor], method: str, *, fusion_weight: float | None = None) -> Tensor:
        """The scores of ``method`` from its :meth:`signals`."""
        if method == "hybrid":
            return M.reciprocal_rank_fusion([signals["bm25"], signals["attention"]])
        if method == "hybrid-score":
            w = self.fusion_weight() if fusion_weight is None else fusion_weight
            return M.zscore_fusion([signals["bm25"], signals["attention"]], [w, 1.0 - w])
        return signals[method]

    def signals(self, queries: Tensor, method: str, *, texts: Sequence[str] | None = None,
                temperature: float | None = None, first_bias: float | None = None,
                lexical_chunk_scores: Tensor | None = None) -> dict[str, Tensor]:
        """The ``[Q, B]`` document scores that ``method`` reads: its own, or for a hybrid ``bm25`` and
        ``attention``. ``lexical_chunk_scores`` (``[Q, N]``, from :meth:`lexical_chunk_scores`) saves querying the
        full-text index again."""
        if method not in M.METHODS:
            raise ValueError(f"method: expected one of {', '.join(M.METHODS)}, got {method!r}")
        chunks = self.chunk_matrix()
        dim = chunks.vectors.shape[1]
        if queries.dim() != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries: expected [Q, {dim}], got {list(queries.shape)}")
        if method in M.LEXICAL_METHODS and (texts is None or len(texts) != queries.shape[0]):
            raise ValueError(f"texts: method {method!r} needs the text of each of the {queries.shape[0]} queries")
        t = self.temperature() if temperature is None else temperature
        beta = self.first_bias() if first_bias is None else first_bias
        with torch.inference_mode():
            if method == "first":
                return {method: M.static_scores(self._static_vectors("first"), queries, normalized=True).masked_fill(
                    chunks.lengths == 0, float("-inf"))}
            if method == "max":
                return {method: M.max_scores(chunks, queries)}
            if method == "attention":
                return {method: M.attention_scores(chunks, queries, t, first_bias=beta)}
            if method in M.LEXICAL_METHODS:
                from attnpool.kb.lexical import document_scores

                if lexical_chunk_scores is None:
                    lexical_chunk_scores = self.lexical_chunk_scores(list(texts or ()))
                out = {"bm25": document_scores(lexical_chunk_scores, chunks.offsets)}
                if method != "bm25":
                    out["attention"] = M.attention_scores(chunks, queries, t, first_bias=beta)
                return out
            return {method: M.static_scores(self._static_vectors(method), queries, normalized=True)}

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        self._default_encoder_from_store()
        self.store()  # checks the encoder against the index
        return torch.from_numpy(self.encoder.encode(list(texts)))

    def search(self, query: str | Tensor, *, method: str = "attention", k: int = 10, explain: bool = False,
               temperature: float | None = None, top_chunks: int = 3) -> list[Hit]:
        """The ``k`` best documents for ``query`` (text, or a unit-norm vector ``[D]``).

        With ``explain``, each hit carries its chunks' attention weights (``softmax(s / T + beta [first])`` over the
        document's chunks, the weights the ``attention`` method pooled with) and the text of its ``top_chunks`` best
        chunks; for a method that reads the query's words, also each chunk's BM25 score (and its best chunk's text)
        and, for a hybrid, the document's score and rank under each fused signal (``Hit.signals``).
        """
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k}")
        lexical_future = None
        if isinstance(query, str):
            if not query.strip():
                raise ValueError("query: expected a non-empty question, got an empty string")
            if method in M.LEXICAL_METHODS:
                # the full-text query runs in LanceDB's native code, without the GIL: overlap it with the encoder
                self.lexical()
                lexical_future = _lexical_pool().submit(self.lexical_chunk_scores, [query])
            qv = self.encode_queries([query])[0]
        else:
            qv = query
        texts = [query] if isinstance(query, str) else None
        signals = self.signals(qv[None], method, texts=texts, temperature=temperature,
                               lexical_chunk_scores=None if lexical_future is None else lexical_future.result())
        scores = self.fuse(signals, method)[0]
        k = min(k, scores.numel())
        top = torch.topk(scores, k)
        stored = self._loaded()["stored"]
        chunks = self.chunk_matrix()
        t = self.temperature() if temperature is None else temperature
        beta = self.first_bias()
        hits = []
        texts_of = self.store().chunk_texts_of([stored.doc_ids[d] for d in top.indices.tolist()]) if explain else {}
        lexical = lexical_future.result()[0] if explain and lexical_future is not None else None
        ranks = {name: _ranks(s[0]) for name, s in signals.items()} if explain and len(signals) > 1 else {}
        for s, d in zip(top.values.tolist(), top.indices.tolist()):
            hit = Hit(stored.doc_ids[d], float(s), stored.titles[d])
            if explain:
                a, b = int(chunks.offsets[d]), int(chunks.offsets[d + 1])
                sims = chunks.vectors[a:b] @ qv
                weights = M.attention_weights(chunks.vectors[a:b], qv, t, beta)
                texts = {r["chunk_index"]: r["text"] for r in texts_of.get(hit.doc_id, [])}
                best = set(torch.argsort(weights, descending=True)[:top_chunks].tolist())
                if lexical is not None:  # the chunks that carry the lexical evidence are shown too
                    best |= set(torch.argsort(lexical[a:b], descending=True)[:1].tolist()) if b > a else set()
                hit.chunks = [ChunkHit(i, float(weights[i]), float(sims[i]), int(stored.starts[a + i]),
                                       int(stored.ends[a + i]), texts.get(i, "") if i in best else "",
                                       None if lexical is None else float(lexical[a + i]))
                              for i in range(b - a)]
                hit.signals = {name: {"score": float(signals[name][0, d]), "rank": int(r[d])}
                               for name, r in ranks.items()}
            hits.append(hit)
        return hits


_LEXICAL_POOL: Any = None


def _lexical_pool() -> Any:
    """One worker thread shared by every knowledge base, for the full-text query of :meth:`KnowledgeBase.search`."""
    global _LEXICAL_POOL
    if _LEXICAL_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _LEXICAL_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnpool-fts")
    return _LEXICAL_POOL


def _ranks(scores: Tensor) -> Tensor:
    """``[B]`` rank of each document (1 = best; ties in document order)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return ranks


def _head_vectors(head: torch.nn.Module, chunks: M.ChunkMatrix) -> Tensor:
    from attnpool.kb.heads import doc_vectors

    out = []
    # documents in blocks, so that a head with projections never holds [N, D] temporaries for a huge corpus
    step = 4096
    for i in range(0, chunks.num_docs, step):
        docs = torch.arange(i, min(i + step, chunks.num_docs))
        out.append(doc_vectors(head, chunks, docs))
    return torch.cat(out) if out else torch.zeros(0, chunks.vectors.shape[1])

