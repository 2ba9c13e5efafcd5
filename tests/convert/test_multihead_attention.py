"""from_multihead_attention: torch's nn.MultiheadAttention used as a pooler, and the AttentionPool it becomes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpool.convert import from_multihead_attention
from attnpool.nn import AttentionPool

D = 16


def mha(heads: int = 4, *, bias: bool = True, batch_first: bool = True, seed: int = 0, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(D, heads, bias=bias, batch_first=batch_first, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # MHA zeroes its biases at init
    return m.eval()


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, D, generator=g)
    mask = torch.arange(7) < torch.tensor([7, 3, 1, 5])[:, None]
    return x, mask


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_learned_queries_match(heads, bias, num_queries):
    peer = mha(heads, bias=bias)
    query = torch.randn(num_queries, D)
    pool = from_multihead_attention(peer, query)
    assert isinstance(pool, AttentionPool) and pool.num_queries == num_queries
    x, mask = data()
    with torch.no_grad():
        want = peer(query.expand(4, -1, -1), x, x, key_padding_mask=~mask)[0]
        got = pool(x, mask)
        got = got.unsqueeze(1) if num_queries == 1 else got
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        packed = pool(torch.cat([x[i, : int(mask[i].sum())] for i in range(4)]), lengths=mask.sum(1))
        torch.testing.assert_close(packed.view_as(got), want, rtol=0, atol=1e-6)


def test_call_time_query_and_sequence_first_layout():
    peer = mha(batch_first=False)
    pool = from_multihead_attention(peer)
    assert pool.num_queries == 0
    x, mask = data()
    q = torch.randn(4, 2, D)
    with torch.no_grad():
        want = peer(q.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=~mask)[0]
        torch.testing.assert_close(pool(x, mask, query=q), want.transpose(0, 1), rtol=0, atol=1e-6)


def test_state_dict_needs_num_heads_and_takes_prefix():
    peer = mha(2)
    query = torch.randn(1, 1, D)
    sd = {f"pool.attn.{k}": v for k, v in peer.state_dict().items()}
    pool = from_multihead_attention(sd, query, num_heads=2, prefix="pool.attn.")
    x, mask = data()
    with torch.no_grad():
        want = peer(query.expand(4, -1, -1), x, x, key_padding_mask=~mask)[0][:, 0]
        torch.testing.assert_close(pool(x, mask), want, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="num_heads"):
        from_multihead_attention(peer.state_dict(), query)


def test_empty_sets_and_padding_values():
    peer = mha()
    query = torch.randn(1, D)
    pool = from_multihead_attention(peer, query)
    x, mask = data()
    mask[2] = False
    dirty = x.masked_fill(~mask[..., None], float("nan"))
    with torch.no_grad():
        out = pool(dirty, mask)
        assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros(D))
        # torch's MHA computing weights gives NaN for the empty set
        theirs = peer(query.expand(4, -1, -1), x, x, key_padding_mask=~mask, need_weights=True)[0]
        assert torch.isnan(theirs[2]).all()
        torch.testing.assert_close(out[[0, 1, 3]], theirs[[0, 1, 3], 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kw", "match"), [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"add_zero_attn": True}, "add_zero_attn"),
    ({"kdim": 8, "vdim": 8}, "kdim"),
])
def test_unsupported_options_raise(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        from_multihead_attention(mha(**kw), torch.randn(1, D))


def test_bad_query_shape():
    with pytest.raises(ValueError, match="query"):
        from_multihead_attention(mha(), torch.randn(2, D + 1))


def test_float64_peer_gives_a_float64_module():
    peer = mha().double()
    query = torch.randn(2, D, dtype=torch.float64)
    pool = from_multihead_attention(peer, query)
    assert pool.query.dtype == torch.float64
    x, mask = data()
    x = x.double()
    with torch.no_grad():
        want = peer(query.expand(4, -1, -1), x, x, key_padding_mask=~mask)[0]
        torch.testing.assert_close(pool(x, mask), want, rtol=0, atol=1e-12)
