"""The baselines attention pooling must beat: mean, max, sum, the [CLS] token and the last token."""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool._sets import Sets
from attnpool.functional.pool import max_pool_sets, mean_pool_sets, sum_pool_sets
from attnpool.nn.base import SetPool

__all__ = ["ClsPool", "LastTokenPool", "MaxPool", "MeanPool", "SumPool"]


class MeanPool(SetPool):
    r""":math:`\frac{1}{|S|}\sum_{i \in S} x_i` over the kept elements; ``[B, D]`` out, 0 for an empty set."""

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return mean_pool_sets(sets).to(sets.values.dtype), None


class SumPool(SetPool):
    r""":math:`\sum_{i \in S} x_i` over the kept elements (Deep Sets, Zaheer et al. 2017); ``[B, D]`` out."""

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return sum_pool_sets(sets).to(sets.values.dtype), None


class MaxPool(SetPool):
    r"""Element-wise :math:`\max_{i \in S} x_i` over the kept elements; ``[B, D]`` out, 0 for an empty set."""

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return max_pool_sets(sets).to(sets.values.dtype), None


def _pick(sets: Sets, last: bool) -> Tensor:
    """The first (or last) kept element of each set, ``[B, D]``; masked positions are never read."""
    x = sets.values
    if sets.is_padded:
        b, l, _ = x.shape
        if l == 0:
            return x.new_zeros(b, x.shape[-1])
        keep = sets.keep_mask().to(torch.uint8)
        # argmax returns the first maximal index; flipping gives the last kept one
        idx = (l - 1 - keep.flip(1).argmax(1)) if last else keep.argmax(1)
        return x[torch.arange(b, device=x.device), idx]
    assert sets.offsets is not None
    idx = (sets.offsets[1:] - 1) if last else sets.offsets[:-1]
    return x[idx.clamp(0, max(x.shape[0] - 1, 0))] if x.shape[0] else x.new_zeros(sets.batch_size, x.shape[-1])


class ClsPool(SetPool):
    """The [CLS] token: the first kept element of each set, so left padding is handled too (``[B, D]`` out).

    Devlin et al., *BERT*, NAACL 2019. Empty sets give 0."""

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return _pick(sets, last=False), None


class LastTokenPool(SetPool):
    """The last kept element of each set: the usual sentence embedding of decoder-only models, correct for left
    and right padding alike (``[B, D]`` out). Empty sets give 0."""

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return _pick(sets, last=True), None
