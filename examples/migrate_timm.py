"""Migrating from timm's AttentionPoolLatent (the SigLIP MAP head) to attnpool.nn.MAPHead.

Run: python examples/migrate_timm.py (CPU, a few seconds). Every claim is asserted.
"""

import torch
from _peers import peer_module  # in your code: from timm.layers import AttentionPoolLatent

AttentionPoolLatent = peer_module("timm", "layers.attention_pool").AttentionPoolLatent
torch.manual_seed(0)

# --8<-- [start:before]
# Before: timm's head over [B, N, D] tokens; it has no notion of padding of its own.
timm_head = AttentionPoolLatent(64, num_heads=4, norm_layer=torch.nn.LayerNorm).eval()
torch.nn.init.normal_(timm_head.latent)              # timm starts the latent at 0; any trained value will do
tokens = torch.randn(3, 10, 64)
lengths = torch.tensor([10, 7, 4])
keep = torch.arange(10) < lengths[:, None]           # [B, N], True = a real token
with torch.no_grad():
    timm_full = timm_head(tokens)                    # attends to every position, padding included
    # the right way to mask timm: an SDPA mask shaped [B, 1, 1, N]
    timm_masked = timm_head(tokens, attn_mask=keep[:, None, None, :])
# --8<-- [end:before]

# --8<-- [start:convert]
from attnpool.convert import from_timm_attention_pool_latent, keep_mask_from_sdpa_mask
from attnpool.nn import MAPHead

head = from_timm_attention_pool_latent(timm_head)    # a MAPHead with timm's weights, in eval mode
assert isinstance(head, MAPHead) and not head.training
# --8<-- [end:convert]

# --8<-- [start:after]
with torch.no_grad():
    out = head(tokens, keep)                         # padded + mask [B, N], True = keep
    packed = head(tokens[keep], lengths=lengths)     # or packed [N_total, D] + lengths, no padding at all
# Same outputs as timm given the correctly shaped mask, on every set.
assert torch.allclose(out, timm_masked, atol=1e-5)
assert torch.allclose(packed, out, atol=1e-5)
# Without a mask timm pools the padding: its output is the MAP head's only for the set of full length.
assert torch.allclose(timm_full[0], out[0], atol=1e-5)
assert not torch.allclose(timm_full[1], out[1], atol=1e-3)
# An SDPA-style mask converts to attnpool's [B, N] keep mask.
assert torch.equal(keep_mask_from_sdpa_mask(keep[:, None, None, :], 3, 10), keep)
# --8<-- [end:after]

# --8<-- [start:quirks]
# Quirk 1: a [B, N] bool mask handed to timm unchanged broadcasts as [1, 1, B, N] against the logits [B, H, 1, N]:
# an error here (B = 3 != latent_len = 1) and, when latent_len == B, a silent mix-up of latents and sets.
try:
    timm_head(tokens, attn_mask=keep)
    raise AssertionError("expected timm to reject a [B, N] mask")
except RuntimeError:
    pass
# Quirk 2: timm reads the padding; a NaN there turns that set's whole output NaN. attnpool never reads masked values.
poisoned = tokens.clone()
poisoned[~keep] = float("nan")
with torch.no_grad():
    timm_poisoned = timm_head(poisoned, attn_mask=keep[:, None, None, :])
    assert timm_poisoned[1:].isnan().all() and timm_poisoned[0].isfinite().all()  # sets 1 and 2 have padding
    assert torch.equal(head(poisoned, keep), out)
# Quirk 3: an empty set. attnpool gives exactly 0; timm gives whatever its SDPA backend gives for a row with no
# allowed position (zero attention, then biases and the MLP on torch 2.13's CPU; NaN on other backends).
empty = torch.zeros(1, 10, dtype=torch.bool)
with torch.no_grad():
    assert (head(tokens[:1], empty) == 0).all()
# --8<-- [end:quirks]

print("migrate_timm: all assertions passed")
