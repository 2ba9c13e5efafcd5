"""Softmax pooling of every channel on its own (PyG's ``SoftmaxAggregation``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnpool._sets import Sets
from attnpool.functional.pool import channel_softmax_pool_sets
from attnpool.nn.base import SetPool

__all__ = ["ChannelSoftmaxPool"]


class ChannelSoftmaxPool(SetPool):
    r"""Each channel of each set pooled with its own softmax over the set:

    .. math::
        \mathrm{out}_{c} = \sum_{i \in S} \mathrm{softmax}_i(t_c\, x_{ic})\, x_{ic}

    An attention pool whose score is the element's own value, channel by channel: ``t = 0`` is the mean, large
    ``t`` tends to the max and negative ``t`` to the min, so a learned ``t`` interpolates between them (Li et al.,
    *DeeperGCN: All You Need to Train Deeper GCNs*, 2020). Same function as PyG's ``SoftmaxAggregation(t, learn,
    channels)`` (its ``semi_grad`` option is not offered), with packed CPU input on a fused one-pass kernel.

    Args:
        t: initial inverse temperature.
        learn: learn ``t``.
        channels: ``1`` for one ``t`` shared by every channel, or ``D`` for one per channel (``learn`` only).

    Shapes:
        * input: the forms of :class:`~attnpool.nn.SetPool` (padded + mask, packed + offsets, a list);
        * output: ``[B, D]``, 0 for an empty set;
        * weights (``return_weights=True``): one "query" per channel, ``H = 1``: ``[B, 1, D, L]`` padded,
          ``[N, 1, D]`` packed, a list of ``[1, D, L_i]``; each channel's weights sum to 1 over a non-empty set.
    """

    has_weights = True

    def __init__(self, t: float = 1.0, learn: bool = False, channels: int = 1, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not (isinstance(t, (int, float)) and math.isfinite(t)):
            raise ValueError(f"t: expected a finite number, got {t!r}")
        if channels < 1:
            raise ValueError(f"channels: expected >= 1, got {channels}")
        if channels > 1 and not learn:
            raise ValueError(f"channels: one t per channel (channels = {channels}) needs learn=True")
        self.initial_t, self.learn, self.channels = float(t), learn, channels
        value = torch.empty(channels, device=device, dtype=dtype)
        if learn:
            self.t = nn.Parameter(value)
        else:
            self.register_buffer("t", value, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.t.fill_(self.initial_t)

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if self.channels not in (1, sets.dim):
            raise ValueError(f"x: expected D = channels = {self.channels}, got D = {sets.dim}")
        return channel_softmax_pool_sets(sets, self.t, need_weights)

    def extra_repr(self) -> str:
        return f"t={self.initial_t:g}, learn={self.learn}, channels={self.channels}"
