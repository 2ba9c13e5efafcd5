"""Properties that must hold for any ragged batch: hypothesis draws the batches."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpool.functional import attention_pool, max_pool, mean_pool
from tests.conftest import make_batch

batches = st.fixed_dictionaries({
    "lengths": st.lists(st.integers(0, 9), min_size=1, max_size=6),
    "dim": st.sampled_from([2, 4, 8]),
    "heads": st.sampled_from([1, 2]),
    "queries": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
    "temperature": st.floats(0.05, 20.0),
})

SETTINGS = settings(max_examples=40, deadline=None)


def draw(p):
    batch = make_batch(p["lengths"], p["dim"], seed=p["seed"])
    g = torch.Generator().manual_seed(p["seed"] + 1)
    q = torch.randn(len(p["lengths"]), p["queries"], p["dim"], generator=g, dtype=torch.float64) * 2
    kw = {"num_heads": p["heads"], "temperature": p["temperature"]}
    return batch, q, kw, g


@SETTINGS
@given(batches)
def test_packed_equals_padded_equals_list(p):
    batch, q, kw, _ = draw(p)
    out_p, w_p = attention_pool(batch.padded, q, mask=batch.mask, return_weights=True, **kw)
    out_k, w_k = attention_pool(batch.packed, q, offsets=batch.offsets, return_weights=True, **kw)
    out_l = attention_pool(batch.sets, q, **kw)
    torch.testing.assert_close(out_p, out_k, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_l, out_k, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_p.permute(0, 3, 1, 2)[batch.mask], w_k, rtol=0, atol=1e-12)


@SETTINGS
@given(batches)
def test_weights_sum_to_one_on_nonempty_sets_and_zero_on_empty(p):
    batch, q, kw, _ = draw(p)
    _, w = attention_pool(batch.padded, q, mask=batch.mask, return_weights=True, **kw)
    sums = w.sum(-1)  # [B, H, Q]
    nonempty = batch.lengths > 0
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]), rtol=0, atol=1e-12)
    assert torch.equal(sums[~nonempty], torch.zeros_like(sums[~nonempty]))
    assert (w >= 0).all()


@SETTINGS
@given(batches)
def test_permutation_invariance(p):
    batch, q, kw, g = draw(p)
    shuffled = [s[torch.randperm(s.shape[0], generator=g)] for s in batch.sets]
    torch.testing.assert_close(attention_pool(shuffled, q, **kw), attention_pool(batch.sets, q, **kw),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(mean_pool(shuffled), mean_pool(batch.sets), rtol=0, atol=1e-12)
    torch.testing.assert_close(max_pool(shuffled), max_pool(batch.sets), rtol=0, atol=0)


@SETTINGS
@given(batches, st.integers(1, 5), st.sampled_from([0.0, float("nan"), 1e6]))
def test_padding_invariance(p, extra, fill):
    batch, q, kw, _ = draw(p)
    wider = make_batch(p["lengths"], p["dim"], seed=p["seed"], fill=fill,
                       pad_to=max([0, *p["lengths"]]) + extra)
    a = attention_pool(batch.padded, q, mask=batch.mask, **kw)
    b = attention_pool(wider.padded, q, mask=wider.mask, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@SETTINGS
@given(batches)
def test_batch_independence(p):
    batch, q, kw, g = draw(p)
    base = attention_pool(batch.sets, q, **kw)
    changed = [s.clone() for s in batch.sets]
    j = int(torch.randint(len(changed), (1,), generator=g))
    changed[j] = torch.randn(changed[j].shape, generator=g, dtype=torch.float64) * 10
    out = attention_pool(changed, q, **kw)
    others = torch.arange(len(changed)) != j
    assert torch.equal(out[others], base[others])
