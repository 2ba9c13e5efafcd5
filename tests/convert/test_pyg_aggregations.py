"""PyG's AttentionalAggregation, SoftmaxAggregation and SetTransformerAggregation, converted: same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric", reason="torch_geometric is not installed (pip install torch_geometric==2.8.1)")
from torch_geometric.nn.aggr import (
    AttentionalAggregation,
    SetTransformerAggregation,
    SoftmaxAggregation,
)

from attnpool.convert import (
    from_pyg_attentional_aggregation,
    from_pyg_set_transformer_aggregation,
    from_pyg_softmax_aggregation,
)
from attnpool.integrations.pyg import AttnpoolAggregation
from attnpool.nn import PMA, SAB, AttentionPool, GatedAttentionPool

F = 16
# float32 rounding through a stack of blocks (outputs up to |x| ~ 3): 1e-6, absolute or relative to the output
STACK_PARITY = {"rtol": 1e-6, "atol": 1e-6}
GROUPS = 6  # groups 3 and 5 are empty


def groups(seed: int = 0, sort: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    index = torch.tensor([0, 4, 1, 0, 2, 4, 4, 0, 1, 2, 2, 0, 4, 1, 0])
    if sort:
        index = index.sort().values
    return torch.randn(index.shape[0], F, generator=g), index


def perturb_(module: nn.Module) -> nn.Module:
    """The peer's own initialization, with every vector (bias, LayerNorm affine, seed) moved off 0 and 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("gate", ["linear", "tanh-mlp", "tanh-mlp-nobias"])
def test_attentional_aggregation(gate):
    torch.manual_seed(0)
    if gate == "linear":
        gate_nn = nn.Linear(F, 1)
    else:
        gate_nn = nn.Sequential(nn.Linear(F, 8, bias=gate == "tanh-mlp"), nn.Tanh(), nn.Linear(8, 1))
    peer = perturb_(AttentionalAggregation(gate_nn))
    ours = from_pyg_attentional_aggregation(peer)
    assert isinstance(ours, AttnpoolAggregation)
    assert isinstance(ours.pool, AttentionPool if gate == "linear" else GatedAttentionPool)
    x, index = groups()
    with torch.no_grad():
        want = peer(x, index, dim_size=GROUPS)
        got = ours(x, index, dim_size=GROUPS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[3], torch.zeros(F))


def test_attentional_aggregation_unsupported_gates():
    with pytest.raises(NotImplementedError, match="gate_nn"):
        from_pyg_attentional_aggregation(AttentionalAggregation(nn.Sequential(nn.Linear(F, 8), nn.ReLU(),
                                                                              nn.Linear(8, 1))))
    with pytest.raises(NotImplementedError, match="gate_nn"):
        from_pyg_attentional_aggregation(AttentionalAggregation(nn.Linear(F, F)))  # feature-level gate
    with pytest.raises(NotImplementedError, match="nn"):
        from_pyg_attentional_aggregation(AttentionalAggregation(nn.Linear(F, 1), nn.Linear(F, F)))


@pytest.mark.parametrize(("t", "learn", "channels"), [(1.0, False, 1), (0.3, False, 1), (-2.0, False, 1),
                                                      (1.0, True, 1), (1.0, True, F)])
def test_softmax_aggregation(t, learn, channels):
    peer = SoftmaxAggregation(t=t, learn=learn, channels=channels)
    if learn:
        with torch.no_grad():
            peer.t.copy_(torch.randn(channels))
    ours = from_pyg_softmax_aggregation(peer)
    assert ours.pool.channels == channels and ours.pool.learn == learn
    assert [p.shape for p in ours.parameters()] == ([(channels,)] if learn else [])
    x, index = groups()
    with torch.no_grad():
        want = peer(x, index, dim_size=GROUPS)
        got = ours(x, index, dim_size=GROUPS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if learn:  # the same parameter tying, so the same gradient for t
        xg = x.clone().requires_grad_()
        peer(xg, index, dim_size=GROUPS).square().sum().backward()
        ours(x, index, dim_size=GROUPS).square().sum().backward()
        torch.testing.assert_close(next(ours.parameters()).grad, peer.t.grad, rtol=1e-5, atol=1e-5)


def test_softmax_aggregation_checks_the_width_and_refuses_semi_grad():
    with pytest.raises(ValueError, match="dim"):
        from_pyg_softmax_aggregation(SoftmaxAggregation(learn=True, channels=F), dim=F + 1)
    with pytest.raises(NotImplementedError, match="semi_grad"):
        from_pyg_softmax_aggregation(SoftmaxAggregation(semi_grad=True), dim=F)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize(("seeds", "heads", "enc", "dec"), [(1, 1, 1, 1), (3, 4, 2, 2), (2, 2, 0, 0)])
def test_set_transformer_aggregation(layer_norm, concat, seeds, heads, enc, dec):
    torch.manual_seed(0)
    peer = perturb_(SetTransformerAggregation(F, seeds, enc, dec, heads=heads, concat=concat,
                                              layer_norm=layer_norm))
    ours = from_pyg_set_transformer_aggregation(peer)
    assert isinstance(ours.pool, PMA) and all(isinstance(m, SAB) for m in [*ours.encoders, *ours.decoders])
    assert (len(ours.encoders), len(ours.decoders)) == (enc, dec)
    x, index = groups(sort=True)  # PyG's SetTransformerAggregation needs a sorted index
    nonempty = [0, 1, 2, 4]
    with torch.no_grad():
        want = peer(x, index, dim_size=GROUPS)
        got = ours(x, index, dim_size=GROUPS)
        assert got.shape == want.shape == (GROUPS, seeds * F if concat else F)
        torch.testing.assert_close(got[nonempty], want[nonempty], **STACK_PARITY)
        # empty groups: exactly 0 here, where PyG (torch 2.13) gives seeds, biases and LayerNorms a value
        assert torch.equal(got[[3, 5]], torch.zeros_like(got[[3, 5]]))
        # and the converted aggregation takes an unsorted index too
        x2, index2 = groups()
        order = torch.argsort(index2, stable=True)
        want = peer(x2[order], index2[order], dim_size=GROUPS)
        torch.testing.assert_close(ours(x2, index2, dim_size=GROUPS)[nonempty], want[nonempty], **STACK_PARITY)
