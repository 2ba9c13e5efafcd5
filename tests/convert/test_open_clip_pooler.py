"""from_open_clip_attentional_pooler: open_clip's AttentionalPooler (CoCa) as a LatentCrossAttention.

The attnpool module it needs is one LatentCrossAttention block without residual or feed-forward
(``residual=False, mlp_ratio=0``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpool.convert import from_open_clip_attentional_pooler
from tests.convert._peers import RestatedAttentionalPooler, open_clip_attentional_pooler

POOLER = open_clip_attentional_pooler()
PEERS = ["open_clip", "restated"]
D = 16


def build(peer: str, context_dim: int, n_queries: int = 5, heads: int = 4) -> nn.Module:
    if peer == "open_clip" and POOLER is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open_clip_torch==3.3.0)")
    torch.manual_seed(0)
    cls = POOLER if peer == "open_clip" else RestatedAttentionalPooler
    m = cls(D, context_dim, n_head=heads, n_queries=n_queries)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("context_dim", [D, 24])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_outputs_match_the_peer(peer, context_dim, n_queries):
    pooler = build(peer, context_dim, n_queries)
    ours = from_open_clip_attentional_pooler(pooler)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, context_dim, generator=g)
    with torch.no_grad():
        want = pooler(x)
        got = ours(x)
        got = got.unsqueeze(1) if n_queries == 1 else got
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # the peer has no mask: a padded batch through attnpool equals the peer run set by set
        lengths = [7, 2, 5]
        padded = x.clone()
        mask = torch.arange(7) < torch.tensor(lengths)[:, None]
        padded[~mask] = float("nan")
        got = ours(padded, mask)
        got = got.unsqueeze(1) if n_queries == 1 else got
        for i, n in enumerate(lengths):
            torch.testing.assert_close(got[i], pooler(x[i : i + 1, :n])[0], rtol=0, atol=1e-6)


def test_state_dict_with_prefix():
    pooler = build("restated", 24, heads=2)
    sd = {f"visual.attn_pool.{k}": v for k, v in pooler.state_dict().items()}
    ours = from_open_clip_attentional_pooler(sd, num_heads=2, prefix="visual.attn_pool.")
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pooler(x), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="num_heads"):
        from_open_clip_attentional_pooler(pooler.state_dict())


@pytest.mark.skipif(POOLER is None, reason="open_clip is not installed")
def test_restatement_is_faithful_to_open_clip():
    real = build("open_clip", 24)
    restated = RestatedAttentionalPooler(D, 24, 4, 5)
    restated.load_state_dict(real.state_dict())
    x = torch.randn(3, 6, 24)
    with torch.no_grad():
        torch.testing.assert_close(restated(x), real(x), rtol=0, atol=0)


def test_converted_pooler_saves_and_loads(tmp_path):
    from attnpool.hub import from_pretrained, save_pretrained

    ours = from_open_clip_attentional_pooler(build("restated", 24))
    save_pretrained(ours, tmp_path)
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(x), ours(x))
