"""Document scoring methods, each turning a document's chunk vectors into a relevance score for a query.

All vectors are unit norm. With ``s_i = q . c_i`` the cosine of the query and chunk ``i`` of document ``d``:

* ``first``: ``s_first``, the document's first chunk;
* ``mean``: ``cos(q, mean_i c_i)``;
* ``max``: ``max_i s_i`` (MaxSim over the chunks);
* ``attention``: ``cos(q, sum_i a_i c_i)`` with ``a = softmax(s / T + beta [i = 0])``: the document is the attention
  pool of its chunks with the query as the query, so it is represented differently for every question. ``T -> 0``
  tends to ``max``, ``T -> inf`` to ``mean``, and the first-chunk prior ``beta -> inf`` to ``first`` (a page's
  opening chunk usually holds its summary);
* ``learned``: ``cos(q, d)``, ``d`` a static document vector from a trained attention pooling head (learned query);
* ``multi``: ``max_k cos(q, d_k)`` over ``k`` vectors per document from a trained PMA;
* ``bm25``: the best BM25 score among the document's chunks (the store's full-text index, :mod:`attnpool.kb.lexical`);
* ``hybrid``: reciprocal-rank fusion of ``bm25`` and ``attention``;
* ``hybrid-score``: ``w * z(bm25) + (1 - w) * z(attention)``, each score standardized over the documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnpool.functional import attention_pool

__all__ = [
    "DEFAULT_METHOD",
    "LEXICAL_METHODS",
    "METHODS",
    "ChunkMatrix",
    "attention_scores",
    "first_scores",
    "max_scores",
    "mean_vectors",
    "reciprocal_rank_fusion",
    "static_scores",
    "zscore_fusion",
]

METHODS = ("first", "mean", "max", "attention", "learned", "multi", "bm25", "hybrid", "hybrid-score")
#: what `attnpool kb search` and the web page use unless told otherwise: the method that measured best on both
#: development sets (experiments/README.md, knowledge-base section)
DEFAULT_METHOD = "hybrid-score"
#: methods that read the query's text
LEXICAL_METHODS = ("bm25", "hybrid", "hybrid-score")


@dataclass
class ChunkMatrix:
    """Chunk vectors ``[N, D]`` grouped by document: document ``d`` owns rows ``offsets[d]:offsets[d+1]``."""

    vectors: Tensor
    offsets: Tensor
    _flagged: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_docs(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def lengths(self) -> Tensor:
        return self.offsets.diff()

    def doc_of_chunk(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(self.num_docs), self.lengths)

    def first_flagged(self) -> Tensor:
        """``[N, D + 1]``: the vectors with a last column that is 1 on each document's first chunk, else 0 (built
        once, then kept)."""
        if self._flagged is None:
            n, d = self.vectors.shape
            flagged = torch.zeros(n, d + 1, dtype=self.vectors.dtype)
            flagged[:, :d] = self.vectors
            flagged[self.offsets[:-1][self.lengths > 0], d] = 1.0
            self._flagged = flagged
        return self._flagged


def _normalize(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)


def first_vectors(chunks: ChunkMatrix) -> Tensor:
    """``[B, D]``: each document's first chunk vector (0 for a document without chunks)."""
    out = torch.zeros(chunks.num_docs, chunks.vectors.shape[1], dtype=chunks.vectors.dtype)
    has = chunks.lengths > 0
    out[has] = chunks.vectors[chunks.offsets[:-1][has]]
    return out


def first_scores(chunks: ChunkMatrix, queries: Tensor) -> Tensor:
    """``[Q, B]``: cosine of each query with each document's first chunk (``-inf`` for a document without chunks)."""
    return (queries @ first_vectors(chunks).T).masked_fill(chunks.lengths == 0, float("-inf"))


def mean_vectors(chunks: ChunkMatrix) -> Tensor:
    """``[B, D]`` unit-norm mean of each document's chunk vectors (0 for a document without chunks)."""
    sums = torch.zeros(chunks.num_docs, chunks.vectors.shape[1], dtype=chunks.vectors.dtype)
    sums.index_add_(0, chunks.doc_of_chunk(), chunks.vectors)
    return _normalize(sums)


def static_scores(doc_vectors: Tensor, queries: Tensor, *, normalized: bool = False) -> Tensor:
    """``[Q, B]`` from static document vectors ``[B, D]`` (one per document) or ``[B, k, D]`` (the best of ``k``);
    ``normalized`` says they are unit norm already (cached), which saves a copy per query."""
    vectors = doc_vectors if normalized else _normalize(doc_vectors)
    if vectors.dim() == 2:
        return queries @ vectors.T
    return torch.einsum("qd,bkd->qbk", queries, vectors).amax(-1)


def max_scores(chunks: ChunkMatrix, queries: Tensor) -> Tensor:
    """``[Q, B]``: the best chunk's cosine per document (MaxSim); ``-inf`` for a document without chunks."""
    sims = queries @ chunks.vectors.T  # [Q, N]
    offsets = chunks.offsets.expand(sims.shape[0], -1).contiguous()
    return torch.segment_reduce(sims, "max", offsets=offsets, axis=1)


def attention_scores(chunks: ChunkMatrix, queries: Tensor, temperature: float, *, first_bias: float = 0.0,
                     query_block: int = 32) -> Tensor:
    """``[Q, B]``: ``cos(q, attention_pool(chunks of d, query=q, T))``, computed for ``query_block`` queries at a
    time by attnpool's packed attention pool (one pass over the chunks per block; the fused kernel on the CPU).

    ``first_bias`` (``beta``) adds to the first chunk's logit ``s_0 / T``. It rides on the same kernel call: the
    chunks carry a first-chunk flag as an extra column (:meth:`ChunkMatrix.first_flagged`) and the query the
    matching component ``beta * T``, so ``[q, beta T] . [c_i, flag_i] / T = s_i / T + beta flag_i``."""
    d = queries.shape[1]
    out = torch.empty(queries.shape[0], chunks.num_docs, dtype=queries.dtype)
    for i in range(0, queries.shape[0], query_block):
        q = queries[i:i + query_block]
        if first_bias:
            flagged_q = torch.cat([q, q.new_full((q.shape[0], 1), first_bias * temperature)], dim=1)
            pooled = attention_pool(chunks.first_flagged(), flagged_q, offsets=chunks.offsets, scale=1.0,
                                    temperature=temperature)[..., :d]
        else:
            pooled = attention_pool(chunks.vectors, q, offsets=chunks.offsets, scale=1.0, temperature=temperature)
        pooled = pooled.reshape(chunks.num_docs, q.shape[0], -1)  # [B, Qb, D]
        # cos(q, p) without writing a normalized copy of the pooled vectors
        out[i:i + query_block] = torch.einsum("qd,bqd->qb", q, pooled) / pooled.norm(dim=-1).T.clamp(min=1e-12)
    return out.masked_fill(chunks.lengths == 0, float("-inf"))


def attention_weights(vectors: Tensor, query: Tensor, temperature: float, first_bias: float = 0.0) -> Tensor:
    """The weights ``softmax(s / T + beta [i = 0])`` over one document's chunks ``[n, D]`` for one query ``[D]``."""
    logits = (vectors @ query).double() / temperature
    if first_bias and logits.numel():
        logits[0] += first_bias
    return torch.softmax(logits, 0).float()


def reciprocal_rank_fusion(scores: list[Tensor], k: float = 60.0) -> Tensor:
    """``sum_m 1 / (k + rank_m(d))`` over score matrices ``[Q, B]`` (rank 1 = best; Cormack et al. 2009)."""
    out = torch.zeros_like(scores[0], dtype=torch.float64)
    for s in scores:
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1).expand_as(order))
        out += 1.0 / (k + ranks.double())
    return out.float()


def zscore_fusion(scores: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_m w_m z_m`` with ``z_m`` each query's scores standardized over the documents (``-inf`` scores, from
    documents without chunks, stay ``-inf``)."""
    out = torch.zeros_like(scores[0], dtype=torch.float64)
    dead = torch.zeros_like(scores[0], dtype=torch.bool)
    for s, w in zip(scores, weights):
        s = s.double()
        finite = torch.isfinite(s)
        dead |= ~finite
        x = torch.where(finite, s, torch.zeros((), dtype=s.dtype))
        n = finite.sum(1, keepdim=True).clamp(min=1)
        mean = x.sum(1, keepdim=True) / n
        var = (torch.where(finite, x - mean, torch.zeros((), dtype=s.dtype)) ** 2).sum(1, keepdim=True) / n
        out += w * (x - mean) / var.sqrt().clamp(min=1e-12)
    return out.masked_fill(dead, float("-inf")).float()

