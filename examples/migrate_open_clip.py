"""Migrating from open_clip's AttentionalPooler (CoCa) to attnpool.nn.LatentCrossAttention.

Run: python examples/migrate_open_clip.py (CPU, a few seconds). Every claim is asserted.
"""

import torch
from _peers import peer_module  # in your code: from open_clip.transformer import AttentionalPooler

AttentionalPooler = peer_module("open_clip", "transformer").AttentionalPooler
torch.manual_seed(0)

# --8<-- [start:before]
# Before: 16 learned queries attend to [B, N, context_dim] image tokens; no mask, so a padded batch pools padding.
clip_pool = AttentionalPooler(d_model=64, context_dim=48, n_head=4, n_queries=16).eval()
tokens = torch.randn(2, 9, 48)
with torch.no_grad():
    clip_out = clip_pool(tokens)                     # [B, 16, 64]
# --8<-- [end:before]

# --8<-- [start:convert]
from attnpool.convert import from_open_clip_attentional_pooler
from attnpool.nn import LatentCrossAttention

pool = from_open_clip_attentional_pooler(clip_pool)  # one cross-attention block, residual and MLP switched off
assert isinstance(pool, LatentCrossAttention)
# --8<-- [end:convert]

# --8<-- [start:after]
with torch.no_grad():
    assert torch.allclose(pool(tokens), clip_out, atol=1e-5)
    # What open_clip cannot do: sets of different sizes in one batch. Here set 1 has 5 real tokens.
    keep = torch.arange(9) < torch.tensor([[9], [5]])
    out = pool(tokens, keep)
    assert torch.allclose(out[1], clip_pool(tokens[1:, :5])[0], atol=1e-5)  # = open_clip run on the set alone
    # packed input, and an empty set, which gives exactly 0
    packed = pool(tokens[keep], lengths=torch.tensor([9, 5, 0]))
    assert torch.allclose(packed[:2], out, atol=1e-5) and (packed[2] == 0).all()
# --8<-- [end:after]

print("migrate_open_clip: all assertions passed")
