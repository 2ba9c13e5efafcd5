"""GatedAttentionPool: Ilse et al.'s formula, plain and gated, in every input form."""

import pytest
import torch

from attnpool.nn import GatedAttentionPool
from tests.conftest import make_batch

LENGTHS = [4, 0, 1, 6]


def reference(pool, sets):
    out = []
    for h in sets:
        h = h.double()
        a_v = torch.tanh(h @ pool.tanh_layer.weight.T + pool.tanh_layer.bias)
        if pool.gated:
            a_v = a_v * torch.sigmoid(h @ pool.sigmoid_layer.weight.T + pool.sigmoid_layer.bias)
        logits = a_v @ pool.vector.T  # [L, K]
        a = torch.softmax(logits, 0) if h.shape[0] else logits
        out.append(a.T @ h)  # [K, D]
    return torch.stack(out)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("branches", [1, 3])
def test_matches_paper_formula(gated, branches):
    torch.manual_seed(0)
    pool = GatedAttentionPool(6, 5, branches, gated=gated, dtype=torch.float64)
    batch = make_batch(LENGTHS, 6)
    expected = reference(pool, batch.sets)
    if branches == 1:
        expected = expected.squeeze(1)
    outs = [pool(batch.padded, batch.mask, return_weights=True), pool(batch.packed, lengths=batch.lengths,
            return_weights=True), pool(batch.sets, return_weights=True)]
    for out, _ in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    w_p, w_k, w_l = (w for _, w in outs)
    assert w_p.shape == (4, 1, branches, 6) and w_k.shape == (11, 1, branches)
    assert [tuple(w.shape) for w in w_l] == [(1, branches, n) for n in LENGTHS]
    assert pool.sigmoid_layer is None if not gated else pool.sigmoid_layer is not None


def test_nan_padding_and_empty_bag_are_safe_for_parameters_too():
    pool = GatedAttentionPool(6, 5, dtype=torch.float64)
    batch = make_batch(LENGTHS, 6, fill=float("nan"))
    out = pool(batch.padded, batch.mask)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(6, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_gradcheck_and_repr():
    pool = GatedAttentionPool(3, 4, dtype=torch.float64)
    batch = make_batch([2, 3], 3)
    x = batch.packed.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: pool(x_, offsets=batch.offsets), (x,))
    assert "hidden_dim=4" in repr(pool) and "gated=True" in repr(pool)
    v = pool.vector.detach().clone()
    pool.reset_parameters()
    assert not torch.equal(v, pool.vector)


def test_takes_no_query():
    with pytest.raises(TypeError, match="query: GatedAttentionPool takes no call-time query"):
        GatedAttentionPool(3)(torch.randn(2, 4, 3), query=torch.randn(3))
