"""Migrating from PyTorch Geometric's AttentionalAggregation, SoftmaxAggregation and SetTransformerAggregation.

Run: python examples/migrate_pyg.py (CPU, a few seconds). Every claim is asserted.
"""

import torch
from torch import nn
from torch_geometric.nn.aggr import AttentionalAggregation, SetTransformerAggregation, SoftmaxAggregation

torch.manual_seed(0)
# 4 graphs with 3, 0, 5 and 2 nodes (graph 1 is empty); node features of width 16
x = torch.randn(10, 16)
batch = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 3, 3])
ptr = torch.tensor([0, 3, 3, 8, 10])

# --8<-- [start:before]
# Before: PyG readouts, called as aggr(x, index) or aggr(x, ptr=ptr).
gate = AttentionalAggregation(gate_nn=nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)))
softmax = SoftmaxAggregation(learn=True, channels=16)
nn.init.normal_(softmax.t)                           # PyG starts t at 1; any trained value will do
set_transformer = SetTransformerAggregation(16, num_seed_points=2, num_encoder_blocks=1, num_decoder_blocks=1,
                                            heads=4, layer_norm=True).eval()
with torch.no_grad():
    pyg_gate = gate(x, batch, dim_size=4)
    pyg_softmax = softmax(x, ptr=ptr)
    pyg_st = set_transformer(x, batch, dim_size=4)  # [G, 2 * 16]: the two seeds concatenated
# --8<-- [end:before]

# --8<-- [start:convert]
from attnpool.convert import (
    from_pyg_attentional_aggregation,
    from_pyg_set_transformer_aggregation,
    from_pyg_softmax_aggregation,
)
from attnpool.nn import PMA, ChannelSoftmaxPool, GatedAttentionPool

new_gate = from_pyg_attentional_aggregation(gate)          # AttnpoolAggregation holding a GatedAttentionPool
new_softmax = from_pyg_softmax_aggregation(softmax)        # ... a ChannelSoftmaxPool with the same 16 t's
new_st = from_pyg_set_transformer_aggregation(set_transformer)  # ... SAB encoder, PMA, SAB decoder
assert isinstance(new_gate.pool, GatedAttentionPool) and isinstance(new_st.pool, PMA)
assert isinstance(new_softmax.pool, ChannelSoftmaxPool)
# --8<-- [end:convert]

# --8<-- [start:after]
with torch.no_grad():
    # Drop-ins: the same call, the same outputs.
    assert torch.allclose(new_gate(x, batch, dim_size=4), pyg_gate, atol=1e-5)
    assert torch.allclose(new_softmax(x, ptr=ptr), pyg_softmax, atol=1e-5)
    st = new_st(x, batch, dim_size=4)
    nonempty = torch.tensor([True, False, True, True])
    assert torch.allclose(st[nonempty], pyg_st[nonempty], atol=1e-5)
    # The empty graph: exactly 0 from attnpool; from PyG's SetTransformerAggregation (torch 2.13) a non-zero
    # vector made of its seeds, biases and LayerNorms.
    assert (st[1] == 0).all() and pyg_st[1].abs().sum() > 0
    # The index need not be sorted (PyG's SetTransformerAggregation needs a sorted index).
    perm = torch.randperm(10)
    assert torch.allclose(new_st(x[perm], batch[perm], dim_size=4), st, atol=1e-5)
    # .pool is a plain attnpool module: padded, packed or list input, with weights, without PyG.
    out, w = new_gate.pool(x, offsets=ptr, return_weights=True)
    assert torch.allclose(out, pyg_gate, atol=1e-5) and w.shape == (10, 1, 1)
# --8<-- [end:after]

print("migrate_pyg: all assertions passed")
