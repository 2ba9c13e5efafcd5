"""ChannelSoftmaxPool and channel_softmax_pool: the formula per channel, every input form, the limits in t, and the
properties of a set pool."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpool.functional import channel_softmax_pool
from attnpool.kernels import use_kernel
from attnpool.nn import ChannelSoftmaxPool
from tests.conftest import make_batch
from tests.nn._set_module_checks import (
    check_batch_independence,
    check_empty_sets,
    check_forms_agree,
    check_gradcheck,
    check_nan_padding,
    check_padding_invariance,
    check_permutation,
    check_shapes,
)

LENGTHS = [4, 0, 1, 6]
KERNELS = ["auto", "reference"]


def formula(sets, t):
    """One set and one channel at a time, float64."""
    t = torch.as_tensor(t, dtype=torch.float64).expand(sets[0].shape[1])
    out = torch.zeros(len(sets), sets[0].shape[1], dtype=torch.float64)
    for b, s in enumerate(sets):
        for c in range(s.shape[1]):
            if s.shape[0]:
                a = torch.softmax(t[c] * s[:, c].double(), 0)
                out[b, c] = (a * s[:, c].double()).sum()
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_the_formula_in_every_form(kernel, per_channel):
    batch = make_batch(LENGTHS, 5, seed=3)
    t = torch.tensor([0.3, -1.0, 2.0, 0.0, 5.0], dtype=torch.float64) if per_channel else 1.7
    want = formula(batch.sets, t)
    with use_kernel(kernel):
        outs = [channel_softmax_pool(batch.padded, t, mask=batch.mask, return_weights=True),
                channel_softmax_pool(batch.packed, t, offsets=batch.offsets, return_weights=True),
                channel_softmax_pool(batch.sets, t, return_weights=True)]
        by_lengths = channel_softmax_pool(batch.packed, t, lengths=batch.lengths)
    for out, _ in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_lengths, want, rtol=0, atol=1e-12)
    (_, w_p), (_, w_k), (_, w_l) = outs
    assert w_p.shape == (4, 5, 6) and w_k.shape == (11, 5) and [w.shape for w in w_l] == [(5, n) for n in LENGTHS]
    torch.testing.assert_close(w_p.transpose(1, 2)[batch.mask], w_k, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_weights_are_differentiable_like_a_softmax(kernel):
    """The weights' gradients with respect to x and t are those of a per-set torch.softmax (float64)."""
    batch = make_batch(LENGTHS, 3, seed=5)
    r = torch.randn(11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = batch.packed.clone().requires_grad_()
    t = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    with use_kernel(kernel):
        _, w = channel_softmax_pool(x, t, offsets=batch.offsets, return_weights=True)
    gx, gt = torch.autograd.grad((w * r).sum(), [x, t])
    x2, t2 = batch.packed.clone().requires_grad_(), t.detach().clone().requires_grad_()
    pieces = [torch.softmax(t2 * s, 0) for s in torch.split(x2, LENGTHS)]
    gx2, gt2 = torch.autograd.grad((torch.cat(pieces) * r).sum(), [x2, t2])
    torch.testing.assert_close(gx, gx2, rtol=0, atol=1e-12)
    torch.testing.assert_close(gt, gt2, rtol=0, atol=1e-12)


def test_limits_in_t_mean_max_min():
    batch = make_batch([5, 3], 4, seed=1)
    mean = torch.stack([s.mean(0) for s in batch.sets])
    torch.testing.assert_close(channel_softmax_pool(batch.sets, 0.0), mean, rtol=0, atol=1e-12)
    big = channel_softmax_pool(batch.sets, 1e4)
    torch.testing.assert_close(big, torch.stack([s.amax(0) for s in batch.sets]), rtol=0, atol=1e-6)
    small = channel_softmax_pool(batch.sets, -1e4)
    torch.testing.assert_close(small, torch.stack([s.amin(0) for s in batch.sets]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_keeps_its_dtype_and_does_not_overflow(dtype):
    x = torch.tensor([[60000.0, -60000.0], [50000.0, 1.0]], dtype=dtype)  # exp(t x) overflows any float type
    out = channel_softmax_pool(x, 1.0, offsets=torch.tensor([0, 2]))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), x.float().amax(0, keepdim=True), rtol=1e-2, atol=0)


def test_module_learns_t_and_matches_the_functional():
    torch.manual_seed(0)
    pool = ChannelSoftmaxPool(0.5, learn=True, channels=3, dtype=torch.float64)
    batch = make_batch(LENGTHS, 3, seed=2)
    out = pool(batch.packed, offsets=batch.offsets)
    torch.testing.assert_close(out, formula(batch.sets, pool.t.detach()), rtol=0, atol=1e-12)
    out.square().sum().backward()
    assert pool.t.grad is not None and pool.t.grad.shape == (3,) and torch.isfinite(pool.t.grad).all()
    opt = torch.optim.SGD(pool.parameters(), lr=0.1)
    before = pool.t.detach().clone()
    opt.step()
    assert not torch.equal(before, pool.t.detach())
    pool.reset_parameters()
    assert torch.equal(pool.t.detach(), torch.full((3,), 0.5, dtype=torch.float64))


def test_fixed_t_is_a_buffer_and_repr_names_the_configuration():
    pool = ChannelSoftmaxPool(2.0)
    assert list(pool.parameters()) == [] and pool.t.item() == 2.0
    assert repr(pool) == "ChannelSoftmaxPool(t=2, learn=False, channels=1)"
    assert "channels=4" in repr(ChannelSoftmaxPool(learn=True, channels=4))
    meta = ChannelSoftmaxPool(learn=True, channels=4, device="meta", dtype=torch.float64)
    assert meta.t.device.type == "meta" and meta.t.dtype == torch.float64


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"t": float("nan")}, ["t", "finite"]),
    ({"channels": 0}, ["channels", ">= 1"]),
    ({"channels": 3}, ["channels", "learn=True"]),
])
def test_bad_configuration_names_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        ChannelSoftmaxPool(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_input_names_the_argument():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"t: expected .*\[D\] = \[4\]"):
        channel_softmax_pool(x, torch.ones(3), offsets=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="t: expected a finite number"):
        channel_softmax_pool(x, float("inf"), offsets=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"x: expected D = channels = 3, got D = 4"):
        ChannelSoftmaxPool(learn=True, channels=3)(x, offsets=torch.tensor([0, 5]))


# the shared set-pool checks (weights: one "query" per channel, H = 1)
@pytest.fixture(params=[1, 6])
def module(request):
    torch.manual_seed(0)
    return ChannelSoftmaxPool(0.8, learn=True, channels=request.param, dtype=torch.float64)


def test_shapes(module):
    check_shapes(module.float(), "pool", 6, 1, weight_rows=6)


def test_forms_agree(module):
    check_forms_agree(module.float(), "pool", 6)


def test_empty_sets(module):
    check_empty_sets(module, "pool", 6, 6)


def test_nan_padding(module):
    check_nan_padding(module, "pool", 6)


def test_permutation(module):
    check_permutation(module, "pool", 6, weight_rows=6)


def test_padding_invariance(module):
    check_padding_invariance(module, "pool", 6)


def test_batch_independence(module):
    check_batch_independence(module, "pool", 6)


def test_gradcheck(module):
    check_gradcheck(module, 6)


batches = st.fixed_dictionaries({
    "lengths": st.lists(st.integers(0, 9), min_size=1, max_size=6),
    "dim": st.sampled_from([1, 3, 8, 9]),
    "seed": st.integers(0, 2**16),
    "t": st.floats(-10.0, 10.0),
})


@settings(max_examples=40, deadline=None)
@given(batches)
def test_properties(p):
    """packed == padded == list, permutation invariance, padding invariance, weights summing to 1 per channel."""
    batch = make_batch(p["lengths"], p["dim"], seed=p["seed"])
    loose = make_batch(p["lengths"], p["dim"], seed=p["seed"], pad_to=max(p["lengths"]) + 3)
    t = p["t"]
    out_p, w_p = channel_softmax_pool(batch.padded, t, mask=batch.mask, return_weights=True)
    out_k = channel_softmax_pool(batch.packed, t, offsets=batch.offsets)
    torch.testing.assert_close(out_k, out_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(channel_softmax_pool(batch.sets, t), out_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(channel_softmax_pool(loose.padded, t, mask=loose.mask), out_p, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(p["seed"])
    shuffled = [s[torch.randperm(s.shape[0], generator=g)] for s in batch.sets]
    torch.testing.assert_close(channel_softmax_pool(shuffled, t), out_p, rtol=0, atol=1e-12)
    sums = w_p.sum(-1)
    nonempty = batch.lengths > 0
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]), rtol=0, atol=1e-12)
    assert torch.equal(sums[~nonempty], torch.zeros_like(sums[~nonempty])) and (w_p >= 0).all()
    torch.testing.assert_close(out_p, formula(batch.sets, t), rtol=0, atol=1e-12)
