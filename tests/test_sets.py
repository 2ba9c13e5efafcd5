"""Input forms: parsing and the errors for bad input (each names the argument, the expectation and what came)."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpool import _sets, as_sets
from attnpool.functional import attention_pool


def test_three_forms_describe_the_same_sets(ragged):
    padded = as_sets(ragged.padded, mask=ragged.mask)
    packed = as_sets(ragged.packed, offsets=ragged.offsets)
    by_lengths = as_sets(ragged.packed, lengths=ragged.lengths)
    listed = as_sets(ragged.sets)
    for s in (padded, packed, by_lengths, listed):
        assert s.lengths.tolist() == [3, 1, 0, 5, 2]
        assert s.batch_size == 5
    assert padded.layout == "padded" and packed.layout == "packed" and listed.layout == "list"
    assert torch.equal(packed.segment_ids(), torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 3, 4, 4]))


def test_integer_mask_is_accepted_and_means_keep(ragged):
    s = as_sets(ragged.padded, mask=ragged.mask.long())
    assert s.mask.dtype == torch.bool and torch.equal(s.mask, ragged.mask)


def test_padded_lengths_stand_for_a_prefix_mask(ragged):
    s = as_sets(ragged.padded, lengths=ragged.lengths)
    assert torch.equal(s.mask, ragged.mask)


@pytest.mark.parametrize("lengths", [[3, 1, 0, 5, 2], [3, 1, 4], [0], []])
def test_all_nonempty_is_true_only_when_no_set_is_empty(lengths):
    """The flag lets modules skip zeroing empty sets' outputs, so a True on a batch with an empty set would leak a
    bias into it; a padded mask is never read on the host, so there it stays False (unknown)."""
    d = 3
    packed = torch.randn(sum(lengths), d)
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    truth = all(n > 0 for n in lengths)
    assert as_sets(packed, offsets=offsets).all_nonempty is truth
    assert as_sets(packed, lengths=lens).all_nonempty is truth
    if lengths:
        assert as_sets(list(torch.split(packed, lengths))).all_nonempty is truth
    l_max = max(lengths, default=0)
    padded = torch.zeros(len(lengths), l_max, d)
    assert as_sets(padded, lengths=lens).all_nonempty is truth
    assert as_sets(padded, mask=torch.arange(l_max) < lens[:, None]).all_nonempty is False
    assert as_sets(padded).all_nonempty is (l_max > 0 or not lengths)


def test_padded_without_mask_keeps_everything():
    s = as_sets(torch.randn(2, 4, 3))
    assert s.mask is None and s.lengths.tolist() == [4, 4]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"values": torch.randn(2, 3, 4, 5)}, ValueError, ["values", "rank 4", "[B, L, D]"]),
        ({"values": torch.randn(4)}, ValueError, ["values", "rank 1"]),
        ({"values": torch.randint(0, 3, (2, 3, 4))}, TypeError, ["values", "floating-point", "int64"]),
        ({"values": torch.randn(2, 3, 4), "mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError,
         ["mask", "(2, 3)", "(2, 4)"]),
        ({"values": torch.randn(2, 3, 4), "mask": torch.ones(2, 3)}, TypeError, ["mask", "float32", "bool"]),
        ({"values": torch.randn(2, 3, 4), "mask": torch.full((2, 3), 2)}, ValueError, ["mask", "0 and 1"]),
        ({"values": torch.randn(5, 4), "offsets": torch.tensor([1, 3, 5])}, ValueError, ["offsets[0] == 0", "got 1"]),
        ({"values": torch.randn(5, 4), "offsets": torch.tensor([0, 4, 3, 5])}, ValueError,
         ["offsets", "non-decreasing", "[0, 4, 3, 5]"]),
        ({"values": torch.randn(5, 4), "offsets": torch.tensor([0, 2, 4])}, ValueError,
         ["offsets[-1] == N = 5", "got 4"]),
        ({"values": torch.randn(5, 4), "offsets": torch.tensor([0.0, 5.0])}, TypeError, ["offsets", "integer"]),
        ({"values": torch.randn(5, 4)}, ValueError, ["offsets", "lengths", "exactly one"]),
        ({"values": torch.randn(5, 4), "lengths": torch.tensor([2, 2])}, ValueError, ["lengths", "N = 5", "4"]),
        ({"values": torch.randn(5, 4), "lengths": torch.tensor([6, -1])}, ValueError, ["lengths", "non-negative"]),
        ({"values": torch.randn(5, 4), "mask": torch.ones(5, dtype=torch.bool), "lengths": torch.tensor([5])},
         ValueError, ["mask", "packed"]),
        ({"values": torch.randn(2, 3, 4), "offsets": torch.tensor([0, 3, 6])}, ValueError, ["offsets", "padded"]),
        ({"values": torch.randn(2, 3, 4), "lengths": torch.tensor([1, 4])}, ValueError, ["lengths", "[0, 3]"]),
        ({"values": [torch.randn(2, 4), torch.randn(3, 5)]}, ValueError, ["values", "one feature size", "[4, 5]"]),
        ({"values": [torch.randn(2, 4), torch.randn(3)]}, ValueError, ["values", "[L_i, D]", "(3,)"]),
        ({"values": []}, ValueError, ["values", "empty list"]),
        ({"values": "abc"}, TypeError, ["values", "str"]),
    ],
)
def test_bad_input_names_argument_expectation_and_actual(kwargs, error, words):
    values = kwargs.pop("values")
    with pytest.raises(error) as info:
        as_sets(values, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_keys_must_match_the_values_layout(ragged):
    q = torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keys: expected shape \[5, 5, D_k\].*\(5, 7, 8\)"):
        attention_pool(ragged.padded, q, torch.randn(5, 7, 8, dtype=torch.float64), mask=ragged.mask)
    with pytest.raises(ValueError, match=r"keys: expected shape \[11, D_k\]"):
        attention_pool(ragged.packed, q, torch.randn(10, 8, dtype=torch.float64), offsets=ragged.offsets)
    with pytest.raises(TypeError, match="keys: values were given as a list"):
        attention_pool(ragged.sets, q, ragged.packed)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), max_size=8), form=st.sampled_from(["offsets", "lengths"]),
       breaks=st.sampled_from([None, "first", "last", "order", "negative"]))
def test_host_checks_agree_with_the_tensor_checks(lengths, form, breaks):
    """CPU offsets and lengths are checked through a NumPy view (a few NumPy calls instead of a dozen small aten
    ops); the tensor checks remain for compiled graphs, functorch transforms and other devices. Both must accept
    the same inputs with the same lengths and emptiness flag, and reject the same ones with the same message."""
    n = sum(lengths)
    packed = torch.randn(n, 2)
    lens = torch.tensor(lengths, dtype=torch.long)
    arg = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]) if form == "offsets" else lens.clone()
    if breaks == "first" and form == "offsets":
        arg[0] = 1
    elif breaks == "last" and arg.shape[0] > 0:
        arg[-1] += 1
    elif breaks == "order" and form == "offsets" and arg.shape[0] > 2:
        arg[1] = arg[2] + 1
    elif breaks == "negative" and form == "lengths" and arg.shape[0] > 1:
        arg[0], arg[1] = -1, arg[1] + arg[0] + 1

    def describe(host: bool):
        with mock.patch.object(_sets, "_host_view", _sets._host_view if host else lambda t: None):
            try:
                s = as_sets(packed, **{form: arg})
            except ValueError as e:
                return str(e)
            return s.offsets.tolist(), s.lengths.tolist(), s.lengths.dtype, s.all_nonempty

    assert describe(host=True) == describe(host=False)


def test_host_view_steps_aside_inside_functorch_and_tracing():
    """Under ``torch.func.vmap`` a batched tensor cannot be viewed by NumPy, and under ``torch.jit.trace`` what NumPy
    computed would enter the graph as a constant: the tensor checks run instead."""
    seen = []

    def pool_one(x):
        seen.append(_sets._host_view(torch.tensor([0, 2]) + 0 * x[0, 0].long()))
        return as_sets(x, offsets=torch.tensor([0, 2])).values.sum()

    torch.func.vmap(pool_one)(torch.randn(3, 2, 4))
    assert seen == [None]

    def lengths_of(x, offsets):
        seen.append(_sets._host_view(offsets))
        return as_sets(x, offsets=offsets).lengths

    traced = torch.jit.trace(lengths_of, (torch.randn(5, 2), torch.tensor([0, 2, 5])), check_trace=False)
    assert seen[1] is None
    assert traced(torch.randn(4, 2), torch.tensor([0, 1, 4])).tolist() == [1, 3]  # not the traced example's [2, 3]
    assert _sets._host_view(torch.tensor([0, 2])) is not None
