"""Attention-based MIL pooling of Ilse, Tomczak & Welling (2018), plain and gated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnpool._sets import Sets
from attnpool.functional.pool import softmax_pool_sets
from attnpool.functional.scores import gated_score
from attnpool.nn.base import SetPool

__all__ = ["GatedAttentionPool"]


class GatedAttentionPool(SetPool):
    r"""The attention MIL pooling of Ilse et al., with no external query.

    .. math::
        z = \sum_i a_i h_i, \qquad a_i = \mathrm{softmax}_i\big(w^\top (\tanh(V h_i + b_V) \odot
        \mathrm{sigm}(U h_i + b_U))\big)

    With ``gated=False`` the gate :math:`\mathrm{sigm}(U h_i + b_U)` is dropped (their "attention" variant).
    ``w`` has one row per branch (``num_branches``), each giving one pooled vector.

    Ilse, Tomczak & Welling, *Attention-based Deep Multiple Instance Learning*, ICML 2018.

    Args:
        dim: ``D``, the instance embedding size.
        hidden_dim: ``A``, the width of ``V`` and ``U`` (128 in the paper).
        num_branches: ``K`` attention branches (1 in the paper).
        gated: use the sigmoid gate.
        dropout: attention dropout on the weights during training.

    Shapes: input in any form of :mod:`attnpool._sets`; output ``[B, D]`` (``[B, K, D]`` for ``K > 1``);
    weights ``[B, 1, K, L]`` padded, ``[N, 1, K]`` packed, or a list of ``[1, K, L_i]``.
    """

    has_weights = True

    def __init__(self, dim: int, hidden_dim: int = 128, num_branches: int = 1, *, gated: bool = True,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_branches, self.gated, self.dropout = (
            dim, hidden_dim, num_branches, gated, dropout)
        self.tanh_layer = nn.Linear(dim, hidden_dim, **kw)
        self.sigmoid_layer = nn.Linear(dim, hidden_dim, **kw) if gated else None
        self.vector = nn.Parameter(torch.empty(num_branches, hidden_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.tanh_layer.reset_parameters()
        if self.sigmoid_layer is not None:
            self.sigmoid_layer.reset_parameters()
        nn.init.xavier_uniform_(self.vector)

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        sig = self.sigmoid_layer
        scores = gated_score(sets.values, self.tanh_layer.weight, self.tanh_layer.bias,
                             None if sig is None else sig.weight, None if sig is None else sig.bias, self.vector)
        out, weights = softmax_pool_sets(sets, scores, dropout=self.dropout, training=self.training,
                                         need_weights=need_weights)
        out = out.to(sets.values.dtype)
        return (out.squeeze(1) if self.num_branches == 1 else out), weights

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_branches={self.num_branches}, "
                f"gated={self.gated}" + (f", dropout={self.dropout}" if self.dropout else ""))
