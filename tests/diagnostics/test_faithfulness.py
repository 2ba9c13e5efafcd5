"""Faithfulness: attention that predicts importance against attention that does not."""

import pytest
import torch
from torch import nn

from attnpool.diagnostics import analyze, capture, faithfulness
from attnpool.nn import AttentionPool, GatedAttentionPool, MeanPool
from tests.diagnostics.scripted import random_sets


def sharp_pool(dim: int = 8) -> AttentionPool:
    pool = AttentionPool(dim)
    with torch.no_grad():
        pool.query.zero_()
        pool.query[0, 0] = 6.0  # attends to the elements with a large feature 0
    return pool


class Faithful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = sharp_pool()

    def forward(self, xs):
        return self.pool(xs)


class Decoy(nn.Module):
    """Computes attention on feature 0, but predicts from the mean of the other features."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = sharp_pool()
        self.mean = MeanPool()

    def forward(self, xs):
        return self.mean(xs)[:, 1:] + 0 * self.pool(xs)[:, 1:]


SETS = random_sets(60, dim=8, low=6, high=16)


def test_attention_that_drives_the_output_is_faithful_and_a_decoy_is_not():
    good = faithfulness(Faithful().eval(), SETS, k=1, num_random=8, batch_size=16)
    bad = faithfulness(Decoy().eval(), SETS, k=1, num_random=8, batch_size=16)
    assert good.module == bad.module == "pool" and good.num_sets == bad.num_sets == 60
    assert good.ratio > 3 and good.ratio_ci[0] > 2 and good.win_rate > 0.9
    assert 0.6 < bad.ratio < 1.25 and bad.ratio_ci[0] < 1 < bad.ratio_ci[1]
    # the alert, through the report
    with torch.no_grad(), capture(Decoy()) as rec:
        Decoy()(SETS)
    with torch.no_grad(), capture(Faithful()) as rec_good:
        Faithful()(SETS)
    assert "faithfulness.low" in analyze(rec, faithfulness=[bad]).codes
    assert "faithfulness.low" not in analyze(rec_good, faithfulness=[good]).codes


def test_k_and_small_sets_and_custom_distance():
    sets = [torch.randn(2, 8), *random_sets(10, dim=8, low=5, high=8)]
    res = faithfulness(Faithful(), sets, k=2, distance=lambda a, b: (a[:, 0] - b[:, 0]).abs())
    assert res.num_sets == 10 and res.k == 2  # the set of 2 elements cannot lose 2
    with pytest.raises(ValueError, match="no set has more than k = 3"):
        faithfulness(Faithful(), [torch.randn(3, 8)], k=3)


def test_the_module_must_be_named_when_ambiguous_and_must_pool_the_input_rows():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = sharp_pool(), GatedAttentionPool(8, 8)

        def forward(self, xs):
            return self.a(xs) + self.b(xs)

    with pytest.raises(ValueError, match=r"module: the model has 2 attnpool modules with weights \['a', 'b'\]"):
        faithfulness(Two(), SETS[:4])
    assert faithfulness(Two(), SETS[:4], module="b").module == "b"

    class WithCls(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.cls = sharp_pool(), nn.Parameter(torch.zeros(1, 8))

        def forward(self, xs):
            return self.pool([torch.cat([self.cls, x]) for x in xs])

    with pytest.raises(ValueError, match="its elements must be the input rows"):
        faithfulness(WithCls(), SETS[:4])
    with pytest.raises(ValueError, match="k: expected a positive int"):
        faithfulness(Faithful(), SETS, k=0)
