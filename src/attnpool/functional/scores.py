"""Score functions: how much a query attends to each element.

Every score follows one broadcasting convention, so that the pooling code can call any of them, a user's callable
included, on padded and packed input alike:

    score(query, keys) -> logits
    query:  [G or 1, H, Q, d_q]
    keys:   [G, H, L, d_k]
    logits: [G, H, Q, L]

``G`` groups (sets, or single elements), ``H`` heads, ``Q`` queries, ``L`` elements. Scaling by ``scale /
temperature`` and the softmax happen afterwards, in the pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["additive_score", "bilinear_score", "dot_score", "gated_score"]


def dot_score(query: Tensor, keys: Tensor) -> Tensor:
    """``q · k``. With the pooling's default ``scale = 1/sqrt(d_k)`` this is scaled dot-product attention
    (Vaswani et al., 2017)."""
    return query @ keys.transpose(-1, -2)


def bilinear_score(query: Tensor, keys: Tensor, weight: Tensor) -> Tensor:
    """``q^T W k`` with ``weight`` ``W`` of shape ``[d_q, d_k]`` (Luong et al., 2015, "general")."""
    return (query @ weight) @ keys.transpose(-1, -2)


def additive_score(
    query: Tensor,
    keys: Tensor,
    query_weight: Tensor,
    key_weight: Tensor,
    vector: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """``w^T tanh(W q + U k + b)`` (Bahdanau et al., 2015).

    Args:
        query_weight: ``W``, ``[A, d_q]``.
        key_weight: ``U``, ``[A, d_k]``.
        vector: ``w``, ``[A]``.
        bias: ``b``, ``[A]`` or None.
    """
    q = query @ query_weight.T  # [., H, Q, A]
    k = keys @ key_weight.T  # [G, H, L, A]
    if bias is not None:
        k = k + bias
    return torch.tanh(q.unsqueeze(-2) + k.unsqueeze(-3)) @ vector


def gated_score(
    keys: Tensor,
    tanh_weight: Tensor,
    tanh_bias: Tensor | None,
    sigmoid_weight: Tensor | None,
    sigmoid_bias: Tensor | None,
    vector: Tensor,
) -> Tensor:
    """``w^T (tanh(V k + b_V) ⊙ sigmoid(U k + b_U))`` (Ilse et al., 2018); without ``U`` it is their plain
    ``w^T tanh(V k + b_V)``. There is no external query, so unlike the other scores this one maps each element
    on its own: ``[..., d_k] -> [..., K]``, one column per attention branch (row of ``w``).

    Args:
        keys: ``[..., d_k]``.
        tanh_weight: ``V``, ``[A, d_k]``; ``tanh_bias`` ``[A]`` or None.
        sigmoid_weight: ``U``, ``[A, d_k]``, or None for the ungated score; ``sigmoid_bias`` ``[A]`` or None.
        vector: ``w``, ``[K, A]`` for ``K`` branches.

    Returns:
        ``[..., K]``.
    """
    h = torch.tanh(torch.nn.functional.linear(keys, tanh_weight, tanh_bias))
    if sigmoid_weight is not None:
        h = h * torch.sigmoid(torch.nn.functional.linear(keys, sigmoid_weight, sigmoid_bias))
    return h @ vector.T
