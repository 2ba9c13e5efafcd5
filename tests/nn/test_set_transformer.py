"""Set Transformer blocks: MAB, PMA (pooling), SAB and ISAB (set-to-set), against the paper's formulas and the
official reference code's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from attnpool.nn import ISAB, MAB, PMA, SAB, register_weights_hook
from tests.nn._set_module_checks import (
    LENGTHS,
    check_batch_independence,
    check_empty_sets,
    check_factory_kwargs,
    check_forms_agree,
    check_gradcheck,
    check_nan_padding,
    check_padding_invariance,
    check_permutation,
    check_reset_and_repr,
    check_shapes,
    layer_norm,
    linear,
    mab,
    make_batch,
    multihead_weights,
    row_ff,
)


@dataclass
class Case:
    cls: type
    args: tuple
    kwargs: dict[str, Any]
    kind: str  # "pool" or "set"
    in_dim: int
    out_dim: int
    num_out: int = 1  # seeds (pool)
    weight_rows: int | None = None  # Q of the returned weights, when in the standard [B, H, Q, L] layout
    heads: int = 1

    def make(self, **kw: Any):
        torch.manual_seed(0)
        return self.cls(*self.args, **{**self.kwargs, **kw})

    def __str__(self) -> str:
        return f"{self.cls.__name__}{self.args}{self.kwargs}"


REF = {"residual": "projected_query", "out_proj": False, "scale": 8**-0.5}
CASES = [
    Case(PMA, (8, 1, 2), {}, "pool", 8, 8, 1, 1, 2),
    Case(PMA, (8, 3, 2), {"layer_norm": True, "ff_hidden_dim": 12}, "pool", 8, 8, 3, 3, 2),
    Case(PMA, (8, 2, 4), {"input_ff": False, "layer_norm": True, **REF}, "pool", 8, 8, 2, 2, 4),
    Case(SAB, (8, 2), {}, "set", 8, 8, heads=2),
    Case(SAB, (8, 2), {"in_dim": 6, "layer_norm": True, "ff_hidden_dim": 12, **REF}, "set", 6, 8, heads=2),
    Case(ISAB, (8, 3, 2), {}, "set", 8, 8, weight_rows=3, heads=2),
    Case(ISAB, (8, 2, 4), {"in_dim": 6, "layer_norm": True, **REF}, "set", 6, 8, weight_rows=2, heads=4),
]
IDS = [str(c) for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes(case):
    check_shapes(case.make(), case.kind, case.out_dim, case.num_out, case.in_dim, case.weight_rows, case.heads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padded_packed_list_agree(case):
    check_forms_agree(case.make(), case.kind, case.in_dim, weights=case.weight_rows is not None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_sets_give_zero_and_finite_grads(case):
    check_empty_sets(case.make(dtype=torch.float64), case.kind, case.in_dim, case.out_dim)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_in_padding_does_not_leak(case):
    check_nan_padding(case.make(dtype=torch.float64), case.kind, case.in_dim)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_permutation_invariance_or_equivariance(case):
    check_permutation(case.make(dtype=torch.float64), case.kind, case.in_dim, case.weight_rows)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padding_invariance(case):
    check_padding_invariance(case.make(dtype=torch.float64), case.kind, case.in_dim)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_independence(case):
    check_batch_independence(case.make(dtype=torch.float64), case.kind, case.in_dim)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=[IDS[1], IDS[4], IDS[6]])
def test_gradcheck(case):
    small = {PMA: (4, 2, 2), SAB: (4, 2), ISAB: (4, 2, 2)}[case.cls]
    kwargs = {**case.kwargs, "dtype": torch.float64}
    if "scale" in kwargs:
        kwargs["scale"] = 0.5
    if "in_dim" in kwargs:
        kwargs["in_dim"] = 3
    torch.manual_seed(0)
    check_gradcheck(case.cls(*small, **kwargs), kwargs.get("in_dim", 4))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factory_kwargs(case):
    check_factory_kwargs(lambda **kw: case.make(**kw), case.in_dim)


def test_reset_parameters_and_extra_repr():
    check_reset_and_repr(PMA(8, 3, 2), ["dim=8", "num_seeds=3", "num_heads=2", "input_ff=True", "layer_norm=False",
                                        "residual=query"])
    check_reset_and_repr(SAB(8, 2, in_dim=6, residual="projected_query", scale=0.25),
                         ["in_dim=6", "query_dim=6", "kv_dim=6", "residual=projected_query", "scale=0.25"])
    check_reset_and_repr(ISAB(8, 5, 4, layer_norm=True, ff_hidden_dim=16),
                         ["num_inducing=5", "num_heads=4", "layer_norm=True", "ff_hidden_dim=16"])
    check_reset_and_repr(MAB(8, 2, kv_dim=3), ["dim=8", "kv_dim=3"])


# ---------------------------------------------------------------------------------------------------------------
# Against the paper's formulas, one set at a time, in float64 (helpers in _set_module_checks).
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.cls is PMA], ids=[i for i, c in zip(IDS, CASES)
                                                                          if c.cls is PMA])
def test_pma_matches_float64_reference(case):
    m = case.make(dtype=torch.float64)
    batch = make_batch(LENGTHS, case.in_dim)
    out, weights = m(batch.sets, return_weights=True)
    for b, s in enumerate(batch.sets):
        z = row_ff(m.input_ff, s) if m.input_ff is not None else s
        expected = mab(m.mab, m.seeds, z) if s.shape[0] else torch.zeros(case.num_out, case.out_dim,
                                                                          dtype=torch.float64)
        got = out[b] if case.num_out > 1 else out[b].unsqueeze(0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(weights[b], multihead_weights(m.mab.attn, m.seeds, z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.cls is SAB], ids=[i for i, c in zip(IDS, CASES)
                                                                          if c.cls is SAB])
def test_sab_matches_float64_reference(case):
    m = case.make(dtype=torch.float64)
    batch = make_batch(LENGTHS, case.in_dim)
    out, weights = m(batch.sets, return_weights=True)
    out_p, weights_p = m(batch.padded, batch.mask, return_weights=True)
    for b, s in enumerate(batch.sets):
        n = s.shape[0]
        torch.testing.assert_close(out[b], mab(m.mab, s, s), rtol=0, atol=1e-10)
        expected_w = multihead_weights(m.mab.attn, s, s)
        torch.testing.assert_close(weights[b], expected_w, rtol=0, atol=1e-10)
        torch.testing.assert_close(weights_p[b, :, :n, :n], expected_w, rtol=0, atol=1e-10)
        assert torch.equal(weights_p[b, :, n:], torch.zeros_like(weights_p[b, :, n:]))  # rows of padded queries
        assert torch.equal(weights_p[b, :, :, n:], torch.zeros_like(weights_p[b, :, :, n:]))  # padded keys
        torch.testing.assert_close(out_p[b, :n], out[b], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.cls is ISAB], ids=[i for i, c in zip(IDS, CASES)
                                                                           if c.cls is ISAB])
def test_isab_matches_float64_reference(case):
    m = case.make(dtype=torch.float64)
    batch = make_batch(LENGTHS, case.in_dim)
    out, weights = m(batch.sets, return_weights=True)
    for b, s in enumerate(batch.sets):
        h = mab(m.mab0, m.inducing, s)
        torch.testing.assert_close(out[b], mab(m.mab1, s, h), rtol=0, atol=1e-10)
        torch.testing.assert_close(weights[b], multihead_weights(m.mab0.attn, m.inducing, s), rtol=0, atol=1e-10)


def test_sab_weights_for_packed_input_raise_type_error():
    m = SAB(4, 2)
    batch = make_batch([2, 3], 4, dtype=torch.float32)
    with pytest.raises(TypeError, match="list of tensors"):
        m(batch.packed, offsets=batch.offsets, return_weights=True)
    weights = m(batch.sets, return_weights=True)[1]
    assert [w.shape for w in weights] == [(2, 2, 2), (2, 3, 3)]
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))


# ---------------------------------------------------------------------------------------------------------------
# The official reference code's formula (juho-lee/set_transformer, modules.py), batched over full sets:
# scale 1/sqrt(D), residual on the projected query, no output projection, rFF = relu(fc_o(.)) with a residual.
# ---------------------------------------------------------------------------------------------------------------


def official_mab(m: MAB, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    qp = linear(m.attn.query_proj, q)
    kp, vp = linear(m.attn.key_proj, k), linear(m.attn.value_proj, k)
    d, h = m.dim, m.num_heads
    heads = []
    for i in range(h):
        sl = slice(i * d // h, (i + 1) * d // h)
        a = torch.softmax(qp[..., sl] @ kp[..., sl].transpose(1, 2) / math.sqrt(d), -1)
        heads.append(qp[..., sl] + a @ vp[..., sl])
    o = torch.cat(heads, -1)
    if m.ln0 is not None:
        o = layer_norm(m.ln0, o)
    o = o + torch.relu(linear(m.ff[0], o))
    return layer_norm(m.ln1, o) if m.ln1 is not None else o


@pytest.mark.parametrize("ln", [False, True])
def test_reference_code_configuration_reproduces_official_formula(ln):
    torch.manual_seed(0)
    d_in, d, heads = 3, 8, 4
    ref = {"residual": "projected_query", "out_proj": False, "scale": d**-0.5, "layer_norm": ln,
           "dtype": torch.float64}
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    sab = SAB(d, heads, in_dim=d_in, **ref)
    torch.testing.assert_close(sab(x), official_mab(sab.mab, x, x), rtol=0, atol=1e-12)
    isab = ISAB(d, 3, heads, in_dim=d_in, **ref)
    inducing = isab.inducing.unsqueeze(0).expand(2, -1, -1)
    expected = official_mab(isab.mab1, x, official_mab(isab.mab0, inducing, x))
    torch.testing.assert_close(isab(x), expected, rtol=0, atol=1e-12)
    pma = PMA(d, 2, heads, input_ff=False, **ref)
    z = sab(x)
    expected = official_mab(pma.mab, pma.seeds.unsqueeze(0).expand(2, -1, -1), z)
    torch.testing.assert_close(pma(z), expected, rtol=0, atol=1e-12)
    # the reference's parameter shapes
    assert sab.mab.attn.query_proj.weight.shape == (d, d_in) and sab.mab.attn.key_proj.weight.shape == (d, d_in)
    assert isab.mab0.attn.key_proj.weight.shape == (d, d_in) and isab.mab1.attn.query_proj.weight.shape == (d, d_in)
    assert sab.mab.attn.out_proj is None and sab.mab.ff[0].weight.shape == (d, d)


# ---------------------------------------------------------------------------------------------------------------
# MAB on its own.
# ---------------------------------------------------------------------------------------------------------------


def test_mab_forward_in_every_form():
    torch.manual_seed(0)
    m = MAB(8, 2, query_dim=8, kv_dim=5, layer_norm=True, dtype=torch.float64)
    batch = make_batch(LENGTHS, 5)
    x = torch.randn(len(LENGTHS), 4, 8, dtype=torch.float64)
    outs = [m(x, batch.padded, batch.mask, return_weights=True), m(x, batch.packed, offsets=batch.offsets,
            return_weights=True), m(x, batch.sets, return_weights=True)]
    for out, _ in outs:
        assert out.shape == (len(LENGTHS), 4, 8)
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=1e-12)
    assert outs[0][1].shape == (5, 2, 4, 5) and outs[1][1].shape == (11, 2, 4)
    for b, s in enumerate(batch.sets):
        expected = mab(m, x[b], s) if s.shape[0] else torch.zeros(4, 8, dtype=torch.float64)  # empty set: 0
        torch.testing.assert_close(outs[2][0][b], expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(outs[2][1][b], multihead_weights(m.attn, x[b], s), rtol=0, atol=1e-10)
    shared = torch.randn(1, 3, 8, dtype=torch.float64)
    assert m(shared, batch.sets).shape == (len(LENGTHS), 3, 8)


def test_mab_errors():
    with pytest.raises(ValueError, match="projected_query"):
        MAB(8, query_dim=4)
    with pytest.raises(ValueError, match="residual"):
        MAB(8, residual="input")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads"):
        MAB(6, 4)
    with pytest.raises(ValueError, match="scale"):
        MAB(8, scale=-1.0)
    m = MAB(8)
    with pytest.raises(ValueError, match=r"\[B, Q, 8\]"):
        m(torch.randn(3, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="projected_query"):
        SAB(8, in_dim=4)
    with pytest.raises(ValueError, match="num_seeds"):
        PMA(8, 0)
    with pytest.raises(ValueError, match="num_inducing"):
        ISAB(8, 0)


def test_weights_hook_sees_every_block():
    batch = make_batch([3, 0, 2], 4, dtype=torch.float32)
    seen = []
    with register_weights_hook(lambda mod, w, s: seen.append((type(mod).__name__, tuple(w.shape), s.layout))):
        PMA(4, 2, 2)(batch.packed, offsets=batch.offsets)
        SAB(4, 2)(batch.packed, offsets=batch.offsets)
        ISAB(4, 3, 2)(batch.padded, batch.mask)
        MAB(4, 2)(torch.randn(1, 2, 4), batch.sets)
    assert seen == [("PMA", (5, 2, 2), "packed"), ("SAB", (3, 2, 3, 3), "padded"), ("ISAB", (3, 2, 3, 3), "padded"),
                    ("MAB", (5, 2, 2), "list")]


def test_training_dropout_and_eval_determinism():
    torch.manual_seed(0)
    m = SAB(8, 2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    assert not torch.allclose(m(x), m(x))
