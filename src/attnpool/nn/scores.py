"""Parametrized score functions, as modules that follow the convention of :mod:`attnpool.functional.scores`:
``score(query [G|1, H, Q, d_q], keys [G, H, L, d_k]) -> [G, H, Q, L]``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnpool.functional.scores import additive_score, bilinear_score

__all__ = ["AdditiveScore", "BilinearScore"]


class AdditiveScore(nn.Module):
    r"""Additive (Bahdanau) score :math:`w^\top \tanh(W q + U k + b)`.

    Bahdanau, Cho & Bengio, *Neural Machine Translation by Jointly Learning to Align and Translate*, ICLR 2015.

    Args:
        query_dim: ``d_q``. key_dim: ``d_k``. hidden_dim: ``A``, the width of the tanh layer.
        bias: learn ``b``.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        self.query_weight = nn.Parameter(torch.empty(hidden_dim, query_dim, **kw))
        self.key_weight = nn.Parameter(torch.empty(hidden_dim, key_dim, **kw))
        self.vector = nn.Parameter(torch.empty(hidden_dim, **kw))
        self.bias = nn.Parameter(torch.empty(hidden_dim, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.query_weight)
        nn.init.xavier_uniform_(self.key_weight)
        nn.init.uniform_(self.vector, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return additive_score(query, keys, self.query_weight, self.key_weight, self.vector, self.bias)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}, " \
               f"bias={self.bias is not None}"


class BilinearScore(nn.Module):
    r"""Bilinear score :math:`q^\top W k` (Luong, Pham & Manning, *Effective Approaches to Attention-based Neural
    Machine Translation*, EMNLP 2015, the "general" score). ``W`` starts as the identity (scaled dot product when
    the dims agree) so that training starts from the plain score."""

    def __init__(self, query_dim: int, key_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.query_dim, self.key_dim = query_dim, key_dim
        self.weight = nn.Parameter(torch.empty(query_dim, key_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight.fill_diagonal_(1.0 / math.sqrt(self.key_dim))

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        return bilinear_score(query, keys, self.weight)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"
