"""MAPHead: the SigLIP / big_vision multihead attention pooling head (timm's AttentionPoolLatent)."""

from __future__ import annotations

import math

import pytest
import torch

from attnpool.nn import MAPHead, register_weights_hook
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

# (kwargs, num_probes, num_heads)
CASES = [
    ({}, 1, 2),
    ({"num_probes": 3, "mlp_ratio": 2.0, "norm": False, "qkv_bias": False, "gelu_approximate": "tanh"}, 3, 4),
]
IDS = ["one-probe", "three-probes-no-norm-no-qkv-bias-tanh"]


def make(case, **kw):
    torch.manual_seed(0)
    kwargs, _, heads = case
    return MAPHead(8, heads, **{**kwargs, **kw})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes(case):
    check_shapes(make(case), "pool", 8, case[1], 8, weight_rows=case[1], num_heads=case[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padded_packed_list_agree(case):
    check_forms_agree(make(case), "pool", 8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_sets_give_zero_and_finite_grads(case):
    check_empty_sets(make(case, dtype=torch.float64), "pool", 8, 8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_in_padding_does_not_leak(case):
    check_nan_padding(make(case, dtype=torch.float64), "pool", 8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_permutation_invariance(case):
    check_permutation(make(case, dtype=torch.float64), "pool", 8, weight_rows=case[1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padding_invariance(case):
    check_padding_invariance(make(case, dtype=torch.float64), "pool", 8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_independence(case):
    check_batch_independence(make(case, dtype=torch.float64), "pool", 8)


def test_gradcheck():
    torch.manual_seed(0)
    check_gradcheck(MAPHead(4, 2, num_probes=2, mlp_ratio=1.0, dtype=torch.float64), 4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factory_kwargs(case):
    check_factory_kwargs(lambda **kw: make(case, **kw), 8)


def test_reset_parameters_and_extra_repr():
    check_reset_and_repr(make(CASES[0]), ["dim=8", "num_heads=2", "mlp_ratio=4.0", "norm_eps=1e-06"])
    check_reset_and_repr(make(CASES[1]), ["num_probes=3", "norm=False", "gelu_approximate=tanh"])


def reference(m: MAPHead, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula for one set, in float64: ``[k, D]`` and the weights ``[H, k, L]``."""
    a = multihead(m.attn, m.probe, s)
    h = layer_norm(m.norm, a) if m.norm is not None else a
    h = linear(m.mlp.fc1, h)
    if m.gelu_approximate == "tanh":
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return a + linear(m.mlp.fc2, h), multihead_weights(m.attn, m.probe, s)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_float64_reference(case):
    m = make(case, dtype=torch.float64)
    k = case[1]
    batch = make_batch(LENGTHS, 8)
    out, weights = m(batch.sets, return_weights=True)
    for b, s in enumerate(batch.sets):
        z, w = reference(m, s)
        got = out[b] if k > 1 else out[b].unsqueeze(0)
        torch.testing.assert_close(got, z if s.shape[0] else torch.zeros_like(z), rtol=0, atol=1e-10)
        torch.testing.assert_close(weights[b], w, rtol=0, atol=1e-10)


def timm_attention_pool_latent(m: MAPHead, x: torch.Tensor) -> torch.Tensor:
    """timm's AttentionPoolLatent forward (pool_type="token", a norm_layer given), written from its formula with
    its fused ``kv`` weight built from ours: the mapping the weight converter will use."""
    b, n, d = x.shape
    h = m.num_heads
    kv_w = torch.cat([m.attn.key_proj.weight, m.attn.value_proj.weight])
    kv_b = None if m.attn.key_proj.bias is None else torch.cat([m.attn.key_proj.bias, m.attn.value_proj.bias])
    latent = m.probe.unsqueeze(0).expand(b, -1, -1)
    q = torch.nn.functional.linear(latent, m.attn.query_proj.weight, m.attn.query_proj.bias)
    q = q.reshape(b, -1, h, d // h).transpose(1, 2)
    kv = torch.nn.functional.linear(x, kv_w, kv_b).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])
    out = out.transpose(1, 2).reshape(b, -1, d)
    out = m.attn.out_proj(out)
    out = out + m.mlp.fc2(torch.nn.functional.gelu(m.mlp.fc1(m.norm(out))))
    return out[:, 0]


def test_matches_timm_attention_pool_latent_formula():
    torch.manual_seed(0)
    m = MAPHead(16, 4, dtype=torch.float64)  # timm's defaults: mlp_ratio 4, exact GELU, qkv bias, LN eps 1e-6
    assert m.norm.eps == 1e-6 and m.mlp.fc1.out_features == 64 and m.attn.key_proj.bias is not None
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), timm_attention_pool_latent(m, x), rtol=0, atol=1e-12)


def test_weights_hook_and_errors():
    batch = make_batch([3, 0, 2], 4, dtype=torch.float32)
    seen = []
    with register_weights_hook(lambda mod, w, s: seen.append((type(mod).__name__, tuple(w.shape), s.layout))):
        MAPHead(4, 2)(batch.packed, offsets=batch.offsets)
    assert seen == [("MAPHead", (5, 2, 1), "packed")]
    with pytest.raises(ValueError, match="num_probes"):
        MAPHead(8, num_probes=0)
    with pytest.raises(ValueError, match="gelu_approximate"):
        MAPHead(8, gelu_approximate="erf")
    with pytest.raises(ValueError, match="num_heads"):
        MAPHead(6, 4)
    assert MAPHead(8, qkv_bias=False).attn.out_proj.bias is not None  # timm's proj always has a bias
