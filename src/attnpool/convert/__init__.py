"""Import pooling layers from other libraries, weights included, as attnpool modules with the same outputs.

Every converter builds the attnpool module that computes what the peer computes, copies the peer's weights into
it, and returns it in eval mode on the weights' device and dtype. Outputs agree to float32 rounding (the tests
check 1e-6 against the peers themselves on random weights, masked inputs included where the peer takes a mask).
Where a peer's behaviour is a quirk (a scale, a residual, a mask convention), the conversion reproduces it through
a switch of the attnpool module, and the converter's docstring says what the quirk is and what attnpool does
without it. A peer configuration that no attnpool module computes exactly raises NotImplementedError naming it,
rather than converting to something close.

Converters take the peer's module, or its state dict (with the configuration a state dict does not record, such
as ``num_heads``), and never import the peer's package themselves.

* timm ``AttentionPoolLatent``: :func:`from_timm_attention_pool_latent` -> ``MAPHead`` (``AttentionPool`` for
  ``out_features=0``), and :func:`keep_mask_from_sdpa_mask` for its masks;
* open_clip ``AttentionalPooler``: :func:`from_open_clip_attentional_pooler` -> ``LatentCrossAttention``;
* PyG ``AttentionalAggregation``: :func:`from_pyg_attentional_aggregation` -> ``GatedAttentionPool`` or
  ``AttentionPool``;
* PyG ``SoftmaxAggregation``: :func:`from_pyg_softmax_aggregation` -> ``ChannelSoftmaxPool``;
* PyG ``SetTransformerAggregation``: :func:`from_pyg_set_transformer_aggregation` -> ``SAB`` encoders, ``PMA``,
  ``SAB`` decoders (the PyG converters return an ``AttnpoolAggregation`` drop-in holding the attnpool modules);
* ``torch.nn.MultiheadAttention`` used as a pooler: :func:`from_multihead_attention` -> ``AttentionPool``;
* the Set Transformer reference code's ``MAB``/``SAB``/``ISAB``/``PMA``: :func:`from_set_transformer_reference`
  -> ``MAB``/``SAB``/``ISAB``/``PMA`` with the reference's quirks switched on.
"""

from attnpool.convert.multihead_attention import from_multihead_attention
from attnpool.convert.open_clip_pooler import from_open_clip_attentional_pooler
from attnpool.convert.pyg_aggregations import (
    from_pyg_attentional_aggregation,
    from_pyg_set_transformer_aggregation,
    from_pyg_softmax_aggregation,
)
from attnpool.convert.set_transformer_reference import from_set_transformer_reference
from attnpool.convert.timm_attention_pool import from_timm_attention_pool_latent, keep_mask_from_sdpa_mask

__all__ = [
    "from_multihead_attention",
    "from_open_clip_attentional_pooler",
    "from_pyg_attentional_aggregation",
    "from_pyg_set_transformer_aggregation",
    "from_pyg_softmax_aggregation",
    "from_set_transformer_reference",
    "from_timm_attention_pool_latent",
    "keep_mask_from_sdpa_mask",
]
