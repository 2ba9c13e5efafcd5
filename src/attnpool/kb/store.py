"""The knowledge base's store: an embedded LanceDB database with a ``documents`` table and a ``chunks`` table.

Crash safety comes from the order of writes, not from locks. LanceDB commits each write atomically (a new table
version appears whole or not at all), and the ``documents`` table is the commit record:

1. a document's new chunks are appended to ``chunks``, tagged with the document's content hash;
2. its row in ``documents`` is inserted or updated to that hash (one atomic ``merge_insert`` per batch);
3. chunks of the document with any other hash are deleted.

Readers keep only chunks whose ``(doc_id, doc_hash)`` matches ``documents``, so a run killed at any point leaves every
document either at its old version or at its new one, never half-written and never duplicated. Chunks left over by
a killed run (orphans) are invisible, and :meth:`LanceStore.remove_orphans` deletes them at the start of the next run.

The lexical side lives in the same table: a full-text (BM25) index on ``chunks.text``
(:meth:`LanceStore.text_search`). It is derived data. Rows appended since it was last brought up to date are
searched by a scan, deleted rows never match, and hits on orphans are dropped by the same ``(doc_id, doc_hash)``
rule, so it is never stale; :meth:`LanceStore.optimize` (run at the end of every indexing run) folds new rows into
it, and a missing index (a store from before it existed, or a run killed before its first commit) is created on
first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "ChunkRows", "LanceStore", "StoreError", "StoredChunks", "create_text_index",
           "text_search"]

FORMAT_VERSION = 1
META_FILE = "kb.json"
#: the full-text index's analysis: lower case, ASCII folding, English stop words and stemming
TEXT_INDEX_OPTIONS: dict[str, Any] = {"stem": True, "remove_stop_words": True, "lower_case": True,
                                      "ascii_folding": True}


class StoreError(RuntimeError):
    """The store cannot be used as asked (for example: another model's vectors); the message says why."""


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that ``path`` holds either its old content or the new one, whole, even after a kill."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class ChunkRows:
    """The chunks of one document version, ready to store."""

    doc_id: str
    doc_hash: str
    title: str
    source: str
    texts: list[str]
    starts: list[int]
    ends: list[int]
    num_tokens: list[int]
    vectors: np.ndarray  # [n, dim] float32


@dataclass
class StoredChunks:
    """Every live chunk, grouped by document in ``doc_ids`` order: document ``d`` owns rows
    ``offsets[d]:offsets[d+1]`` of ``vectors``, in chunk order."""

    doc_ids: list[str]
    titles: list[str]
    doc_hashes: list[str]
    offsets: np.ndarray  # [B+1] int64
    vectors: np.ndarray  # [N, dim] float32
    starts: np.ndarray  # [N] int64
    ends: np.ndarray  # [N] int64

    @property
    def num_chunks(self) -> int:
        return int(self.offsets[-1])


class LanceStore:
    """A directory holding ``kb.json`` (the model and chunking settings) and a LanceDB database (``lance/``).

    Args:
        path: the store's directory.
        meta: for a new store, the settings to record (``model_id``, ``dim``, ``max_tokens``, ``overlap``); for an
            existing one, the settings to check against it: a different model or dimension raises
            :class:`StoreError` before anything is written.
    """

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None, *,
                 create: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if meta_path.is_file():
            try:
                stored = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"{meta_path}: unreadable store settings ({e})") from None
            if stored.get("format") != FORMAT_VERSION:
                raise StoreError(f"{meta_path}: expected store format {FORMAT_VERSION}, got {stored.get('format')}")
            if meta is not None:
                for key in ("dim", "model_id", "max_tokens", "overlap"):
                    if key in meta and stored.get(key) != meta[key]:
                        raise StoreError(
                            f"{self.path}: the index was built with {key} = {stored.get(key)!r}, and this run has "
                            f"{key} = {meta[key]!r}; use the same model and chunking, or another --store")
            self.meta: dict[str, Any] = stored
        elif not create:
            raise StoreError(f"{self.path}: no knowledge base here (no {META_FILE}); run `attnpool kb index` first")
        elif meta is None:
            raise StoreError(f"{self.path}: a new store needs its settings (model_id, dim, max_tokens, overlap)")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.meta = {"format": FORMAT_VERSION, **meta}
            write_json_atomic(meta_path, self.meta)
        import lancedb
        import pyarrow as pa

        self._pa = pa
        self.dim = int(self.meta["dim"])
        self.db = lancedb.connect(str(self.path / "lance"))
        self.chunk_schema = pa.schema([
            ("doc_id", pa.string()), ("doc_hash", pa.string()), ("chunk_index", pa.int32()),
            ("start", pa.int64()), ("end", pa.int64()), ("num_tokens", pa.int32()), ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), self.dim)),
        ])
        self.doc_schema = pa.schema([
            ("doc_id", pa.string()), ("doc_hash", pa.string()), ("title", pa.string()), ("source", pa.string()),
            ("num_chunks", pa.int32()),
        ])
        self.chunks = self._table("chunks", self.chunk_schema)
        self.documents = self._table("documents", self.doc_schema)

    def _table(self, name: str, schema: Any) -> Any:
        # exist_ok: a run killed between creating the two tables finds one of them already there
        return self.db.create_table(name, schema=schema, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------------------------

    def document_hashes(self) -> dict[str, str]:
        """doc_id -> content hash of every committed document."""
        t = self.documents.to_arrow().select(["doc_id", "doc_hash"]).to_pydict()
        return dict(zip(t["doc_id"], t["doc_hash"]))

    def num_documents(self) -> int:
        return int(self.documents.count_rows())

    def load(self) -> StoredChunks:
        """Every live chunk's vector and offsets, grouped by document (sorted by ``doc_id``)."""
        docs = self.documents.to_arrow().select(["doc_id", "doc_hash", "title"]).to_pydict()
        order = sorted(range(len(docs["doc_id"])), key=docs["doc_id"].__getitem__)
        doc_ids = [docs["doc_id"][i] for i in order]
        titles = [docs["title"][i] for i in order]
        current = {docs["doc_id"][i]: docs["doc_hash"][i] for i in order}
        cols = self.chunks.to_arrow().select(["doc_id", "doc_hash", "chunk_index", "start", "end", "vector"])
        ids = np.asarray(cols.column("doc_id").to_pylist(), dtype=object)
        hashes = cols.column("doc_hash").to_pylist()
        live = np.fromiter((current.get(d) == h for d, h in zip(ids, hashes)), dtype=bool, count=len(hashes))
        position = {d: i for i, d in enumerate(doc_ids)}
        doc_pos = np.fromiter((position.get(d, -1) for d in ids), dtype=np.int64, count=len(ids))
        chunk_index = cols.column("chunk_index").to_numpy()
        rows = np.flatnonzero(live)
        rows = rows[np.lexsort((chunk_index[rows], doc_pos[rows]))]
        flat = cols.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.ascontiguousarray(flat.reshape(-1, self.dim)[rows], dtype=np.float32)
        counts = np.bincount(doc_pos[rows], minlength=len(doc_ids))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return StoredChunks(doc_ids, titles, [current[d] for d in doc_ids], offsets, vectors,
                            cols.column("start").to_numpy()[rows], cols.column("end").to_numpy()[rows])

    def chunk_texts(self, doc_id: str) -> list[dict[str, Any]]:
        """The live chunks of one document, in order: ``chunk_index``, ``start``, ``end``, ``text``."""
        return self.chunk_texts_of([doc_id]).get(doc_id, [])

    def chunk_texts_of(self, doc_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The live chunks of several documents (one query), each list in chunk order."""
        current = self.document_hashes()
        pairs = [(d, current[d]) for d in dict.fromkeys(doc_ids) if d in current]
        if not pairs:
            return {}
        clause = " OR ".join(f"(doc_id = {_sql_str(d)} AND doc_hash = {_sql_str(h)})" for d, h in pairs)
        rows = (self.chunks.search().where(clause).select(["doc_id", "chunk_index", "start", "end", "text"])
                .limit(None).to_arrow().to_pylist())
        out: dict[str, list[dict[str, Any]]] = {}
        for r in sorted(rows, key=lambda r: (r["doc_id"], r["chunk_index"])):
            out.setdefault(r.pop("doc_id"), []).append(r)
        return out

    def document_texts(self, doc_ids: Sequence[str]) -> list[str]:
        """Each document's text, put back together from its live chunks
        (:func:`attnpool.kb.lexical.document_texts`)."""
        from attnpool.kb.lexical import document_texts

        current = self.document_hashes()
        cols = self.chunks.to_arrow().select(["doc_id", "doc_hash", "chunk_index", "start", "end", "text"]).to_pylist()
        by_doc: dict[str, list[dict[str, Any]]] = {}
        for row in cols:
            if current.get(row["doc_id"]) == row["doc_hash"]:
                by_doc.setdefault(row["doc_id"], []).append(row)
        return [document_texts(sorted(by_doc.get(d, []), key=lambda r: r["chunk_index"])) for d in doc_ids]

    def has_text_index(self) -> bool:
        return any(getattr(i, "index_type", "") == "FTS" for i in self.chunks.list_indices())

    def ensure_text_index(self) -> None:
        """Create the full-text index on ``chunks.text`` if the store has none."""
        if not self.has_text_index():
            create_text_index(self.chunks)

    def text_search(self, query: str, limit: int) -> dict[str, list[Any]]:
        """The ``limit`` chunk rows that BM25 ranks best for ``query`` (analysed as plain words: no query syntax),
        as columns ``doc_id``, ``doc_hash``, ``chunk_index``, ``_score``; orphans included (callers match
        ``(doc_id, doc_hash)`` against the committed documents)."""
        return text_search(self.chunks, query, limit, ["doc_id", "doc_hash", "chunk_index"])

    # -- writing ---------------------------------------------------------------------------------------------------

    def remove_orphans(self) -> int:
        """Delete chunks that no committed document owns (left by a killed run); returns how many."""
        current = self.document_hashes()
        cols = self.chunks.to_arrow().select(["doc_id", "doc_hash"]).to_pydict()
        stale = sorted({(d, h) for d, h in zip(cols["doc_id"], cols["doc_hash"]) if current.get(d) != h})
        count = sum(1 for d, h in zip(cols["doc_id"], cols["doc_hash"]) if current.get(d) != h)
        for i in range(0, len(stale), 200):
            clause = " OR ".join(f"(doc_id = {_sql_str(d)} AND doc_hash = {_sql_str(h)})" for d, h in stale[i:i + 200])
            self.chunks.delete(clause)
        return count

    def write(self, batch: Sequence[ChunkRows]) -> None:
        """Store new versions of a batch of documents, in the crash-safe order of this module's docstring."""
        if not batch:
            return
        pa = self._pa
        for rows in batch:
            if rows.vectors.shape != (len(rows.texts), self.dim):
                raise StoreError(f"vectors of {rows.doc_id!r}: expected shape ({len(rows.texts)}, {self.dim}), got "
                                 f"{tuple(rows.vectors.shape)}")
        n = sum(len(r.texts) for r in batch)
        if n:
            vectors = np.concatenate([r.vectors for r in batch]).astype(np.float32, copy=False)
            table = pa.table({
                "doc_id": [r.doc_id for r in batch for _ in r.texts],
                "doc_hash": [r.doc_hash for r in batch for _ in r.texts],
                "chunk_index": pa.array([i for r in batch for i in range(len(r.texts))], pa.int32()),
                "start": pa.array([s for r in batch for s in r.starts], pa.int64()),
                "end": pa.array([e for r in batch for e in r.ends], pa.int64()),
                "num_tokens": pa.array([t for r in batch for t in r.num_tokens], pa.int32()),
                "text": [t for r in batch for t in r.texts],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim),
            }, schema=self.chunk_schema)
            self.chunks.add(table)
        docs = pa.table({
            "doc_id": [r.doc_id for r in batch], "doc_hash": [r.doc_hash for r in batch],
            "title": [r.title for r in batch], "source": [r.source for r in batch],
            "num_chunks": pa.array([len(r.texts) for r in batch], pa.int32()),
        }, schema=self.doc_schema)
        self.documents.merge_insert("doc_id").when_matched_update_all().when_not_matched_insert_all().execute(docs)
        self._delete_other_versions(batch)

    def _delete_other_versions(self, batch: Sequence[ChunkRows]) -> None:
        for i in range(0, len(batch), 200):
            part = batch[i:i + 200]
            clause = " OR ".join(f"(doc_id = {_sql_str(r.doc_id)} AND doc_hash != {_sql_str(r.doc_hash)})"
                                 for r in part)
            self.chunks.delete(clause)

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Delete documents by id (their row first, the commit point; then their chunks). Returns how many existed."""
        ids = sorted(set(doc_ids) & set(self.document_hashes()))
        for i in range(0, len(ids), 500):
            clause = "doc_id IN (" + ", ".join(map(_sql_str, ids[i:i + 500])) + ")"
            self.documents.delete(clause)
            self.chunks.delete(clause)
        return len(ids)

    def optimize(self) -> None:
        """Create or update the full-text index, compact the tables' files and drop old versions (after a run;
        never needed for correctness)."""
        self.ensure_text_index()
        for table in (self.chunks, self.documents):
            with contextlib.suppress(Exception):
                table.optimize()


def create_text_index(table: Any) -> None:
    """(Re)build a LanceDB table's full-text index on ``text``, with :data:`TEXT_INDEX_OPTIONS`."""
    import warnings

    with warnings.catch_warnings():
        # lancedb 0.40 marks create_fts_index deprecated in favour of create_index(config=FTS()), whose sync
        # signature there still takes a vector metric first; the call is the documented one for this version
        warnings.simplefilter("ignore", DeprecationWarning)
        table.create_fts_index("text", replace=True, **TEXT_INDEX_OPTIONS)


def text_search(table: Any, query: str, limit: int, columns: Sequence[str]) -> dict[str, list[Any]]:
    """BM25 search of a LanceDB table's full-text index: ``columns`` and ``_score`` of the best ``limit`` rows."""
    from lancedb.query import MatchQuery

    if not query.strip():
        return {c: [] for c in (*columns, "_score")}
    search = table.search(MatchQuery(query, "text"), query_type="fts")
    return search.select([*columns, "_score"]).limit(limit).to_arrow().to_pydict()  # type: ignore[no-any-return]
