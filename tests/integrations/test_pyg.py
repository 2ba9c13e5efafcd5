"""AttnpoolAggregation: attnpool pooling as a PyG aggregation, in message passing (aggr=) and as a readout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric", reason="torch_geometric is not installed (pip install torch_geometric==2.8.1)")
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GraphConv, SAGEConv

from attnpool.hub import from_pretrained, save_pretrained
from attnpool.integrations.pyg import AttnpoolAggregation
from attnpool.nn import ISAB, PMA, SAB, AttentionPool, GatedAttentionPool, MeanPool, register_weights_hook

F = 8


def random_graphs(seed: int = 0, sizes: tuple[int, ...] = (5, 1, 7, 3)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        e = 2 * n
        edge_index = torch.randint(0, n, (2, e), generator=g)
        graphs.append(Data(x=torch.randn(n, F, generator=g), edge_index=edge_index))
    return Batch.from_data_list(graphs)


def neighbour_sets(x: torch.Tensor, edge_index: torch.Tensor) -> list[torch.Tensor]:
    """For each node, the features of its in-neighbours (the messages x_j that SAGEConv/GraphConv aggregate)."""
    src, dst = edge_index
    return [x[src[dst == i]] for i in range(x.shape[0])]


def test_sage_conv_with_mean_pool_equals_pyg_mean():
    torch.manual_seed(0)
    ours = SAGEConv(F, 6, aggr=AttnpoolAggregation(MeanPool()))
    theirs = SAGEConv(F, 6, aggr="mean")
    theirs.load_state_dict(ours.state_dict())
    data = random_graphs()
    torch.testing.assert_close(ours(data.x, data.edge_index), theirs(data.x, data.edge_index), rtol=0, atol=1e-6)


@pytest.mark.parametrize("conv_cls", [SAGEConv, GraphConv])
def test_message_passing_pools_each_nodes_neighbours(conv_cls):
    torch.manual_seed(0)
    pool = AttentionPool(F, num_heads=2, key_proj=True, value_proj=True)
    conv = conv_cls(F, 6, aggr=AttnpoolAggregation(pool))
    data = random_graphs()
    out = conv(data.x, data.edge_index)
    # the aggregation by hand: the same pool over each node's neighbour set (isolated nodes get 0)
    with torch.no_grad():
        pooled = torch.stack(list(pool(neighbour_sets(data.x, data.edge_index))))
        if conv_cls is SAGEConv:
            want = conv.lin_l(pooled) + conv.lin_r(data.x)
        else:
            want = conv.lin_rel(pooled) + conv.lin_root(data.x)
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    assert pool.key_proj.weight.grad is not None and pool.key_proj.weight.grad.abs().sum() > 0


def test_small_gnn_trains():
    torch.manual_seed(0)

    class GNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = SAGEConv(F, 16, aggr=AttnpoolAggregation(GatedAttentionPool(F, 8)))
            self.conv2 = SAGEConv(16, 16, aggr=AttnpoolAggregation(AttentionPool(16, num_heads=4, key_proj=True)))
            self.readout = AttnpoolAggregation(PMA(16, 2, 4), multi_query="concat")
            self.head = nn.Linear(32, 1)

        def forward(self, data: Batch) -> torch.Tensor:
            h = self.conv1(data.x, data.edge_index).relu()
            h = self.conv2(h, data.edge_index).relu()
            return self.head(self.readout(h, data.batch, dim_size=data.num_graphs)).squeeze(-1)

    model = GNN()
    data = random_graphs(sizes=(6, 4, 9, 3, 5, 7))
    target = torch.randn(data.num_graphs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(data) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_readout_matches_pooling_each_graph_and_ignores_node_order():
    torch.manual_seed(0)
    pool = AttentionPool(F, num_queries=3, num_heads=2, key_proj=True)
    readout = AttnpoolAggregation(pool, multi_query="mean")
    data = random_graphs()
    with torch.no_grad():
        out = readout(data.x, data.batch)
        per_graph = torch.stack(list(pool([data.x[data.batch == i] for i in range(data.num_graphs)]))).mean(1)
        torch.testing.assert_close(out, per_graph, rtol=0, atol=1e-6)
        perm = torch.randperm(data.x.shape[0])  # unsorted index
        torch.testing.assert_close(readout(data.x[perm], data.batch[perm]), out, rtol=0, atol=1e-6)
        torch.testing.assert_close(readout(data.x, ptr=data.ptr), out, rtol=0, atol=1e-6)
        concat = AttnpoolAggregation(pool)(data.x, data.batch)
        assert concat.shape == (data.num_graphs, 3 * F)
        with_empty = readout(data.x, data.batch, dim_size=data.num_graphs + 2)
        assert torch.equal(with_empty[-2:], torch.zeros(2, F))


def test_set_transformer_readout_with_encoders_and_decoders():
    torch.manual_seed(0)
    readout = AttnpoolAggregation(PMA(F, 2, 2), encoders=[SAB(F, 2), ISAB(F, 3, 2)], decoders=[SAB(F, 2)]).eval()
    data = random_graphs()
    with torch.no_grad():
        out = readout(data.x, data.batch, dim_size=data.num_graphs + 1)
        for i in range(data.num_graphs):
            h = data.x[data.batch == i][None]
            for m in readout.encoders:
                h = m(h)
            want = readout.decoders[0](readout.pool(h)).flatten(1)[0]
            torch.testing.assert_close(out[i], want, rtol=0, atol=1e-6)
        assert torch.equal(out[-1], torch.zeros(2 * F))


def test_weights_reach_the_hook():
    pool = AttentionPool(F, num_heads=2)
    seen = []
    with register_weights_hook(lambda m, w, sets: seen.append((w.shape, sets.batch_size)), [pool]):
        AttnpoolAggregation(pool)(torch.randn(6, F), torch.tensor([0, 0, 1, 2, 2, 2]))
    assert seen == [((6, 2, 1), 3)]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    aggr = AttnpoolAggregation(PMA(F, 2, 2), encoders=[SAB(F, 2)], decoders=[SAB(F, 2)], multi_query="mean").eval()
    save_pretrained(aggr, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, AttnpoolAggregation) and loaded.multi_query == "mean"
    data = random_graphs()
    with torch.no_grad():
        assert torch.equal(loaded(data.x, data.batch), aggr(data.x, data.batch))


def test_bad_arguments():
    with pytest.raises(TypeError, match="pool"):
        AttnpoolAggregation(nn.Linear(F, F))
    with pytest.raises(ValueError, match="multi_query"):
        AttnpoolAggregation(MeanPool(), multi_query="sum")
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        AttnpoolAggregation(MeanPool())(torch.randn(2, 3, F), torch.tensor([0, 1, 1]), dim=1)
