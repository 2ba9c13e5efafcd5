"""Quick start: the three input forms, returned weights, context queries, empty sets and the modules.

Run: python examples/quickstart.py (CPU, about a second). Every claim is asserted.
"""

import torch

import attnpool
from attnpool.functional import attention_pool, mean_pool

torch.manual_seed(0)

# --8<-- [start:padded]
# Padded + mask: 2 sets of at most 4 elements of size 8. True = keep, as Hugging Face's attention_mask.
x = torch.randn(2, 4, 8)
mask = torch.tensor([[True, True, True, False],
                     [True, True, False, False]])
query = torch.randn(8)                                   # one query shared by every set
out, w = attention_pool(x, query, mask=mask, return_weights=True)
assert out.shape == (2, 8) and w.shape == (2, 1, 1, 4)   # out [B, D], weights [B, H, Q, L]
assert torch.allclose(w.sum(-1), torch.ones(2, 1, 1))    # each set's weights sum to 1
assert (w[1, 0, 0, 2:] == 0).all()                       # padding gets exactly 0
# the output is the weighted sum of the kept elements
assert torch.allclose(out[0], (w[0, 0, 0, :, None] * x[0]).sum(0), atol=1e-6)
# --8<-- [end:padded]

# --8<-- [start:packed]
# Packed + offsets: 3 sets of sizes 3, 0 and 2 in one [N, D] tensor (set b is values[offsets[b]:offsets[b+1]]).
values = torch.randn(5, 8)
offsets = torch.tensor([0, 3, 3, 5])
out, w = attention_pool(values, query, offsets=offsets, return_weights=True)
assert out.shape == (3, 8) and w.shape == (5, 1, 1)      # out [B, D], weights [N, H, Q]
assert (out[1] == 0).all()                               # the empty set pools to exactly 0, never NaN
# lengths= is the same as offsets=
assert torch.equal(attention_pool(values, query, lengths=torch.tensor([3, 0, 2])), out)
# --8<-- [end:packed]

# --8<-- [start:list]
# A list of [L_i, D] tensors works too; the weights come back as a list of [H, Q, L_i].
out_list, w_list = attention_pool([x[0, :3], x[1, :2]], query, return_weights=True)
assert out_list.shape == (2, 8) and [t.shape for t in w_list] == [(1, 1, 3), (1, 1, 2)]
# the three forms agree: same sets, same result
assert torch.allclose(out_list, attention_pool(x, query, mask=mask), atol=1e-6)
# --8<-- [end:list]

# --8<-- [start:queries]
# Context queries: the same sets pooled differently for different queries (a question embedding, say).
questions = torch.randn(3, 8)                            # [Q, D]: 3 queries, each applied to every set
out, w = attention_pool(x, questions, mask=mask, return_weights=True)
assert out.shape == (2, 3, 8) and w.shape == (2, 1, 3, 4)  # [B, Q, D], weights [B, H, Q, L]
per_set = torch.randn(2, 1, 8)                           # [B, 1, D]: one query per set
assert attention_pool(x, per_set, mask=mask).shape == (2, 1, 8)
# a zero query gives uniform weights: attention pooling contains mean pooling
assert torch.allclose(attention_pool(x, torch.zeros(8), mask=mask), mean_pool(x, mask=mask), atol=1e-6)
# --8<-- [end:queries]

# --8<-- [start:modules]
# Modules take the same three input forms.
pool = attnpool.nn.AttentionPool(8, num_queries=0, num_heads=2)      # no learned query: pass one at call time
out, w = pool(x, mask, query=torch.randn(2, 8), return_weights=True)  # a 2-D query is one per set
assert out.shape == (2, 8) and w.shape == (2, 2, 1, 4)
mil = attnpool.nn.GatedAttentionPool(8, hidden_dim=16)              # Ilse et al.'s gated attention MIL pooling
out, w = mil(values, offsets=offsets, return_weights=True)
assert out.shape == (3, 8) and w.shape == (5, 1, 1)
assert (out[1] == 0).all()                                          # empty set: 0 from modules too
# --8<-- [end:modules]

# --8<-- [start:numerics]
# Half precision: softmax runs in float32, the output keeps the input's dtype, the weights are float32.
out, w = attention_pool(x.bfloat16(), query.bfloat16(), mask=mask, return_weights=True)
assert out.dtype == torch.bfloat16 and w.dtype == torch.float32

# Masked values never leak, even NaN: not into the output, not into the gradient.
poisoned = x.clone()
poisoned[~mask] = float("nan")
poisoned.requires_grad_(True)
out = attention_pool(poisoned, query, mask=mask)
out.sum().backward()
assert torch.equal(out, attention_pool(x, query, mask=mask))
assert poisoned.grad.isfinite().all() and (poisoned.grad[~mask] == 0).all()
# --8<-- [end:numerics]

print("quickstart: all assertions passed")
