"""Functional attention pooling: scores, the set softmax and the weighted sum, with one numerics policy."""

from attnpool.functional.pool import (
    attention_pool,
    channel_softmax_pool,
    max_pool,
    mean_pool,
    softmax_pool,
    sum_pool,
)
from attnpool.functional.scores import additive_score, bilinear_score, dot_score, gated_score
from attnpool.functional.softmax import masked_softmax, segment_softmax

__all__ = [
    "additive_score",
    "attention_pool",
    "bilinear_score",
    "channel_softmax_pool",
    "dot_score",
    "gated_score",
    "masked_softmax",
    "max_pool",
    "mean_pool",
    "segment_softmax",
    "softmax_pool",
    "sum_pool",
]
