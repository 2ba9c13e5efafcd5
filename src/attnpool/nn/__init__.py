"""Pooling modules. Every module takes padded + mask, packed + offsets/lengths, or a list of tensors."""

from attnpool.nn.attention_pool import AttentionPool
from attnpool.nn.base import SetPool, register_weights_hook
from attnpool.nn.baselines import ClsPool, LastTokenPool, MaxPool, MeanPool, SumPool
from attnpool.nn.gated_attention_pool import GatedAttentionPool
from attnpool.nn.scores import AdditiveScore, BilinearScore

__all__ = [
    "AdditiveScore",
    "AttentionPool",
    "BilinearScore",
    "ClsPool",
    "GatedAttentionPool",
    "LastTokenPool",
    "MaxPool",
    "MeanPool",
    "SetPool",
    "SumPool",
    "register_weights_hook",
]
