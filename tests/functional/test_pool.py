"""attention_pool, softmax_pool and the baseline pools against the formula, in every input form."""

import math

import pytest
import torch

from attnpool.functional import (
    additive_score,
    attention_pool,
    bilinear_score,
    max_pool,
    mean_pool,
    softmax_pool,
    sum_pool,
)
from tests.conftest import make_batch, reference_attention_pool

LENGTHS = [3, 1, 0, 5, 2]


def three_forms(batch, query, **kw):
    padded = attention_pool(batch.padded, query, mask=batch.mask, return_weights=True, **kw)
    packed = attention_pool(batch.packed, query, offsets=batch.offsets, return_weights=True, **kw)
    listed = attention_pool(batch.sets, query, return_weights=True, **kw)
    return padded, packed, listed


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("query_shape", ["shared", "shared_many", "per_set", "per_set_many"])
def test_equals_float64_reference_in_all_forms(num_heads, query_shape):
    batch = make_batch(LENGTHS, 8)
    g = torch.Generator().manual_seed(3)
    shapes = {"shared": (8,), "shared_many": (3, 8), "per_set": (5, 1, 8), "per_set_many": (5, 3, 8)}
    query = torch.randn(*shapes[query_shape], generator=g, dtype=torch.float64)
    q_full = query.view(1, 1, 8) if query.dim() == 1 else query if query.dim() == 3 else query.unsqueeze(0)
    expected, expected_w = reference_attention_pool(batch.sets, q_full.expand(5, -1, -1), num_heads=num_heads)
    if query.dim() == 1:
        expected = expected.squeeze(1)
    (out_p, w_p), (out_k, w_k), (out_l, w_l) = three_forms(batch, query, num_heads=num_heads)
    for out in (out_p, out_k, out_l):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for b, wb in enumerate(expected_w):
        n = LENGTHS[b]
        torch.testing.assert_close(w_p[b, :, :, :n], wb, rtol=0, atol=1e-12)
        assert torch.equal(w_p[b, :, :, n:], torch.zeros_like(w_p[b, :, :, n:]))
        torch.testing.assert_close(w_k[batch.offsets[b]:batch.offsets[b + 1]].permute(1, 2, 0), wb, rtol=0, atol=1e-12)
        torch.testing.assert_close(w_l[b], wb, rtol=0, atol=1e-12)


def test_weight_layouts():
    batch = make_batch(LENGTHS, 8)
    q = torch.randn(5, 3, 8, dtype=torch.float64)
    (out_p, w_p), (out_k, w_k), (_, w_l) = three_forms(batch, q, num_heads=2)
    assert out_p.shape == out_k.shape == (5, 3, 8)
    assert w_p.shape == (5, 2, 3, 5) and w_k.shape == (11, 2, 3)
    assert [tuple(w.shape) for w in w_l] == [(2, 3, n) for n in LENGTHS]


def test_keys_distinct_from_values_and_key_dim_differs():
    batch = make_batch(LENGTHS, 6)
    kb = make_batch(LENGTHS, 4, seed=9)
    q = torch.randn(2, 4, dtype=torch.float64)
    expected, _ = reference_attention_pool(batch.sets, q.expand(5, -1, -1), kb.sets, num_heads=2)
    got_p = attention_pool(batch.padded, q, kb.padded, mask=batch.mask, num_heads=2)
    got_k = attention_pool(batch.packed, q, kb.packed, lengths=batch.lengths, num_heads=2)
    got_l = attention_pool(batch.sets, q, kb.sets, num_heads=2)
    for got in (got_p, got_k, got_l):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_scale_and_temperature_divide_the_score():
    batch = make_batch(LENGTHS, 8)
    q = torch.randn(8, dtype=torch.float64)
    expected, _ = reference_attention_pool(batch.sets, q.view(1, 1, 8).expand(5, -1, -1), scale=0.7, temperature=0.3)
    got = attention_pool(batch.packed, q, offsets=batch.offsets, scale=0.7, temperature=0.3)
    torch.testing.assert_close(got, expected.squeeze(1), rtol=0, atol=1e-12)


def test_plain_dot_score_is_scale_one():
    batch = make_batch(LENGTHS, 8)
    q = torch.randn(8, dtype=torch.float64)
    a = attention_pool(batch.padded, q, mask=batch.mask, scale=1.0)
    b = attention_pool(batch.padded, q * math.sqrt(8), mask=batch.mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_custom_score_callables_additive_and_bilinear():
    batch = make_batch(LENGTHS, 6)
    g = torch.Generator().manual_seed(5)
    wq, wk, v, bias = (torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g,
                       dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64),
                       torch.randn(7, generator=g, dtype=torch.float64))
    q = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)

    def additive(qq, kk):
        return additive_score(qq, kk, wq, wk, v, bias)

    def additive_by_hand(qq, kk):  # w^T tanh(W q + U k + b), one pair at a time
        return torch.stack([v @ torch.tanh(wq @ qq.view(-1) + wk @ kk[0, 0, i] + bias) for i in range(kk.shape[2])])

    expected, _ = reference_attention_pool(batch.sets, q, score=additive_by_hand)
    for got in (attention_pool(batch.padded, q, mask=batch.mask, score=additive),
                attention_pool(batch.packed, q, offsets=batch.offsets, score=additive)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    expected, _ = reference_attention_pool(batch.sets, q, score=lambda qq, kk: (qq.view(-1) @ w @ kk[0, 0].T))
    shared = q[:1].expand(5, -1, -1)
    expected_shared, _ = reference_attention_pool(batch.sets, shared,
                                                  score=lambda qq, kk: (qq.view(-1) @ w @ kk[0, 0].T))
    for got, exp in ((attention_pool(batch.sets, q, score=lambda qq, kk: bilinear_score(qq, kk, w)), expected),
                     (attention_pool(batch.packed, q[0], offsets=batch.offsets,
                                     score=lambda qq, kk: bilinear_score(qq, kk, w)), expected_shared)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


def test_empty_and_fully_masked_sets_give_zeros_with_finite_gradients():
    batch = make_batch([0, 2, 0], 4)
    values = batch.padded.clone().requires_grad_()
    q = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out, w = attention_pool(values, q, mask=batch.mask, return_weights=True)
    assert torch.equal(out[0], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(out[2], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    out.sum().backward()
    assert torch.isfinite(values.grad).all() and torch.isfinite(q.grad).all()
    packed = batch.packed.clone().requires_grad_()
    out_k = attention_pool(packed, q, offsets=batch.offsets)
    torch.testing.assert_close(out_k, out.detach(), rtol=0, atol=1e-12)
    # a batch of nothing but empty sets
    nothing = attention_pool(torch.zeros(0, 4), torch.randn(4), offsets=torch.tensor([0, 0, 0]))
    assert torch.equal(nothing, torch.zeros(2, 4))
    assert torch.equal(attention_pool(torch.zeros(3, 0, 4), torch.randn(4)), torch.zeros(3, 4))


def test_nan_and_inf_at_masked_positions_never_reach_output_or_gradients():
    batch = make_batch(LENGTHS, 8, fill=float("nan"))
    values = batch.padded.clone()
    values[~batch.mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e308] * 2, dtype=torch.float64)
    values.requires_grad_()
    keys = values.detach().clone().requires_grad_()
    q = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = attention_pool(values, q, keys, mask=batch.mask, num_heads=2)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for t in (values.grad, keys.grad, q.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(values.grad[~batch.mask], torch.zeros_like(values.grad[~batch.mask]))
    clean = attention_pool(batch.sets, q.detach(), num_heads=2)
    torch.testing.assert_close(out.detach(), clean, rtol=0, atol=1e-12)


def test_temperature_limits_give_mean_and_argmax():
    batch = make_batch([4, 6, 1], 5, dtype=torch.float32)
    q = torch.randn(5)
    hot = attention_pool(batch.packed, q, offsets=batch.offsets, temperature=1e9)
    torch.testing.assert_close(hot, mean_pool(batch.packed, offsets=batch.offsets), rtol=0, atol=1e-5)
    cold, w = attention_pool(batch.padded, q, mask=batch.mask, temperature=1e-6, return_weights=True)
    for b, s in enumerate(batch.sets):
        best = int((s @ q).argmax())
        torch.testing.assert_close(cold[b], s[best])
        assert float(w[b, 0, 0, best]) == 1.0


def test_gradcheck_padded_and_packed():
    batch = make_batch([3, 0, 2], 4, fill=0.0)
    q = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    v = batch.padded.clone().requires_grad_()
    k = torch.randn_like(v).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v_, k_, q_: attention_pool(v_, q_, k_, mask=batch.mask, num_heads=2, temperature=0.7), (v, k, q))
    p = batch.packed.clone().requires_grad_()
    qb = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p_, q_: attention_pool(p_, q_, offsets=batch.offsets), (p, qb))
    t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t_: attention_pool(p.detach(), qb.detach(), offsets=batch.offsets,
                                                              temperature=t_), (t,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_overflow_and_stays_close_to_float64(dtype):
    # Scores of about 300*300*64/8 = 720k overflow fp16 (max 65504) if computed in the input dtype.
    batch = make_batch([7, 1, 0, 12], 64, dtype=torch.float64)
    values = (batch.padded * 300).nan_to_num(0.0)
    q = torch.randn(2, 64, dtype=torch.float64) * 300
    expected = attention_pool(values, q, mask=batch.mask)
    got, w = attention_pool(values.to(dtype), q.to(dtype), mask=batch.mask, return_weights=True)
    assert got.dtype == dtype and w.dtype == torch.float32
    assert torch.isfinite(got).all()
    # The inputs are rounded to `dtype` first; near-argmax weights then pick nearly the same element, so the
    # output error is dominated by the rounding of values (rel. 2^-8 for fp16, 2^-7 for bf16 of |v| ~ 300*4).
    tol = {torch.float16: 1.0, torch.bfloat16: 8.0}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_bound_on_ordinary_inputs(dtype):
    batch = make_batch([30, 5, 64], 32, dtype=torch.float64, fill=0.0)
    q = torch.randn(3, 32, dtype=torch.float64)
    expected = attention_pool(batch.packed, q, offsets=batch.offsets, num_heads=4)
    got = attention_pool(batch.packed.to(dtype), q.to(dtype), offsets=batch.offsets, num_heads=4)
    # unit values: error ~ the input rounding (fp16 eps 2^-11, bf16 2^-8) times a few
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


def test_autocast_keeps_softmax_in_fp32():
    batch = make_batch([5, 3], 16, dtype=torch.float32, fill=0.0)
    q = torch.randn(16) * 200
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = attention_pool(batch.padded * 200, q, mask=batch.mask, return_weights=True)
    assert w.dtype == torch.float32 and torch.isfinite(out).all()
    expected = attention_pool((batch.padded * 200).double(), q.double(), mask=batch.mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


def test_softmax_pool_with_gate_scores():
    batch = make_batch(LENGTHS, 6)
    gb = make_batch(LENGTHS, 2, seed=4)
    gate, padded_scores = gb.sets, gb.padded  # NaN at the padded positions
    expected = torch.zeros(5, 2, 6, dtype=torch.float64)
    for b, (v, s) in enumerate(zip(batch.sets, gate)):
        if v.shape[0]:
            expected[b] = torch.softmax(s / 0.5, 0).T @ v
    got_p, w_p = softmax_pool(batch.padded, padded_scores, mask=batch.mask, temperature=0.5, return_weights=True)
    got_k = softmax_pool(batch.packed, torch.cat(gate), offsets=batch.offsets, temperature=0.5)
    got_l = softmax_pool(batch.sets, gate, temperature=0.5)
    for got in (got_p, got_k, got_l):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert w_p.shape == (5, 1, 2, 5)
    single = softmax_pool(batch.packed, torch.cat(gate)[:, 0], offsets=batch.offsets, temperature=0.5)
    torch.testing.assert_close(single, expected[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["padded", "packed", "list"])
def test_baselines_against_definition(form):
    batch = make_batch(LENGTHS, 4)
    kw = {"padded": ({"mask": batch.mask}, batch.padded), "packed": ({"offsets": batch.offsets}, batch.packed),
          "list": ({}, batch.sets)}[form]
    means = torch.stack([s.mean(0) if s.shape[0] else torch.zeros(4, dtype=torch.float64) for s in batch.sets])
    sums = torch.stack([s.sum(0) for s in batch.sets])
    maxes = torch.stack([s.amax(0) if s.shape[0] else torch.zeros(4, dtype=torch.float64) for s in batch.sets])
    torch.testing.assert_close(mean_pool(kw[1], **kw[0]), means, rtol=0, atol=1e-12)
    torch.testing.assert_close(sum_pool(kw[1], **kw[0]), sums, rtol=0, atol=1e-12)
    torch.testing.assert_close(max_pool(kw[1], **kw[0]), maxes, rtol=0, atol=0)


def test_baselines_have_finite_gradients_with_nan_padding_and_empty_sets():
    batch = make_batch(LENGTHS, 4)
    for fn in (mean_pool, sum_pool, max_pool):
        x = batch.padded.clone().requires_grad_()
        out = fn(x, mask=batch.mask)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad[~batch.mask] == 0).all()


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda b: attention_pool(b.padded, torch.randn(6, dtype=torch.float64), mask=b.mask), ValueError,
         ["query", "last dim 8", "got 6"]),
        (lambda b: attention_pool(b.padded, torch.randn(2, 2, 2, 8, dtype=torch.float64), mask=b.mask), ValueError,
         ["query", "rank 4"]),
        (lambda b: attention_pool(b.padded, torch.randn(3, 1, 8, dtype=torch.float64), mask=b.mask), ValueError,
         ["query", "B = 5", "(3, 1, 8)"]),
        (lambda b: attention_pool(b.padded, torch.randn(8, dtype=torch.float64), mask=b.mask, num_heads=3),
         ValueError, ["num_heads", "not divisible", "3"]),
        (lambda b: attention_pool(b.padded, torch.randn(8, dtype=torch.float64), mask=b.mask, temperature=0.0),
         ValueError, ["temperature", "> 0", "0.0"]),
        (lambda b: attention_pool(b.padded, torch.randn(8, dtype=torch.float64), mask=b.mask.float()), TypeError,
         ["mask", "float32"]),
        (lambda b: attention_pool(b.padded, [1.0] * 8, mask=b.mask), TypeError, ["query", "list"]),
    ],
)
def test_bad_arguments(call, error, words):
    batch = make_batch(LENGTHS, 8)
    with pytest.raises(error) as info:
        call(batch)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
