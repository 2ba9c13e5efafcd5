"""Migrating from torch.nn.MultiheadAttention used as a pooler (learned queries over a set) to AttentionPool.

Run: python examples/migrate_multihead_attention.py (CPU, about a second). Every claim is asserted.
"""

import torch
from torch import nn

torch.manual_seed(0)

# --8<-- [start:before]
# Before: a learned query attends to the set through nn.MultiheadAttention; key_padding_mask is True for PADDING.
mha = nn.MultiheadAttention(32, num_heads=4, batch_first=True).eval()
learned_query = nn.Parameter(torch.randn(1, 1, 32))
x = torch.randn(3, 6, 32)
padding = torch.arange(6) >= torch.tensor([[6], [2], [0]])   # set 2 is empty: every position is padding
with torch.no_grad():
    mha_out = mha(learned_query.expand(3, -1, -1), x, x, key_padding_mask=padding)[0][:, 0]   # [B, D]
# --8<-- [end:before]

# --8<-- [start:convert]
from attnpool.convert import from_multihead_attention

pool = from_multihead_attention(mha, query=learned_query)   # AttentionPool with all four projections
# --8<-- [end:convert]

# --8<-- [start:after]
keep = ~padding                                     # attnpool's mask is True for elements to KEEP
with torch.no_grad():
    out = pool(x, keep)
assert torch.allclose(out[:2], mha_out[:2], atol=1e-5)      # the same on every non-empty set
assert mha_out[2].isnan().all()                             # MHA: NaN for the fully masked set (need_weights=True)
assert (out[2] == 0).all()                                  # attnpool: exactly 0, with finite gradients
# A query given at call time instead of a learned one: pool(x, keep, query=q) = mha(q, x, x, ...).
ctx_pool = from_multihead_attention(mha)
q = torch.randn(3, 1, 32)
with torch.no_grad():
    assert torch.allclose(ctx_pool(x[:2], keep[:2], query=q[:2]),
                          mha(q[:2], x[:2], x[:2], key_padding_mask=padding[:2])[0], atol=1e-5)
# --8<-- [end:after]

print("migrate_multihead_attention: all assertions passed")
