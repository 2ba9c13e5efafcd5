"""LatentCrossAttention: Perceiver-style learned latents cross-attending to the set, pre-LN, stacked."""

from __future__ import annotations

import math

import pytest
import torch

from attnpool.nn import LatentCrossAttention, register_weights_hook
from tests.nn._set_module_checks import (
    LENGTHS,
    check_batch_independence,
    check_empty_sets,
    check_factory_kwargs,
    check_forms_agree,
    check_gradcheck,
    check_nan_padding,
    check_padding_invariance,
    check_permutation,
    check_reset_and_repr,
    check_shapes,
    layer_norm,
    linear,
    make_batch,
    multihead,
    multihead_weights,
)

# (args, kwargs, in_dim, num_latents, num_heads)
CASES = [
    ((8, 1, 2), {}, 8, 1, 2),
    ((8, 3, 4), {"num_layers": 2, "kv_dim": 6, "mlp_ratio": 2.0, "final_norm": True}, 6, 3, 4),
]
IDS = ["one-latent", "three-latents-two-layers-kv6"]


def make(case, **kw):
    torch.manual_seed(0)
    args, kwargs, *_ = case
    return LatentCrossAttention(*args, **{**kwargs, **kw})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes(case):
    _, _, in_dim, k, h = case
    check_shapes(make(case), "pool", 8, k, in_dim, weight_rows=k, num_heads=h)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padded_packed_list_agree(case):
    check_forms_agree(make(case), "pool", case[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_sets_give_zero_and_finite_grads(case):
    check_empty_sets(make(case, dtype=torch.float64), "pool", case[2], 8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_in_padding_does_not_leak(case):
    check_nan_padding(make(case, dtype=torch.float64), "pool", case[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_permutation_invariance(case):
    check_permutation(make(case, dtype=torch.float64), "pool", case[2], weight_rows=case[3])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padding_invariance(case):
    check_padding_invariance(make(case, dtype=torch.float64), "pool", case[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_independence(case):
    check_batch_independence(make(case, dtype=torch.float64), "pool", case[2])


def test_gradcheck():
    torch.manual_seed(0)
    m = LatentCrossAttention(4, 2, 2, num_layers=2, kv_dim=3, mlp_ratio=1.0, final_norm=True, dtype=torch.float64)
    check_gradcheck(m, 3)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factory_kwargs(case):
    check_factory_kwargs(lambda **kw: make(case, **kw), case[2])


def test_reset_parameters_and_extra_repr():
    check_reset_and_repr(make(CASES[1]), ["dim=8", "num_latents=3", "num_heads=4", "num_layers=2", "kv_dim=6",
                                          "mlp_ratio=2.0", "final_norm=True"])
    check_reset_and_repr(make(CASES[0]), ["dim=8", "num_latents=1", "num_layers=1"])


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference(m: LatentCrossAttention, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula for one set, in float64: returns ``[k, D]`` and the last block's weights ``[H, k, L]``."""
    z = m.latents
    w = None
    for layer in m.layers:
        x = layer_norm(layer.norm_kv, s)
        q = layer_norm(layer.norm_q, z)
        w = multihead_weights(layer.attn, q, x)
        z = z + multihead(layer.attn, q, x)
        hidden = _gelu(linear(layer.mlp[0], layer_norm(layer.norm_mlp, z)))
        z = z + linear(layer.mlp[2], hidden)
    if m.norm is not None:
        z = layer_norm(m.norm, z)
    return z, w


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_float64_reference(case):
    m = make(case, dtype=torch.float64)
    _, _, in_dim, k, _ = case
    batch = make_batch(LENGTHS, in_dim)
    for out, weights in (m(batch.sets, return_weights=True),):
        for b, s in enumerate(batch.sets):
            z, w = reference(m, s)
            expected = z if s.shape[0] else torch.zeros_like(z)
            got = out[b] if k > 1 else out[b].unsqueeze(0)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
            torch.testing.assert_close(weights[b], w, rtol=0, atol=1e-10)


def test_layers_are_stacked_and_distinct():
    torch.manual_seed(0)
    one = LatentCrossAttention(8, 2, 2, num_layers=1)
    two = LatentCrossAttention(8, 2, 2, num_layers=2)
    assert len(two.layers) == 2
    assert not torch.equal(two.layers[0].attn.key_proj.weight, two.layers[1].attn.key_proj.weight)
    assert sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters()) == sum(
        p.numel() for p in one.layers[0].parameters())


def test_weights_hook_and_errors():
    batch = make_batch([3, 0, 2], 4, dtype=torch.float32)
    seen = []
    with register_weights_hook(lambda mod, w, s: seen.append((type(mod).__name__, tuple(w.shape), s.layout))):
        LatentCrossAttention(4, 2, 2, num_layers=3)(batch.padded, batch.mask)
    assert seen == [("LatentCrossAttention", (3, 2, 2, 3), "padded")]  # once, the last layer's
    with pytest.raises(ValueError, match="num_layers"):
        LatentCrossAttention(8, num_layers=0)
    with pytest.raises(ValueError, match="num_latents"):
        LatentCrossAttention(8, 0)
    with pytest.raises(ValueError, match="num_heads"):
        LatentCrossAttention(6, 1, 4)
    with pytest.raises(TypeError, match="query"):
        LatentCrossAttention(4)(batch.sets, query=torch.randn(4))
