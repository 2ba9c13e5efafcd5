"""Passages for multi-document question answering: weights from attention pooling with the question as the query, and
a selection that fits a token budget, with near-duplicates penalized.

Weights over passages ``p_i`` (unit-norm vectors) from several documents, for a question ``q``:

* ``flat``: ``w = softmax_i(cos(q, p_i) / T)`` over every passage (one attention pool over all of them);
* ``hierarchical`` (default): ``w_i = P(d) * P(i | d)``: ``P(i | d) = softmax_{i in d}(cos(q, p_i) / T)`` is the
  attention pool of document ``d``'s passages with the question as the query, and ``P(d) = softmax_d(cos(q, r_d) /
  T_doc)`` weighs each document by the cosine of the question with its pooled vector ``r_d = sum_i P(i | d) p_i``
  (the knowledge base's ``attention`` document score). A passage counts for more when its document as a whole
  answers the question, not only when it resembles the question by itself.

Selection (:func:`select_passages`) is greedy under the budget, maximal marginal relevance (Carbonell & Goldstein,
1998) style: each step takes the passage that fits and maximizes ``(1 - diversity) * w_i / max(w) - diversity *
max_{j selected} cos(p_i, p_j)``; with ``diversity > 0``, a passage whose cosine with a selected one reaches
``duplicate_threshold`` is never taken. The token counts are the passages' own (the chunker's, without special tokens),
and the selected passages' total never exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnpool.functional import attention_pool

__all__ = ["Passage", "PassageTable", "Selection", "candidate_passages", "passage_weights", "passages_for_question",
           "select_passages"]

MODES = ("hierarchical", "flat")


@dataclass
class Passage:
    """A passage of a source document: ``text == document[start:end]`` (character offsets), ``index`` its chunk
    number in the document, ``num_tokens`` its length in the encoder's tokens."""

    doc_id: str
    index: int
    start: int
    end: int
    num_tokens: int
    text: str = ""
    weight: float = 0.0
    similarity: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Selection:
    """The passages chosen (in the order chosen), their indices among the candidates, and the tokens they use."""

    passages: list[Passage]
    indices: list[int]
    tokens: int
    budget: int
    weights: Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))


def _check_vectors(question: Tensor, vectors: Tensor) -> None:
    if question.dim() != 1:
        raise ValueError(f"question: expected a vector [D], got shape {tuple(question.shape)}")
    if vectors.dim() != 2 or vectors.shape[1] != question.shape[0]:
        raise ValueError(f"vectors: expected [N, {question.shape[0]}], got shape {tuple(vectors.shape)}")


def passage_weights(question: Tensor, vectors: Tensor, doc_ids: Sequence[str] | None = None, *,
                    temperature: float = 0.1, doc_temperature: float = 0.05,
                    mode: str = "hierarchical") -> Tensor:
    """Weights ``[N]`` (summing to 1; empty for no passage) of passages ``vectors`` ``[N, D]`` for ``question``
    ``[D]`` (both unit norm), ``doc_ids`` naming each passage's document (formulas in the module docstring)."""
    _check_vectors(question, vectors)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    for name, t in (("temperature", temperature), ("doc_temperature", doc_temperature)):
        if not (isinstance(t, (int, float)) and 0 < t < math.inf):
            raise ValueError(f"{name}: expected a finite number > 0, got {t!r}")
    n = vectors.shape[0]
    if n == 0:
        return vectors.new_zeros(0)
    if mode == "flat" or doc_ids is None:
        _, w = attention_pool(vectors, question, offsets=torch.tensor([0, n]), scale=1.0, temperature=temperature,
                              return_weights=True)
        return w.reshape(n)
    if len(doc_ids) != n:
        raise ValueError(f"doc_ids: expected one per passage ({n}), got {len(doc_ids)}")
    # group passages by document (first appearance order), pool each document with the question as the query
    order_of: dict[str, int] = {}
    for d in doc_ids:
        order_of.setdefault(d, len(order_of))
    group = torch.tensor([order_of[d] for d in doc_ids])
    perm = torch.sort(group, stable=True).indices
    counts = torch.bincount(group, minlength=len(order_of))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    pooled, within = attention_pool(vectors[perm], question, offsets=offsets, scale=1.0, temperature=temperature,
                                    return_weights=True)
    doc_score = torch.nn.functional.normalize(pooled.to(question.dtype), dim=-1) @ question
    p_doc = torch.softmax(doc_score.to(torch.promote_types(doc_score.dtype, torch.float32)) / doc_temperature, 0)
    w_sorted = within.reshape(n) * p_doc[group[perm]]
    out = torch.empty_like(w_sorted)
    out[perm] = w_sorted
    return out


def select_passages(passages: Sequence[Passage], vectors: Tensor, weights: Tensor, *, budget: int,
                    diversity: float = 0.0, duplicate_threshold: float = 0.95) -> Selection:
    """Greedy MMR-style selection of ``passages`` (with unit-norm ``vectors`` ``[N, D]`` and ``weights`` ``[N]``)
    whose token counts sum to at most ``budget``. ``diversity`` in ``[0, 1]``: 0 takes the highest weights that fit;
    above 0, similarity to what is already selected is penalized and near-duplicates (cosine >=
    ``duplicate_threshold``) are excluded."""
    n = len(passages)
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget: expected an int >= 0 (tokens), got {budget!r}")
    if not (isinstance(diversity, (int, float)) and 0 <= diversity <= 1):
        raise ValueError(f"diversity: expected a number in [0, 1], got {diversity!r}")
    if vectors.dim() != 2 or vectors.shape[0] != n:
        raise ValueError(f"vectors: expected [N, D] with N = {n} passages, got shape {tuple(vectors.shape)}")
    if weights.shape != (n,):
        raise ValueError(f"weights: expected [N] = [{n}], got shape {tuple(weights.shape)}")
    for i, p in enumerate(passages):
        if not isinstance(p.num_tokens, int) or p.num_tokens < 0:
            raise ValueError(f"passages[{i}].num_tokens: expected an int >= 0, got {p.num_tokens!r}")
    # small arrays, many steps: numpy keeps the per-step overhead in microseconds
    tokens = np.array([p.num_tokens for p in passages], dtype=np.int64)
    w = weights.detach().double().cpu().numpy()
    relevance = w / w.max() if n and w.max() > 0 else w
    v = torch.nn.functional.normalize(vectors.detach().double(), dim=-1).cpu().numpy()
    sims = v @ v.T
    max_sim = np.full(n, -1.0)
    available = np.ones(n, dtype=bool)
    chosen: list[int] = []
    left = budget
    while True:
        fits = available & (tokens <= left)
        if not fits.any():
            break
        score = (1 - diversity) * relevance - diversity * np.maximum(max_sim, 0.0) if chosen else relevance.copy()
        score[~fits] = -np.inf
        best = int(np.argmax(score))  # ties: the first candidate
        chosen.append(best)
        available[best] = False
        left -= int(tokens[best])
        max_sim = np.maximum(max_sim, sims[best])
        if diversity > 0:
            available &= sims[best] < duplicate_threshold
    picked = []
    for i in chosen:
        p = passages[i]
        picked.append(Passage(p.doc_id, p.index, p.start, p.end, p.num_tokens, p.text, float(weights[i]),
                              p.similarity))
    return Selection(picked, chosen, budget - left, budget, weights)


class PassageTable:
    """Every live chunk of a knowledge base as a :class:`Passage`, aligned with ``kb.chunk_matrix()`` (read once from
    the store: offsets, token counts and text)."""

    def __init__(self, kb: Any) -> None:
        store = kb.store()
        current = store.document_hashes()
        cols = store.chunks.to_arrow().select(["doc_id", "doc_hash", "chunk_index", "start", "end", "num_tokens",
                                               "text"]).to_pydict()
        rows = {(d, i): (s, e, t, x) for d, h, i, s, e, t, x in zip(
            cols["doc_id"], cols["doc_hash"], cols["chunk_index"], cols["start"], cols["end"], cols["num_tokens"],
            cols["text"]) if current.get(d) == h}
        self.kb = kb
        self.chunks = kb.chunk_matrix()
        self.doc_ids: list[str] = kb.doc_ids
        self.passages: list[Passage] = []
        offsets = self.chunks.offsets.tolist()
        for d, doc in enumerate(self.doc_ids):
            for i in range(offsets[d + 1] - offsets[d]):
                s, e, t, x = rows[(doc, i)]
                self.passages.append(Passage(doc, i, int(s), int(e), int(t), x))

    def of_documents(self, docs: Sequence[int]) -> tuple[list[Passage], Tensor]:
        """The passages of the documents at positions ``docs`` (in that order) and their vectors."""
        offsets = self.chunks.offsets.tolist()
        idx = [i for d in docs for i in range(offsets[d], offsets[d + 1])]
        return [self.passages[i] for i in idx], self.chunks.vectors[idx]


def candidate_passages(kb: Any, question: Tensor, *, num_docs: int = 10, table: PassageTable | None = None,
                       method: str = "attention") -> tuple[list[Passage], Tensor]:
    """The passages of the ``num_docs`` best documents for ``question`` (unit norm ``[D]``) and their vectors, with
    each passage's cosine to the question in ``similarity``."""
    if num_docs < 1:
        raise ValueError(f"num_docs: expected an int >= 1, got {num_docs}")
    table = PassageTable(kb) if table is None else table
    scores = kb.score(question[None], method)[0]
    top = torch.topk(scores, min(num_docs, scores.numel())).indices.tolist()
    passages, vectors = table.of_documents(top)
    sims = (vectors @ question).tolist()
    passages = [Passage(p.doc_id, p.index, p.start, p.end, p.num_tokens, p.text, 0.0, s)
                for p, s in zip(passages, sims)]
    return passages, vectors


def passages_for_question(kb: Any, question: str, *, budget: int = 512, diversity: float = 0.3, num_docs: int = 10,
                          table: PassageTable | None = None) -> Selection:
    """The passages of the ``num_docs`` best documents for ``question`` weighted by attention pooling with the question
    as the query, selected within ``budget`` tokens (``attnpool kb passages`` and the web API's ``/api/passages``)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: expected a non-empty question, got an empty string")
    if budget < 1:
        raise ValueError(f"budget: expected an integer >= 1 (tokens), got {budget}")
    q = kb.encode_queries([question])[0]
    passages, vectors = candidate_passages(kb, q, num_docs=num_docs, table=table)
    weights = passage_weights(q, vectors, [p.doc_id for p in passages])
    return select_passages(passages, vectors, weights, budget=budget, diversity=diversity)

