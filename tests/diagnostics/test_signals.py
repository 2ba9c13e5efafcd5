"""The signals against values computed by hand on small weight tensors."""

import math

import pytest
import torch

from attnpool.diagnostics import signals as sg

W = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
UNIFORM = torch.full((4,), 0.25, dtype=torch.float64)
ONE_HOT = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)


def close(a, b):
    return math.isclose(float(a), b, rel_tol=1e-12, abs_tol=1e-12)


def test_entropy_effective_count_max_topk_gini_by_hand():
    assert close(sg.entropy(W), 1.5 * math.log(2))
    assert close(sg.normalized_entropy(W), 1.5 * math.log(2) / math.log(3))
    assert close(sg.effective_count(W), 1 / (0.25 + 0.0625 + 0.0625))  # 8/3
    assert close(sg.effective_fraction(W), 8 / 9)
    assert close(sg.max_weight(W), 0.5)
    assert close(sg.topk_mass(W, 2), 0.75)
    # sum over ordered pairs |a_i - a_j| = 4 * 0.25 = 1; / (2 n sum a) = 1/6
    assert close(sg.gini(W), 1 / 6)


def test_uniform_and_one_hot_ends():
    assert close(sg.normalized_entropy(UNIFORM), 1.0)
    assert close(sg.effective_fraction(UNIFORM), 1.0)
    assert close(sg.gini(UNIFORM), 0.0)
    assert close(sg.topk_mass(UNIFORM, 3), 0.75)
    assert close(sg.normalized_entropy(ONE_HOT), 0.0)
    assert close(sg.effective_count(ONE_HOT), 1.0)
    assert close(sg.effective_fraction(ONE_HOT), 0.25)
    assert close(sg.gini(ONE_HOT), 0.75)  # 1 - 1/n


def test_padding_is_not_counted_as_elements():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    n = torch.tensor([2])
    assert close(sg.normalized_entropy(w, n)[0], 1.0)
    assert close(sg.effective_fraction(w, n)[0], 1.0)
    assert close(sg.gini(w, n)[0], 0.0)
    # the same weights read as 4 real elements: two of them get nothing
    assert close(sg.normalized_entropy(w)[0], 0.5)
    assert close(sg.gini(w)[0], 0.5)


def test_undefined_values_are_nan():
    single = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    n1 = torch.tensor([1])
    assert math.isnan(sg.normalized_entropy(single, n1)[0])
    assert close(sg.effective_count(single)[0], 1.0)
    empty = torch.zeros(1, 3, dtype=torch.float64)
    n0 = torch.tensor([0])
    for value in (sg.normalized_entropy(empty, n0), sg.effective_count(empty), sg.max_weight(empty, n0),
                  sg.topk_mass(empty, 2, n0), sg.gini(empty, n0), sg.position_centroid(empty, n0)):
        assert math.isnan(value[0])
    assert close(sg.topk_mass(torch.tensor([0.5, 0.5]), 3), 1.0)  # n <= k: all the mass
    with pytest.raises(ValueError, match="k: expected a positive int"):
        sg.topk_mass(W, 0)


def test_js_divergence_by_hand():
    assert close(sg.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])), 1.0)
    assert close(sg.js_divergence(W, W), 0.0)
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    kl_pm = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_qm = math.log2(1 / 0.75)
    assert close(sg.js_divergence(p, q), 0.5 * (kl_pm + kl_qm))
    assert close(sg.js_divergence(p, q), sg.js_divergence(q, p))


def test_query_sensitivity_is_js_for_two_queries_and_zero_for_identical():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert close(sg.query_sensitivity(torch.stack([p, q])), float(sg.js_divergence(p, q)))
    assert close(sg.query_sensitivity(torch.stack([W, W, W])), 0.0)
    # an invalid query is left out; fewer than two valid ones is NaN
    three = torch.stack([p, q, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    assert close(sg.query_sensitivity(three, torch.tensor([True, True, False])), float(sg.js_divergence(p, q)))
    assert math.isnan(sg.query_sensitivity(three, torch.tensor([True, False, False])))


def test_head_redundancy_matrix():
    a = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    w = torch.stack([a, a, b]).unsqueeze(0)  # [1 set, 3 heads, L]
    red = sg.head_redundancy(w)
    assert red.shape == (3, 3)
    assert close(red[0, 1], 0.0) and close(red[0, 0], 0.0)
    assert close(red[0, 2], float(sg.js_divergence(a, b))) and close(red[2, 1], float(sg.js_divergence(a, b)))


def test_position_lift_and_recency_by_hand():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    n = torch.tensor([3, 2])
    lift, count = sg.position_lift(w, n, max_positions=4)
    assert close(lift[0], (3 * 1.0 + 2 * 0.5) / 2) and close(lift[1], (0 + 2 * 0.5) / 2) and close(lift[2], 0.0)
    assert math.isnan(lift[3]) and count.tolist() == [2, 2, 1, 0]
    last, _ = sg.position_lift(w, n, max_positions=2, from_end=True)
    assert close(last[0], (3 * 0.0 + 2 * 0.5) / 2) and close(last[1], (3 * 0.0 + 2 * 0.5) / 2)
    # uniform weights have lift 1 everywhere
    flat, _ = sg.position_lift(UNIFORM.unsqueeze(0), None, max_positions=4)
    assert torch.allclose(flat, torch.ones(4, dtype=torch.float64))


def test_relative_position_lift_by_hand():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    rel = sg.relative_position_lift(w, torch.tensor([3, 2]), bins=2)
    # set 1: bin 0 holds positions 0 and 1 (2/3 of the set) and all the mass: 1.5; bin 1: 0. set 2: 1 and 1.
    assert close(rel[0], (1.5 + 1.0) / 2) and close(rel[1], (0.0 + 1.0) / 2)


def test_position_centroid():
    assert close(sg.position_centroid(torch.tensor([1.0, 0.0, 0.0])), 0.0)
    assert close(sg.position_centroid(torch.tensor([0.0, 0.0, 1.0])), 1.0)
    assert close(sg.position_centroid(torch.full((5,), 0.2, dtype=torch.float64)), 0.5)
