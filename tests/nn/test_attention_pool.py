"""AttentionPool: learned and call-time queries, heads, projections, scores, temperature and dropout."""

import pytest
import torch

from attnpool import kernels
from attnpool.nn import AdditiveScore, AttentionPool, BilinearScore
from tests.conftest import make_batch, reference_attention_pool

LENGTHS = [3, 1, 0, 5, 2]


def forms(module, batch, **kw):
    return (module(batch.padded, batch.mask, **kw), module(batch.packed, offsets=batch.offsets, **kw),
            module(batch.sets, **kw))


def reference_module(module, sets, query=None):
    """The module's formula by hand in float64: project, pool with the reference, project out."""
    q = module.query if query is None else query
    if module.query_proj is not None:
        q = module.query_proj(q)
    keys = [module.key_proj(s) if module.key_proj is not None else s for s in sets]
    values = [module.value_proj(s) if module.value_proj is not None else s for s in sets]
    qb = q.expand(len(sets), -1, -1) if q.dim() == 2 else q
    score = None if module.score is None else module.score
    out, w = reference_attention_pool(values, qb, keys, num_heads=module.num_heads, scale=module.scale,
                                      temperature=float(module.temperature.detach()), score=score)
    if module.out_proj is not None:
        out = module.out_proj(out)
    out = out * torch.tensor([s.shape[0] > 0 for s in sets]).view(-1, 1, 1)
    return out, w


@pytest.mark.parametrize("score", ["scaled_dot", "dot", "additive", "bilinear"])
@pytest.mark.parametrize(("num_queries", "num_heads", "projections"), [(1, 1, False), (3, 2, True), (2, 4, True)])
def test_matches_float64_reference_in_every_form(score, num_queries, num_heads, projections):
    torch.manual_seed(0)
    pool = AttentionPool(8, num_queries, num_heads, query_proj=projections, key_proj=projections,
                         value_proj=projections, out_proj=projections, score=score, temperature=0.7,
                         dtype=torch.float64)
    batch = make_batch(LENGTHS, 8)
    expected, expected_w = reference_module(pool, batch.sets)
    if num_queries == 1:
        expected = expected.squeeze(1)
    (_, w_padded), (_, w_packed), (_, w_list) = results = forms(pool, batch, return_weights=True)
    for out, _ in results:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert w_list[0].shape == (num_heads, num_queries, 3)
    torch.testing.assert_close(w_padded.permute(0, 3, 1, 2)[batch.mask], w_packed, rtol=0, atol=1e-12)
    for b, wb in enumerate(expected_w):
        torch.testing.assert_close(w_list[b], wb, rtol=0, atol=1e-10)


def test_empty_set_is_zero_even_with_output_bias():
    pool = AttentionPool(4, 2, out_proj=True, value_proj=True, dtype=torch.float64)
    with torch.no_grad():
        pool.out_proj.bias.fill_(3.0)
    batch = make_batch([2, 0], 4)
    x = batch.padded.clone().requires_grad_()
    out = pool(x, batch.mask)
    assert torch.equal(out[1], torch.zeros(2, 4, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_call_time_query_pools_the_same_set_differently():
    pool = AttentionPool(8, num_queries=0, dtype=torch.float64)
    batch = make_batch([6, 6], 8)
    x = torch.stack(batch.sets)  # the same two sets
    qa, qb = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    out_a, w_a = pool(x, query=qa, return_weights=True)
    out_b, w_b = pool(x, query=qb, return_weights=True)
    assert out_a.shape == (2, 8)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(w_a, w_b)
    expected, _ = reference_attention_pool(batch.sets, qa.unsqueeze(1))
    torch.testing.assert_close(out_a, expected.squeeze(1), rtol=0, atol=1e-12)
    # [D] is shared, [B, Q, D] gives several queries per set
    assert pool(x, query=qa[0]).shape == (2, 8)
    assert pool(x, query=torch.randn(2, 3, 8, dtype=torch.float64)).shape == (2, 3, 8)


def test_call_time_query_with_its_own_dim_and_projection():
    pool = AttentionPool(8, num_queries=0, num_heads=2, query_dim=5, query_proj=True, dtype=torch.float64)
    batch = make_batch(LENGTHS, 8)
    ctx = torch.randn(5, 5, dtype=torch.float64)
    expected, _ = reference_module(pool, batch.sets, ctx.unsqueeze(1))
    for out in forms(pool, batch, query=ctx):
        torch.testing.assert_close(out, expected.squeeze(1), rtol=0, atol=1e-12)


def test_learned_temperature_gets_a_gradient_and_changes_sharpness():
    pool = AttentionPool(4, learn_temperature=True, temperature=2.0, dtype=torch.float64)
    assert float(pool.temperature.detach()) == pytest.approx(2.0)
    batch = make_batch([5, 3], 4)
    pool(batch.sets).pow(2).sum().backward()
    assert pool.log_temperature.grad is not None and pool.log_temperature.grad != 0
    fixed = AttentionPool(4, temperature=2.0)
    assert "log_temperature" not in fixed.state_dict()


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    pool = AttentionPool(8, dropout=0.5, dtype=torch.float64)
    batch = make_batch([40, 30], 8)
    pool.eval()
    a, b = pool(batch.sets), pool(batch.sets)
    assert torch.equal(a, b)
    pool.train()
    c, w = pool(batch.sets, return_weights=True)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(w[0].sum(-1), torch.ones(1, 1, dtype=torch.float64))  # returned weights undropped


def test_score_modules_and_callables():
    pool = AttentionPool(8, 2, 2, score="additive", score_hidden=6)
    assert isinstance(pool.score, AdditiveScore) and pool.score.hidden_dim == 6
    assert isinstance(AttentionPool(8, score="bilinear").score, BilinearScore)
    custom = AttentionPool(8, score=lambda q, k: -(q.unsqueeze(-2) - k.unsqueeze(-3)).pow(2).sum(-1))
    batch = make_batch([4], 8, dtype=torch.float32)
    with torch.no_grad():
        custom.query.copy_(batch.sets[0][2])
    _, w = custom(batch.sets, return_weights=True)
    assert int(w[0].argmax()) == 2  # closest element wins under a negative-distance score


def test_factory_kwargs_reset_parameters_and_repr():
    pool = AttentionPool(8, 3, 2, key_proj=True, value_proj=True, out_proj=True, learn_temperature=True,
                         temperature=0.5, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in pool.parameters())
    before = {k: v.clone() for k, v in pool.state_dict().items()}
    pool.reset_parameters()
    after = pool.state_dict()
    assert not torch.equal(before["query"], after["query"])
    assert float(pool.temperature.detach()) == pytest.approx(0.5)
    text = repr(pool)
    assert "num_queries=3" in text and "num_heads=2" in text and "key+value+out" in text and "learned" in text
    state = pool.state_dict()
    clone = AttentionPool(8, 3, 2, key_proj=True, value_proj=True, out_proj=True, learn_temperature=True,
                          dtype=torch.float64)
    clone.load_state_dict(state)
    batch = make_batch([3, 2], 8)
    torch.testing.assert_close(clone(batch.sets), pool(batch.sets), rtol=0, atol=0)


def test_gradcheck_module():
    pool = AttentionPool(4, 2, 2, key_proj=True, value_proj=True, out_proj=True, dtype=torch.float64)
    batch = make_batch([3, 0, 2], 4, fill=0.0)
    x = batch.packed.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: pool(x_, offsets=batch.offsets), (x,))


def test_half_precision_module_under_autocast():
    pool = AttentionPool(16, 2, 2, key_proj=True, value_proj=True)
    batch = make_batch([5, 0, 9], 16, dtype=torch.float32, fill=float("nan"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = pool(batch.padded * 100, batch.mask, return_weights=True)
    assert torch.isfinite(out).all() and w.dtype == torch.float32
    expected = pool(batch.padded * 100, batch.mask)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=2.0)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"dim": 6, "num_heads": 4}, ["num_heads", "6", "4"]),
        ({"dim": 8, "query_dim": 5}, ["query_dim", "dim = 8", "5"]),
        ({"dim": 8, "temperature": 0.0}, ["temperature", "0.0"]),
        ({"dim": 8, "score": "cosine"}, ["score", "cosine"]),
        ({"dim": 8, "dropout": 1.0}, ["dropout", "1.0"]),
        ({"dim": 8, "num_queries": -1}, ["num_queries", "-1"]),
    ],
)
def test_constructor_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        AttentionPool(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_call_errors():
    pool = AttentionPool(8, num_queries=0)
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="needs a query"):
        pool(x)
    with pytest.raises(ValueError, match=r"query: a 2-D query is one per set.*\[3, 8\].*\(2, 8\)"):
        pool(x, query=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"query: expected last dim 8.*\(3, 7\)"):
        pool(x, query=torch.randn(3, 7))


@pytest.mark.parametrize(("key_proj", "value_proj"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(("num_heads", "num_queries"), [(1, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_folded_path_equals_projected_path_with_gradients(key_proj, value_proj, num_heads, num_queries, form):
    torch.manual_seed(0)
    pool = AttentionPool(8, num_queries, num_heads, query_proj=True, key_proj=key_proj, value_proj=value_proj,
                         out_proj=True, learn_temperature=True, temperature=0.6, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases, so that the b_v term and the cancelled b_k term are exercised
        for layer in (pool.key_proj, pool.value_proj, pool.out_proj):
            if layer is not None:
                layer.bias.normal_()
    batch = make_batch(LENGTHS, 8)
    args = (batch.padded, batch.mask) if form == "padded" else (batch.packed,)
    kwargs = {} if form == "padded" else {"offsets": batch.offsets}
    results = {}
    for fold in (False, True):
        pool.fold = fold
        pool.zero_grad()
        x = args[0].clone().requires_grad_()
        out, w = pool(x, *args[1:], return_weights=True, **kwargs)
        (out.sin().sum() + (w * torch.randn_like(w, generator=torch.Generator().manual_seed(1))).sum()).backward()
        # the key bias cancels in the softmax: its gradient is 0 (None on the folded path, rounding otherwise)
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in pool.named_parameters()}
        results[fold] = (out.detach(), w.detach(), x.grad, grads)
    (o0, w0, x0, g0), (o1, w1, x1, g1) = results[False], results[True]
    torch.testing.assert_close(o1, o0, rtol=0, atol=1e-13)
    assert torch.equal(o1[2], torch.zeros_like(o1[2]))  # the empty set stays 0 on both paths
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-13)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-12, msg=name)


def test_fold_is_automatic_only_where_exact_and_cheaper():
    assert AttentionPool(64, 2, 4, key_proj=True, value_proj=True)._use_folded(2)
    assert not AttentionPool(64, 2, 4)._use_folded(2)  # nothing to fold
    assert not AttentionPool(8, 4, 4, key_proj=True)._use_folded(4)  # H*Q = 16 > D = 8: projecting is cheaper
    assert not AttentionPool(64, 1, 1, key_proj=True, score="additive")._use_folded(1)
    with pytest.raises(ValueError, match=r"fold: .* dot score"):
        AttentionPool(8, score="additive", fold=True)


def test_folded_merge_of_value_and_output_projections_is_exact_and_respects_hooks():
    """With one head, more pooled vectors than D, and plain W_v and W_o, the folded path applies (W_o W_v) at once;
    a hooked (or wrapped) W_o is instead called as a module, with the same result."""
    torch.manual_seed(0)
    pool = AttentionPool(8, 1, 1, key_proj=True, value_proj=True, out_proj=True).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    lengths = torch.tensor([3, 0, 7] + [2] * 15)  # B = 18 > D = 8: the merged product is the cheaper one
    merged = pool(x, lengths=lengths)
    with kernels.use_kernel("reference"):
        pool.fold = False
        unfolded = pool(x, lengths=lengths)
        pool.fold = None
    torch.testing.assert_close(merged, unfolded, rtol=1e-10, atol=1e-12)
    assert (merged[1] == 0).all()
    calls = []
    handle = pool.out_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    hooked = pool(x, lengths=lengths)
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(hooked, merged, rtol=1e-10, atol=1e-12)
