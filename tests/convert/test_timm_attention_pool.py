"""from_timm_attention_pool_latent: outputs equal timm's AttentionPoolLatent, masks and quirks included.

Every parity test runs against timm's own class where timm is installed (see tests/convert/_peers.py for how it is
imported without torchvision) and against the re-statement of its forward pass in any case.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from attnpool.convert import from_timm_attention_pool_latent, keep_mask_from_sdpa_mask
from attnpool.nn import AttentionPool, MAPHead
from tests.convert._peers import RestatedAttentionPoolLatent, timm_attention_pool_latent

TIMM = timm_attention_pool_latent()
needs_timm = pytest.mark.skipif(TIMM is None, reason="timm is not installed (pip install --no-deps timm==1.0.31)")
PEERS = ["timm", "restated"]
D, H = 32, 4


def build(peer: str, seed: int = 0, **kw) -> nn.Module:
    """A peer AttentionPoolLatent on random weights (its own init, then every vector perturbed)."""
    if peer == "timm" and TIMM is None:
        pytest.skip("timm is not installed (pip install --no-deps timm==1.0.31)")
    torch.manual_seed(seed)
    norm_eps = kw.pop("norm_eps", 1e-6)
    if peer == "timm":
        norm_layer = None if norm_eps is None else partial(nn.LayerNorm, eps=norm_eps)
        m = TIMM(D, num_heads=kw.pop("num_heads", H), norm_layer=norm_layer, **kw)
    else:
        m = RestatedAttentionPoolLatent(D, kw.pop("num_heads", H), norm_eps=norm_eps, **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:  # biases and LayerNorm affines: away from 0 and 1
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def data(b: int = 5, n: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=g)
    lengths = torch.tensor([9, 4, 1, 7, 2][:b])
    mask = torch.arange(n) < lengths[:, None]
    return x, mask


CONFIGS = {
    "default": {},
    "3 latents, token": {"latent_len": 3},
    "3 latents, all": {"latent_len": 3, "pool_type": ""},
    "no norm": {"norm_eps": None},
    "no qkv bias": {"qkv_bias": False},
    "no q proj": {"q_proj": False},
    "one head": {"num_heads": 1},
    "mlp ratio 2.5": {"mlp_ratio": 2.5},
    "out_features=0": {"out_features": 0, "latent_len": 2, "pool_type": ""},
}


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_outputs_match_the_peer(peer, config):
    peer_module = build(peer, **dict(CONFIGS[config]))
    ours = from_timm_attention_pool_latent(peer_module)
    assert isinstance(ours, AttentionPool if config == "out_features=0" else MAPHead)
    x, mask = data()
    with torch.no_grad():
        want = peer_module(x)
        got = ours(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # masked: the peer's fused path with the SDPA-shaped boolean mask, and with a 0/-inf float mask
        want_masked = peer_module(x, attn_mask=mask[:, None, None, :])
        torch.testing.assert_close(ours(x, mask), want_masked, rtol=0, atol=1e-6)
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None, :]
        torch.testing.assert_close(ours(x, mask), peer_module(x, attn_mask=additive), rtol=0, atol=1e-6)
        # and attnpool's other input forms give the same
        sets = [x[i, : int(mask[i].sum())] for i in range(x.shape[0])]
        torch.testing.assert_close(torch.stack(list(ours(sets))), want_masked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("peer", PEERS)
def test_state_dict_with_prefix_and_config(peer):
    peer_module = build(peer, latent_len=2, pool_type="", qkv_bias=False, num_heads=2)
    whole = {f"head.attn_pool.{k}": v for k, v in peer_module.state_dict().items()}
    whole["head.fc.weight"] = torch.zeros(3, D)
    ours = from_timm_attention_pool_latent(whole, prefix="head.attn_pool.", num_heads=2, pool_type="")
    x, mask = data()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask), peer_module(x, attn_mask=mask[:, None, None, :]), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="num_heads"):
        from_timm_attention_pool_latent(peer_module.state_dict())
    with pytest.raises(ValueError, match="num_heads"):
        from_timm_attention_pool_latent(peer_module.state_dict(), num_heads=5)


def test_a_module_that_is_not_the_pool_is_refused():
    with pytest.raises(TypeError, match="AttentionPoolLatent"):
        from_timm_attention_pool_latent(nn.Sequential(nn.Linear(D, D)))


def test_token_pooling_keeps_only_the_first_latent():
    peer_module = build("restated", latent_len=4)
    ours = from_timm_attention_pool_latent(peer_module)
    assert ours.num_probes == 1
    torch.testing.assert_close(ours.probe[0], peer_module.latent[0, 0], rtol=0, atol=0)


@needs_timm
def test_restatement_is_faithful_to_timm():
    real = build("timm", latent_len=3, pool_type="")
    restated = RestatedAttentionPoolLatent(D, H, latent_len=3, pool_type="", norm_eps=1e-6)
    restated.load_state_dict(real.state_dict())
    x, mask = data()
    with torch.no_grad():
        torch.testing.assert_close(restated(x, attn_mask=mask[:, None, None, :]),
                                   real(x, attn_mask=mask[:, None, None, :]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The mask quirk, characterized on timm itself.
# ---------------------------------------------------------------------------------------------------------------


@needs_timm
def test_quirk_a_hugging_face_style_mask_is_misread_by_timm():
    x, mask = data()
    peer_module = build("timm")
    with pytest.raises(RuntimeError):  # [B, N] broadcasts as [1, 1, B, N] against [B, H, 1, N]
        peer_module(x, attn_mask=mask)
    # with latent_len == B it runs, and masks latent i with row i of the mask for every set
    peer5 = build("timm", latent_len=5, pool_type="")
    with torch.no_grad():
        misread = peer5(x, attn_mask=mask)
        right = peer5(x, attn_mask=mask[:, None, None, :])
        assert not torch.allclose(misread, right)
        ours = from_timm_attention_pool_latent(peer5)
        torch.testing.assert_close(ours(x, mask), right, rtol=0, atol=1e-6)
        # keep_mask_from_sdpa_mask reads what timm reads
        keep = keep_mask_from_sdpa_mask(mask[:, None, None, :], 5, x.shape[1])
        assert torch.equal(keep, mask)


@needs_timm
def test_quirk_the_non_fused_path_adds_a_boolean_mask_instead_of_masking():
    x, mask = data()
    peer_module = build("timm")
    peer_module.fused_attn = False
    with torch.no_grad():
        eager = peer_module(x, attn_mask=mask[:, None, None, :])
        # True adds 1 to the logit and False adds 0: the same as a float mask of 1s and 0s on the fused path
        peer_module.fused_attn = True
        as_bias = peer_module(x, attn_mask=mask.float()[:, None, None, :])
        masked = peer_module(x, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(eager, as_bias, rtol=0, atol=1e-6)
    assert not torch.allclose(eager[1:], masked[1:], atol=1e-3)  # sets with padding: nothing was masked


@pytest.mark.parametrize("peer", PEERS)
def test_quirk_padding_values_and_empty_sets(peer):
    peer_module = build(peer)
    ours = from_timm_attention_pool_latent(peer_module)
    x, mask = data()
    dirty = x.masked_fill(~mask[..., None], float("nan"))
    with torch.no_grad():
        clean = ours(x, mask)
        assert torch.equal(ours(dirty, mask), clean)  # attnpool never reads masked values
        assert torch.isnan(peer_module(dirty, attn_mask=mask[:, None, None, :])[1:]).all()  # the peer does
        mask[2] = False  # an empty set
        out = ours(x, mask)
        assert torch.equal(out[2], torch.zeros(D))
        peer_out = peer_module(x, attn_mask=mask[:, None, None, :])[2]
        assert not torch.equal(peer_out, torch.zeros(D))  # zero attention, then proj.bias and the MLP (or NaN)


def test_keep_mask_from_sdpa_mask_forms_and_refusals():
    keep = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.equal(keep_mask_from_sdpa_mask(keep[:, None, None, :], 2, 3), keep)
    assert torch.equal(keep_mask_from_sdpa_mask(keep[:, None, None, :].expand(2, 4, 5, 3), 2, 3), keep)
    assert torch.equal(keep_mask_from_sdpa_mask(keep[0], 2, 3), keep[0].expand(2, 3))  # [N]: shared
    bias = torch.zeros(2, 1, 1, 3).masked_fill(~keep[:, None, None, :], float("-inf"))
    assert torch.equal(keep_mask_from_sdpa_mask(bias, 2, 3), keep)
    with pytest.raises(ValueError, match="re-weights"):
        keep_mask_from_sdpa_mask(torch.full((2, 1, 1, 3), -3.0), 2, 3)
    with pytest.raises(ValueError, match="differs across heads"):
        per_head = torch.stack([keep, ~keep], 1)[:, :, None, :]
        keep_mask_from_sdpa_mask(per_head, 2, 3)
    with pytest.raises(ValueError, match=r"mask\[:, None, None, :\]"):
        keep_mask_from_sdpa_mask(keep, 2, 3)  # a [B, N] mask read the SDPA way is [1, 1, B, N]
    with pytest.raises(ValueError, match="does not broadcast"):
        keep_mask_from_sdpa_mask(keep[:, None, None, :], 3, 3)


@needs_timm
@pytest.mark.parametrize(("kw", "match"), [
    ({"pos_embed": "abs", "feat_size": 9}, "pos_embed"),
    ({"qk_norm": True}, "qk_norm"),
    ({"latent_len": 2, "pool_type": "avg"}, "avg"),
    ({"out_features": 16}, "out_features"),
    ({"latent_dim": 16}, "latent_dim"),
])
def test_configurations_without_an_exact_equivalent_raise(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        from_timm_attention_pool_latent(build("timm", **kw))


@needs_timm
def test_gelu_tanh_and_layernorm_without_affine():
    peer_module = build("timm", act_layer=partial(nn.GELU, approximate="tanh"),
                        norm_eps=None)
    peer_module.norm = nn.LayerNorm(D, eps=1e-5, elementwise_affine=False)
    ours = from_timm_attention_pool_latent(peer_module)
    assert ours.gelu_approximate == "tanh" and ours.norm is not None and ours.norm.eps == 1e-5
    x, mask = data()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask), peer_module(x, attn_mask=mask[:, None, None, :]), rtol=0, atol=1e-6)


def test_converted_head_saves_and_loads(tmp_path):
    from attnpool.hub import from_pretrained, save_pretrained

    peer_module = build("restated", mlp_ratio=2.5, qkv_bias=False)
    ours = from_timm_attention_pool_latent(peer_module)
    save_pretrained(ours, tmp_path)
    x, mask = data()
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(x, mask), ours(x, mask))
