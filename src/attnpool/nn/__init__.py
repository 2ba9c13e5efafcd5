"""Pooling modules. Every module takes padded + mask, packed + offsets/lengths, or a list of tensors."""

from attnpool.nn.attention_pool import AttentionPool
from attnpool.nn.base import SetPool, register_weights_hook
from attnpool.nn.baselines import ClsPool, LastTokenPool, MaxPool, MeanPool, SumPool
from attnpool.nn.channel_softmax_pool import ChannelSoftmaxPool
from attnpool.nn.gated_attention_pool import GatedAttentionPool
from attnpool.nn.latent_cross_attention import LatentCrossAttention
from attnpool.nn.map_head import MAPHead
from attnpool.nn.scores import AdditiveScore, BilinearScore
from attnpool.nn.set_transformer import ISAB, MAB, PMA, SAB, SetToSet

__all__ = [
    "ISAB",
    "MAB",
    "PMA",
    "SAB",
    "AdditiveScore",
    "AttentionPool",
    "BilinearScore",
    "ChannelSoftmaxPool",
    "ClsPool",
    "GatedAttentionPool",
    "LastTokenPool",
    "LatentCrossAttention",
    "MAPHead",
    "MaxPool",
    "MeanPool",
    "SetPool",
    "SetToSet",
    "SumPool",
    "register_weights_hook",
]
