"""Mean, max, sum, [CLS] and last-token pooling in every input form, with masks on either side."""

import pytest
import torch

from attnpool.nn import ClsPool, LastTokenPool, MaxPool, MeanPool, SumPool
from tests.conftest import make_batch

LENGTHS = [3, 1, 0, 5, 2]
ZERO = torch.zeros(4, dtype=torch.float64)


def expected(kind, s):
    if s.shape[0] == 0:
        return ZERO
    return {"mean": s.mean(0), "sum": s.sum(0), "max": s.amax(0), "cls": s[0], "last": s[-1]}[kind]


@pytest.mark.parametrize(("kind", "module"), [("mean", MeanPool()), ("sum", SumPool()), ("max", MaxPool()),
                                              ("cls", ClsPool()), ("last", LastTokenPool())])
def test_every_form(kind, module):
    batch = make_batch(LENGTHS, 4)
    want = torch.stack([expected(kind, s) for s in batch.sets])
    for out in (module(batch.padded, batch.mask), module(batch.packed, offsets=batch.offsets),
                module(batch.sets), module(batch.padded, lengths=batch.lengths)):
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("module", "pick"), [(ClsPool(), 0), (LastTokenPool(), -1)])
def test_left_padding(module, pick):
    batch = make_batch(LENGTHS, 4)
    left = torch.full_like(batch.padded, float("nan"))
    mask = torch.zeros_like(batch.mask)
    for b, s in enumerate(batch.sets):
        n = s.shape[0]
        if n:
            left[b, -n:] = s
            mask[b, -n:] = True
    want = torch.stack([s[pick] if s.shape[0] else ZERO for s in batch.sets])
    torch.testing.assert_close(module(left, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("module", [MeanPool(), SumPool(), MaxPool(), ClsPool(), LastTokenPool()])
def test_gradients_finite_with_nan_padding(module):
    batch = make_batch(LENGTHS, 4)
    x = batch.padded.clone().requires_grad_()
    module(x, batch.mask).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~batch.mask] == 0).all()


def test_baselines_return_no_weights():
    with pytest.raises(TypeError, match="return_weights: MeanPool computes no attention weights"):
        MeanPool()(torch.randn(2, 3, 4), return_weights=True)


def test_empty_batch_of_padded_sets():
    from attnpool.nn import AttentionPool, GatedAttentionPool

    x, mask = torch.randn(0, 3, 4), torch.ones(0, 3, dtype=torch.bool)
    for module in (AttentionPool(4), GatedAttentionPool(4), MeanPool(), MaxPool(), ClsPool(), LastTokenPool()):
        assert module(x, mask).shape == (0, 4)
