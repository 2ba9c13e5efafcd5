"""Softmax over sets: the numerics policy of attnpool, written once.

* The softmax always runs in at least float32, whatever the input dtype, and with autocast off.
* A set with no element (or every element masked) gets weight 0 everywhere: never NaN, in the output or the gradient.
* A masked position gets weight exactly 0, whatever its score holds (NaN and Inf included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool._sets import check_offsets
from attnpool._sets import segment_ids as segment_ids_from_lengths

__all__ = ["compute_dtype", "masked_softmax", "segment_softmax"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attnpool does its softmax and weighted sums in: float32 for half types, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def _stable_exp(scores: Tensor, row_max: Tensor) -> Tensor:
    # The max is only a shift that the normalisation cancels exactly, so it carries no gradient; a row whose max is
    # -inf (all masked, or empty) is shifted by 0 instead, which makes every exp exactly 0.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    return torch.exp(scores - shift)


def _normalize(e: Tensor, total: Tensor) -> Tensor:
    return e / torch.where(total > 0, total, torch.ones_like(total))


def masked_softmax(scores: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax along ``dim``, restricted to the positions where ``mask`` is True.

    Args:
        scores: any shape.
        mask: bool, broadcastable to ``scores``; True = keep. ``None`` keeps everything.
        dim: the set dimension.

    Returns:
        Weights in :func:`compute_dtype` of ``scores``: exactly 0 at masked positions, summing to 1 over every row
        with at least one kept position, and 0 over a row with none.
    """
    s = scores.to(compute_dtype(scores.dtype))
    if s.shape[dim] == 0:
        return s
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    e = _stable_exp(s, s.amax(dim=dim, keepdim=True))
    if mask is not None:
        # exp(-inf) is already 0, but a NaN score at a masked position must not survive either.
        e = e.masked_fill(~mask, 0.0)
    return _normalize(e, e.sum(dim=dim, keepdim=True))


def segment_softmax(
    scores: Tensor,
    offsets: Tensor | None = None,
    *,
    segment_ids: Tensor | None = None,
    num_segments: int | None = None,
) -> Tensor:
    """Softmax over the rows of each segment of packed ``scores``.

    Segment ``b`` is ``scores[offsets[b]:offsets[b+1]]``; the softmax runs along dim 0 within it, independently for
    every trailing index (heads, queries). Equal to a dense masked softmax over the padded scores.

    Args:
        scores: ``[N, *]``.
        offsets: ``[B+1]``, from 0 to N, non-decreasing. Give this, or ``segment_ids`` and ``num_segments``.
        segment_ids: ``[N]`` int64, sorted or not: the segment each row belongs to.
        num_segments: ``B``, with ``segment_ids``.

    Returns:
        ``[N, *]`` weights in :func:`compute_dtype` of ``scores``.
    """
    if segment_ids is None:
        if offsets is None:
            raise ValueError("segment_softmax: pass offsets [B+1], or segment_ids [N] with num_segments")
        _, lengths = check_offsets(offsets, scores.shape[0], scores.device)
        segment_ids, num_segments = segment_ids_from_lengths(lengths, scores.shape[0]), lengths.shape[0]
    elif num_segments is None:
        raise ValueError("segment_softmax: num_segments is required with segment_ids")
    elif segment_ids.shape != scores.shape[:1]:
        raise ValueError(f"segment_ids: expected shape [N] = [{scores.shape[0]}], got {tuple(segment_ids.shape)}")
    s = scores.to(compute_dtype(scores.dtype))
    index = segment_ids.view(-1, *([1] * (s.dim() - 1))).expand_as(s)
    seg_max = s.new_full((num_segments, *s.shape[1:]), float("-inf"))
    seg_max = seg_max.scatter_reduce(0, index, s.detach(), reduce="amax", include_self=True)
    e = _stable_exp(s, seg_max[segment_ids])
    total = s.new_zeros((num_segments, *s.shape[1:])).index_add(0, segment_ids, e)
    return _normalize(e, total[segment_ids])
