"""The reference kernel: the contract every fused kernel is tested against.

``segment_attention_pool(x, offsets, query, scale)`` pools packed sets with dot-product scores over the full
feature dim::

    out[b, m] = sum_{i in set b} softmax_i(scale * x_i . query[g(b), m]) * x_i      (0 for an empty set)
    lse[b, m] = log sum_{i in set b} exp(scale * x_i . query[g(b), m])              (-inf for an empty set)

with ``g(b) = 0`` when ``query`` has a leading dim of 1 and ``b`` otherwise. Every attention pool with a dot score
and linear key/value projections reduces to this (the projections fold onto the query and the output, see
:mod:`attnpool.nn.attention_pool`), so this one primitive is what the fused CPU and Triton kernels implement.

Shapes: ``x [N, D]``, ``offsets [B+1]`` int64, ``query [1 or B, M, D]`` -> ``out [B, M, D]`` in ``x.dtype``,
``lse [B, M]`` float32 (float64 for double input). The weights of element ``i`` are ``exp(scale * x_i . q - lse)``.

``segment_softmax_pool(x, offsets, scores)`` is the same pooling with the logits given instead of computed, for
every score that is not a dot product with the pooled rows (gated, additive, or a caller's own): ``scores [N, M]``
replaces ``scale * x_i . query[g(b), m]`` in both formulas above, and ``out``/``lse`` have the same shapes. The
gradient reaches ``x`` through the weighted sum and ``scores`` through the softmax.

``segment_channel_softmax_pool(x, offsets, t)`` is the per-channel variant (PyG's ``SoftmaxAggregation``): every
channel ``c`` of every set has its own softmax over the set's scalars ``t_c x_ic``::

    out[b, c] = sum_{i in set b} softmax_i(t_c * x_ic) * x_ic                                 (0 for an empty set)
    lse[b, c] = log sum_{i in set b} exp(t_c * x_ic)                                         (-inf for an empty set)

Shapes: ``x [N, D]``, ``offsets [B+1]``, ``t [D]`` -> ``out [B, D]`` in ``x.dtype``, ``lse [B, D]`` in the compute
dtype; the weight of element ``i`` in channel ``c`` is ``exp(t_c x_ic - lse[b, c])``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool._sets import segment_ids
from attnpool.functional.softmax import compute_dtype

__all__ = ["segment_attention_pool", "segment_channel_softmax_pool", "segment_softmax_pool"]


def segment_attention_pool(x: Tensor, offsets: Tensor, query: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(x.dtype)
    n, _ = x.shape
    b = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    seg = segment_ids(lengths, n)
    xc, qc = x.to(cdt), query.to(cdt)
    if qc.shape[0] == 1:
        logits = (xc @ qc[0].T) * scale  # [N, M]
    else:
        logits = torch.einsum("nd,nmd->nm", xc, qc[seg]) * scale
    return _pool_logits(xc, seg, b, logits, x.dtype)


def segment_softmax_pool(x: Tensor, offsets: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(x.dtype)
    n, _ = x.shape
    b = offsets.shape[0] - 1
    seg = segment_ids(offsets[1:] - offsets[:-1], n)
    return _pool_logits(x.to(cdt), seg, b, scores.to(cdt), x.dtype)


def _pool_logits(xc: Tensor, seg: Tensor, b: int, logits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    m = logits.new_full((b, logits.shape[1]), float("-inf"))
    m = m.scatter_reduce(0, seg.unsqueeze(1).expand_as(logits), logits.detach(), "amax", include_self=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - shift[seg])
    total = logits.new_zeros(b, logits.shape[1]).index_add(0, seg, e)
    w = e / torch.where(total > 0, total, torch.ones_like(total))[seg]
    out = xc.new_zeros(b, logits.shape[1], xc.shape[1]).index_add(0, seg, w.unsqueeze(-1) * xc.unsqueeze(1))
    lse = torch.log(total) + shift
    return out.to(dtype), lse


def segment_channel_softmax_pool(x: Tensor, offsets: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(x.dtype)
    n, d = x.shape
    b = offsets.shape[0] - 1
    seg = segment_ids(offsets[1:] - offsets[:-1], n)
    xc = x.to(cdt)
    logits = xc * t.to(cdt)
    m = logits.new_full((b, d), float("-inf"))
    m = m.scatter_reduce(0, seg.unsqueeze(1).expand_as(logits), logits.detach(), "amax", include_self=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - shift[seg])
    total = logits.new_zeros(b, d).index_add(0, seg, e)
    out = logits.new_zeros(b, d).index_add(0, seg, e * xc) / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.log(total) + shift
    return out.to(x.dtype), lse
