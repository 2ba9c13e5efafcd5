"""BM25 over the knowledge base's documents, derived from the store and cached beside it.

The lexical index is never a second source of truth: it is built from the committed chunks (each document's text is
put back together from its chunks' character offsets), and cached in ``bm25/`` under a fingerprint of the committed
``(doc_id, doc_hash)`` pairs. Any add, update or delete changes the fingerprint, so the cache is rebuilt on the next
search; a run killed while writing the cache leaves only a temporary directory that is never read, since the cache
appears by an atomic rename. So the lexical side follows incremental updates and survives SIGKILL exactly as the
vectors do.

BM25 is bm25s's Lucene variant (k1 = 1.5, b = 0.75) with English stopwords and Snowball stemming (PyStemmer).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LexicalIndex", "document_texts", "tokenize"]


def _stemmer() -> Any:
    try:
        import Stemmer

        return Stemmer.Stemmer("english")
    except ImportError:  # pragma: no cover - PyStemmer is in the kb extra
        return None


def tokenize(texts: Sequence[str]) -> Any:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(), show_progress=False)


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


class LexicalIndex:
    """BM25 scores of every document, in the knowledge base's ``doc_ids`` order."""

    def __init__(self, retriever: Any, num_docs: int) -> None:
        self.retriever = retriever
        self.num_docs = num_docs

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(tokenize(texts), show_progress=False)
        return cls(retriever, len(texts))

    @staticmethod
    def fingerprint(doc_ids: Sequence[str], doc_hashes: Sequence[str]) -> str:
        digest = hashlib.sha256()
        for d, h in zip(doc_ids, doc_hashes):
            digest.update(f"{d}\x00{h}\x00".encode())
        return digest.hexdigest()[:24]

    @classmethod
    def for_store(cls, store: Any, doc_ids: Sequence[str]) -> LexicalIndex:
        """The store's index: from the cache when the fingerprint matches, else built and cached."""
        import bm25s

        hashes = store.document_hashes()
        key = cls.fingerprint(doc_ids, [hashes[d] for d in doc_ids])
        root = Path(store.path) / "bm25"
        cached = root / key
        if (cached / "params.index.json").is_file():
            with contextlib.suppress(Exception):
                return cls(bm25s.BM25.load(str(cached), show_progress=False), len(doc_ids))
        texts = store.document_texts(doc_ids)
        index = cls.build(texts)
        root.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            index.retriever.save(str(tmp), show_progress=False)
            os.replace(tmp, cached)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in root.iterdir():  # older fingerprints and temporary directories of killed runs
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        return index

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``[Q, B]`` BM25 scores (0 where no query term occurs)."""
        out = np.zeros((len(queries), self.num_docs), dtype=np.float32)
        tokenized = tokenize(queries)
        vocab_inv = {v: k for k, v in tokenized.vocab.items()}
        for i, ids in enumerate(tokenized.ids):
            words = [vocab_inv[t] for t in ids]
            if words:
                out[i] = self.retriever.get_scores(words)
        return out
