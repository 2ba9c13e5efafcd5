"""Trained document heads for the ``learned`` and ``multi`` methods, and their training on (query, document) pairs.

Both heads start as mean pooling, so training moves away from a known baseline rather than from noise:

* ``learned``: :class:`~attnpool.nn.AttentionPool` with one learned query, initialized to zero (uniform weights,
  i.e. the mean of the chunks), and a key projection initialized to the identity. The document vector stays a convex
  combination of its chunk vectors, so it lives in the encoder's space and is compared with the query by cosine.
* ``multi``: :class:`~attnpool.nn.PMA` (Lee et al. 2019) with ``k`` seeds, no input rFF and no output projection;
  its value projection starts as the identity and its rFF as zero, so each of the ``k`` vectors starts near the mean
  of the chunks, and the seeds (small, random) break the symmetry between them.

Training: InfoNCE with in-batch negatives (each query against the documents of the other pairs in its batch), at
a fixed logit scale, AdamW, seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attnpool.kb.methods import ChunkMatrix
from attnpool.nn import PMA, AttentionPool

__all__ = ["HEAD_KINDS", "TrainResult", "build_head", "doc_vectors", "load_head", "save_head", "train_head"]

HEAD_KINDS = ("learned", "multi")


def build_head(kind: str, dim: int, *, num_vectors: int = 4, seed: int = 0) -> nn.Module:
    """A head that starts as mean pooling (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "learned":
        head = AttentionPool(dim, num_queries=1, key_proj=True)
        with torch.no_grad():
            # query 0 gives uniform weights (the mean); the key projection must not start at 0 as well, or both
            # gradients vanish (each one is proportional to the other) and training never leaves the mean
            head.query.zero_()
            head.key_proj.weight.copy_(torch.eye(dim))
            head.key_proj.bias.zero_()
        return head
    if kind == "multi":
        pma = PMA(dim, num_vectors, 1, input_ff=False, out_proj=False)
        with torch.no_grad():
            pma.seeds.copy_(0.01 * torch.randn(pma.seeds.shape, generator=g))
            value = pma.mab.attn.value_proj
            value.weight.copy_(torch.eye(dim))
            value.bias.zero_()
            for lin in (pma.mab.attn.query_proj, pma.mab.attn.key_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(dim))
                lin.bias.zero_()
            for p in pma.mab.ff.parameters():
                p.zero_()
        return pma
    raise ValueError(f"kind: expected one of {HEAD_KINDS}, got {kind!r}")


def doc_vectors(head: nn.Module, chunks: ChunkMatrix, docs: Tensor | None = None) -> Tensor:
    """The head's vectors for documents ``docs`` (all by default): ``[B, D]`` or ``[B, k, D]``, unit norm."""
    if docs is None:
        vectors, offsets = chunks.vectors, chunks.offsets
    else:
        lengths = chunks.lengths[docs]
        index = torch.cat([torch.arange(int(chunks.offsets[d]), int(chunks.offsets[d + 1])) for d in docs.tolist()])
        vectors = chunks.vectors[index]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out = head(vectors, offsets=offsets)
    return torch.nn.functional.normalize(out, dim=-1, eps=1e-12)


@dataclass
class TrainResult:
    kind: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_head(head: nn.Module, chunks: ChunkMatrix, queries: Tensor, positives: Tensor, *, steps: int = 300,
               batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.0, logit_scale: float = 20.0,
               seed: int = 0, progress: bool = False, desc: str = "training head",
               hard_negatives: bool = False) -> TrainResult:
    """Train ``head`` so that ``cos(query, head(chunks of its document))`` ranks the document first in its batch.

    Args:
        queries: ``[P, D]`` unit-norm query vectors.
        positives: ``[P]`` the index (into ``chunks``' documents) of each query's relevant document.
        logit_scale: the InfoNCE inverse temperature on cosines.
        hard_negatives: add each positive's nearest other document (cosine of mean chunk vectors) to its batch.
    """
    import time

    if queries.shape[0] != positives.shape[0] or queries.shape[0] < 2:
        raise ValueError(f"queries, positives: expected the same number (>= 2) of pairs, got {queries.shape[0]} "
                         f"queries and {positives.shape[0]} positives")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    result = TrainResult(kind=type(head).__name__, steps=steps)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    neighbour = None
    if hard_negatives:
        from attnpool.kb.methods import mean_vectors

        means = mean_vectors(chunks)
        sims = means @ means.T
        sims.fill_diagonal_(float("-inf"))
        neighbour = sims.argmax(1)
    head.train()
    for _ in range(steps):
        batch = torch.randperm(queries.shape[0], generator=g)[:batch_size]
        pos = positives[batch]
        candidates = pos if neighbour is None else torch.cat([pos, neighbour[pos]])
        docs, inverse = torch.unique(candidates, return_inverse=True)
        inverse = inverse[: len(batch)]
        d = doc_vectors(head, chunks, docs)
        sims = queries[batch] @ d.T if d.dim() == 2 else torch.einsum("qd,bkd->qbk", queries[batch], d).amax(-1)
        loss = nn.functional.cross_entropy(logit_scale * sims, inverse)
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    head.eval()
    result.seconds = time.perf_counter() - start
    return result


def save_head(head: nn.Module, path: str | Path, **meta: object) -> None:
    """Save with :func:`attnpool.hub.save_pretrained` (safetensors + JSON), written to a temporary directory first
    and renamed into place, so that a kill never leaves a half-written head."""
    import json
    import os
    import shutil
    import tempfile

    from attnpool.hub import save_pretrained

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_pretrained(head, tmp)
        (tmp / "attnpool_kb_head.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, object]]:
    import json

    from attnpool.hub import from_pretrained

    path = Path(path)
    head = from_pretrained(path)
    meta = json.loads((path / "attnpool_kb_head.json").read_text(encoding="utf-8"))
    head.eval()
    return head, meta
