"""The set softmax: packed segments against a dense masked softmax, empty sets, masked NaN, half precision."""

import pytest
import torch

from attnpool.functional import masked_softmax, segment_softmax
from tests.conftest import make_batch


def dense_reference(scores_padded, mask):
    out = torch.zeros_like(scores_padded, dtype=torch.float64)
    for b in range(scores_padded.shape[0]):
        kept = mask[b]
        if kept.any():
            out[b, kept] = torch.softmax(scores_padded[b, kept].double(), dim=0)
    return out


@pytest.mark.parametrize("trailing", [(), (3,), (2, 4)])
def test_segment_softmax_equals_dense_softmax(trailing):
    batch = make_batch([4, 0, 1, 7, 3], 1)
    g = torch.Generator().manual_seed(1)
    packed = torch.randn(batch.packed.shape[0], *trailing, generator=g, dtype=torch.float64) * 5
    padded = torch.zeros(5, batch.mask.shape[1], *trailing, dtype=torch.float64)
    padded[batch.mask] = packed
    expected = dense_reference(padded, batch.mask)[batch.mask]
    got = segment_softmax(packed, batch.offsets)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    got_ids = segment_softmax(packed, segment_ids=torch.repeat_interleave(torch.arange(5), batch.lengths),
                              num_segments=5)
    torch.testing.assert_close(got_ids, expected, rtol=0, atol=1e-14)
    dense = masked_softmax(padded.movedim(1, -1), batch.mask.view(5, *([1] * len(trailing)), -1))
    torch.testing.assert_close(dense.movedim(-1, 1)[batch.mask], expected, rtol=0, atol=1e-14)


def test_segment_softmax_unsorted_segment_ids():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ids = torch.tensor([1, 0, 1, 0])
    got = segment_softmax(scores, segment_ids=ids, num_segments=3)
    torch.testing.assert_close(got[[1, 3]], torch.softmax(scores[[1, 3]], 0))
    torch.testing.assert_close(got[[0, 2]], torch.softmax(scores[[0, 2]], 0))


def test_fully_masked_row_gives_zero_weights_and_finite_gradient():
    scores = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    w = masked_softmax(scores, mask)
    assert torch.equal(w[1], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(w.sum(-1), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    (w * torch.randn_like(w)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[~mask], torch.zeros_like(scores.grad[~mask]))


def test_masked_nan_and_inf_scores_never_leak():
    scores = torch.tensor([[0.5, float("nan"), float("inf"), -1.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False, True]])
    w = masked_softmax(scores, mask)
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[0.5, -1.0]]), -1)[:, [0, 0, 0, 1]] * mask)
    w.sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_all_minus_inf_segment_gives_zeros():
    scores = torch.tensor([float("-inf"), float("-inf"), 0.0])
    w = segment_softmax(scores, torch.tensor([0, 2, 3]))
    assert torch.equal(w, torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_are_normalized_in_fp32_without_overflow(dtype):
    # exp(60000) overflows any dtype without the max shift; fp16 can hold 60000 but not its exp.
    scores = torch.tensor([60000.0, 59999.0, -60000.0], dtype=dtype)
    w = segment_softmax(scores, torch.tensor([0, 3]))
    assert w.dtype == torch.float32
    expected = torch.softmax(scores.double(), 0).float()
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)


def test_segment_softmax_gradcheck():
    scores = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 4, 9])
    assert torch.autograd.gradcheck(lambda s: segment_softmax(s, offsets), (scores,))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    dense = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: masked_softmax(s, mask), (dense,))


def test_segment_softmax_argument_errors():
    with pytest.raises(ValueError, match="offsets"):
        segment_softmax(torch.randn(4))
    with pytest.raises(ValueError, match="num_segments"):
        segment_softmax(torch.randn(4), segment_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"offsets\[-1\] == N = 4"):
        segment_softmax(torch.randn(4), torch.tensor([0, 3]))
