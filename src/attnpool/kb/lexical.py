"""BM25 over the knowledge base's chunks, from the full-text index that lives in the store's ``chunks`` table.

A query's lexical evidence is per chunk: the chunk's BM25 score (LanceDB's native index: lower case, ASCII folding,
English stop words and stemming; :data:`attnpool.kb.store.TEXT_INDEX_OPTIONS`), 0 where no query word occurs. A
document's lexical score is its best chunk's (:func:`document_scores`). Measured against bm25s over whole documents
on both development sets (experiments/README.md, "The lexical side"), the best chunk ranks better on both, and
LanceDB's analysis better than bm25s's on the Python docs.

The index is derived data kept in step by the store (see :mod:`attnpool.kb.store`): hits are mapped to the loaded
chunk rows by ``(doc_id, doc_hash, chunk_index)``, so chunks of uncommitted or superseded versions never count.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnpool.kb.store import create_text_index, text_search

__all__ = ["ChunkLexicalIndex", "document_scores", "document_texts"]

#: chunks read per query; a document outside a query's best ``limit`` chunks has lexical score 0
DEFAULT_LIMIT = 1000


def document_texts(chunks: Sequence[dict[str, Any]]) -> str:
    """A document's text from its chunks (``start``, ``end``, ``text``, in order), the overlaps counted once."""
    parts, covered = [], 0
    for c in chunks:
        start, text = int(c["start"]), c["text"]
        skip = max(0, covered - start)
        if skip < len(text):
            if parts and start > covered:
                parts.append(" ")
            parts.append(text[skip:])
        covered = max(covered, int(c["end"]))
    return "".join(parts)


def document_scores(chunk_scores: Tensor, offsets: Tensor) -> Tensor:
    """``[Q, B]``: each document's best chunk score, from ``[Q, N]`` chunk scores grouped by ``offsets [B+1]``
    (0 for a document without chunks)."""
    out = torch.segment_reduce(chunk_scores, "max", offsets=offsets.expand(chunk_scores.shape[0], -1).contiguous(),
                               axis=1, unsafe=True)
    return torch.nan_to_num(out, neginf=0.0)


class ChunkLexicalIndex:
    """BM25 scores of the chunks of a LanceDB table with a full-text index on ``text``.

    Args:
        table: the LanceDB table.
        key_columns: the columns that identify a row.
        row_of: maps a row's key (a tuple of ``key_columns`` values) to its position in the caller's chunk order;
            keys it does not hold (stale rows) are dropped.
        num_chunks: ``N``, the number of positions.
        limit: rows read per query.
    """

    def __init__(self, table: Any, key_columns: Sequence[str], row_of: dict[tuple[Any, ...], int], num_chunks: int,
                 *, limit: int = DEFAULT_LIMIT) -> None:
        self.table, self.key_columns, self.row_of = table, list(key_columns), row_of
        self.num_chunks, self.limit = num_chunks, limit
        self._keepalive: Any = None

    @classmethod
    def for_store(cls, store: Any, doc_ids: Sequence[str], doc_hashes: Sequence[str], offsets: Sequence[int],
                  *, limit: int = DEFAULT_LIMIT) -> ChunkLexicalIndex:
        """The store's index, its hits mapped to the chunk rows of ``StoredChunks`` (documents in ``doc_ids`` order,
        each owning rows ``offsets[d]:offsets[d+1]``)."""
        store.ensure_text_index()
        row_of = {(d, h, j): int(offsets[i]) + j for i, (d, h) in enumerate(zip(doc_ids, doc_hashes, strict=True))
                  for j in range(int(offsets[i + 1]) - int(offsets[i]))}
        return cls(store.chunks, ("doc_id", "doc_hash", "chunk_index"), row_of, int(offsets[-1]), limit=limit)

    @classmethod
    def from_texts(cls, texts: Sequence[str], *, limit: int = DEFAULT_LIMIT) -> ChunkLexicalIndex:
        """A throw-away index over ``texts`` (row ``i`` is text ``i``) in a temporary directory, with the store's
        analysis: for scoring pseudo-queries against edited chunk texts (:mod:`attnpool.kb.tune`)."""
        import lancedb
        import pyarrow as pa

        tmp = tempfile.TemporaryDirectory(prefix="attnpool-fts-")
        table = lancedb.connect(tmp.name).create_table(
            "chunks", pa.table({"row": pa.array(range(len(texts)), pa.int64()), "text": list(texts)}))
        create_text_index(table)
        index = cls(table, ("row",), {(i,): i for i in range(len(texts))}, len(texts), limit=limit)
        index._keepalive = tmp  # the directory lives as long as the index
        return index

    def chunk_scores(self, queries: Sequence[str]) -> Tensor:
        """``[Q, N]`` float32 BM25 scores (0 where no query word occurs, or outside the best ``limit``)."""
        out = torch.zeros(len(queries), self.num_chunks, dtype=torch.float32)
        for i, q in enumerate(queries):
            hits = text_search(self.table, q, self.limit, self.key_columns)
            rows, scores = [], []
            for *key, score in zip(*(hits[c] for c in self.key_columns), hits["_score"]):
                r = self.row_of.get(tuple(key))
                if r is not None:
                    rows.append(r)
                    scores.append(score)
            if rows:
                out[i, torch.tensor(rows)] = torch.tensor(scores, dtype=torch.float32)
        return out
