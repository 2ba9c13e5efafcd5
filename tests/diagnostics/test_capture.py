"""Capture: every attnpool module inside a model, padded and packed, heads and queries, labels; nothing when off."""

import math

import pytest
import torch
from torch import nn

import attnpool.nn.base as base
from attnpool.diagnostics import Recording, analyze, capture
from attnpool.nn import (
    ISAB,
    MAB,
    PMA,
    SAB,
    AttentionPool,
    GatedAttentionPool,
    LatentCrossAttention,
    MAPHead,
    MeanPool,
)
from tests.conftest import make_batch
from tests.diagnostics.scripted import ScriptedPool, content_softmax, heads_queries


class Hierarchy(nn.Module):
    """Tokens pooled into chunks, chunks pooled into a document: two attnpool modules over different sets."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.tokens = AttentionPool(dim, num_queries=2, num_heads=2)
        self.chunks = GatedAttentionPool(dim, 16)
        self.mean = MeanPool()

    def forward(self, tokens: list[torch.Tensor], chunks_per_doc: list[int]) -> torch.Tensor:
        chunk_vecs = self.tokens([self.encoder(t) for t in tokens]).mean(1)
        docs = list(torch.split(chunk_vecs, chunks_per_doc))
        return self.chunks(docs) + self.mean(docs)


def test_captured_weights_equal_the_returned_weights_padded_and_packed():
    torch.manual_seed(0)
    pool = AttentionPool(8, num_queries=3, num_heads=2, key_proj=True)
    batch = make_batch([3, 0, 5, 2], 8, dtype=torch.float32)
    with capture(pool) as rec:
        _, w_pad = pool(batch.padded, batch.mask, return_weights=True)
        _, w_packed = pool(batch.packed, offsets=batch.offsets, return_weights=True)
    padded, packed = rec.calls
    assert (padded.layout, packed.layout) == ("padded", "packed")
    assert padded.lengths == packed.lengths == [3, 0, 5, 2]
    starts = batch.offsets.tolist()
    for b, n in enumerate([3, 0, 5, 2]):
        assert padded.weights[b].shape == (2, 3, n)
        assert torch.equal(padded.weights[b], w_pad[b, :, :, :n])
        assert torch.equal(packed.weights[b], w_packed[starts[b]:starts[b + 1]].permute(1, 2, 0))
    assert rec.module_names == [""] and padded.module_type == "AttentionPool"


def test_every_module_in_a_model_is_recorded_under_its_name_and_only_those():
    torch.manual_seed(0)
    model = Hierarchy()
    outside = AttentionPool(8)
    tokens = [torch.randn(n, 8) for n in (4, 6, 2, 5, 3)]
    with capture(model) as rec:
        model(tokens, [2, 3])
        outside(tokens)  # not inside the model: not recorded
    assert rec.module_names == ["tokens", "chunks"]
    tok, chk = rec.calls
    assert [tuple(w.shape) for w in tok.weights] == [(2, 2, n) for n in (4, 6, 2, 5, 3)]
    assert [tuple(w.shape) for w in chk.weights] == [(1, 1, 2), (1, 1, 3)]
    assert (tok.module_type, chk.module_type, tok.layout) == ("AttentionPool", "GatedAttentionPool", "list")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_set_transformer_and_perceiver_modules_with_heads_and_queries(layout):
    torch.manual_seed(0)
    batch = make_batch([4, 1, 3], 8, dtype=torch.float32)
    modules = {"pma": PMA(8, 3, 2), "map": MAPHead(8, 2, num_probes=2), "latent": LatentCrossAttention(8, 2, 4),
               "isab": ISAB(8, 3, 2), "sab": SAB(8, 2)}
    model = nn.ModuleDict(modules)
    args = (batch.padded, batch.mask) if layout == "padded" else (batch.packed,)
    kw = {} if layout == "padded" else {"offsets": batch.offsets}
    with capture(model) as rec:
        for m in modules.values():
            m(*args, **kw)
    shapes = {c.module: [tuple(w.shape) for w in c.weights] for c in rec.calls}
    assert shapes["pma"] == [(2, 3, n) for n in (4, 1, 3)]
    assert shapes["map"] == [(2, 2, n) for n in (4, 1, 3)]
    assert shapes["latent"] == [(4, 2, n) for n in (4, 1, 3)]
    assert shapes["isab"] == [(2, 3, n) for n in (4, 1, 3)]
    assert shapes["sab"] == [(2, n, n) for n in (4, 1, 3)]  # self-attention: the set's own elements query it
    sab = next(c for c in rec.calls if c.module == "sab")
    assert sab.self_attention
    for c in rec.calls:
        for w in c.weights:
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5)


def test_leakage_is_exactly_zero_for_every_attnpool_module_even_with_nan_padding():
    torch.manual_seed(0)
    batch = make_batch([5, 0, 2, 7], 8, dtype=torch.float32)  # NaN at every padded position
    model = nn.ModuleDict({
        "attn": AttentionPool(8, 2, 2, key_proj=True, value_proj=True), "additive": AttentionPool(8, score="additive"),
        "gated": GatedAttentionPool(8), "pma": PMA(8, 2, 2), "map": MAPHead(8, 2), "latent": LatentCrossAttention(8),
        "sab": SAB(8, 2), "isab": ISAB(8, 2, 2)})
    with capture(model) as rec:
        for m in model.values():
            assert torch.isfinite(m(batch.padded, batch.mask)).all()
        mab = MAB(8, 2)
    with capture(mab) as rec_mab:
        mab(torch.randn(4, 3, 8), batch.padded, batch.mask)
    calls = rec.calls + rec_mab.calls
    assert len(calls) == 9
    for c in calls:
        assert float(c.leaked.max()) == 0.0, c.module
        assert float(c.sum_error.max()) < 1e-5, c.module
    report = analyze(rec)
    assert not {"leakage", "unnormalized"} & report.codes


def test_a_leaky_pooling_is_caught():
    batch = make_batch([5, 2, 7], 4, dtype=torch.float32, fill=0.0)
    leaky = ScriptedPool(lambda x: heads_queries(content_softmax(x)), leak=0.1)
    with capture(leaky) as rec:
        leaky(batch.padded, batch.mask)
    assert math.isclose(float(rec.calls[0].leaked.max()), 0.5, rel_tol=1e-6)  # 5 masked positions of set 1 x 0.1
    assert float(rec.calls[0].sum_error.max()) < 1e-6  # the kept weights still sum to 1
    assert {a.code for a in analyze(rec).alerts_of(severity="critical")} == {"leakage"}


def test_weights_that_do_not_sum_to_one_are_caught():
    batch = make_batch([5, 2, 7], 4, dtype=torch.float32)
    spilled = ScriptedPool(lambda x: heads_queries(0.8 * content_softmax(x)))  # 20% of each set's mass gone
    with capture(spilled) as rec:
        spilled(batch.packed, offsets=batch.offsets)
    assert math.isclose(float(rec.calls[0].sum_error.max()), 0.2, rel_tol=1e-5)
    assert {a.code for a in analyze(rec).alerts_of(severity="critical")} == {"unnormalized"}


def test_no_weights_are_computed_outside_a_capture(monkeypatch):
    pool = AttentionPool(8, key_proj=True)
    batch = make_batch([3, 4], 8, dtype=torch.float32)
    seen = []
    original = AttentionPool.pool

    def spy(sets, query, need_weights):
        seen.append(need_weights)
        return original(pool, sets, query, need_weights)

    monkeypatch.setattr(pool, "pool", spy)
    pool(batch.sets)
    with capture(pool):
        pool(batch.sets)
    pool(batch.sets)
    assert seen == [False, True, False]
    assert base._WEIGHTS_HOOKS == {}
    with pytest.raises(RuntimeError, match="boom"), capture(pool):
        raise RuntimeError("boom")
    assert base._WEIGHTS_HOOKS == {}  # an exception inside the block still removes the hook


def test_capture_leaves_outputs_unchanged():
    torch.manual_seed(0)
    pool = PMA(8, 2, 2)
    batch = make_batch([3, 6], 8, dtype=torch.float32)
    with torch.no_grad():  # the same (fused) kernel with and without a capture: bit for bit the same
        plain = pool(batch.packed, offsets=batch.offsets)
        with capture(pool):
            recorded = pool(batch.packed, offsets=batch.offsets)
    assert torch.equal(plain, recorded)
    # with autograd on, weights come from the eager path, which rounds differently
    with capture(pool):
        recorded = pool(batch.packed, offsets=batch.offsets)
    assert torch.allclose(plain, recorded, atol=1e-6, rtol=0)


def test_labels_padded_width_and_per_module():
    torch.manual_seed(0)
    batch = make_batch([3, 2], 4, dtype=torch.float32, pad_to=4)
    pool = AttentionPool(4)
    words = [["a", "b", "c", "<pad>"], ["d", "e", "<pad>", "<pad>"]]
    with capture(pool, labels=words, set_ids=["doc1", "doc2"]) as rec:
        pool(batch.padded, batch.mask)
        pool(batch.padded, batch.mask)  # no new labels: recorded without, not with stale ones
        rec.label(torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]))
        pool(batch.padded, batch.mask)
    first, second, third = rec.calls
    assert first.labels == [["a", "b", "c"], ["d", "e"]] and first.set_ids == ["doc1", "doc2"]
    assert second.labels is None and second.set_ids is None
    assert third.labels == [["1", "2", "3"], ["4", "5"]]

    model = Hierarchy()
    tokens = [torch.randn(n, 8) for n in (2, 3, 1)]
    with capture(model) as rec:
        rec.label([["x", "y"], ["z"]], module="chunks")
        model(tokens, [2, 1])
        rec.label([["x", "y"], ["z"]])  # given to every module: the token pooling has 3 sets
        with pytest.raises(ValueError, match="labels: module 'tokens' pooled 3 sets"):
            model(tokens, [2, 1])
    assert rec.calls_of("chunks")[0].labels == [["x", "y"], ["z"]] and rec.calls_of("tokens")[0].labels is None
    with capture(pool, labels=[["a"], ["b"]]), pytest.raises(ValueError, match="set 0 of module '' has 3 kept"):
        pool(batch.padded, batch.mask)


def test_max_sets_and_module_filter():
    pool = AttentionPool(4)
    other = GatedAttentionPool(4, 8)
    model = nn.ModuleDict({"a": pool, "g": other})
    batch = make_batch([3, 2, 4], 4, dtype=torch.float32)
    with capture(model, max_sets=4, modules=["a"]) as rec:
        pool(batch.sets)
        pool(batch.sets)
        other(batch.sets)
    assert [len(c.weights) for c in rec.calls] == [3, 1]
    assert rec.skipped_sets == {"a": 2} and rec.module_names == ["a"]
    with capture(model, modules=[GatedAttentionPool]) as rec:
        pool(batch.sets)
        other(batch.sets)
    assert rec.module_names == ["g"]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    pool = AttentionPool(4, 2, 2)
    batch = make_batch([3, 0, 4], 4, dtype=torch.float32)
    with capture(pool, labels=[["a", "b", "c"], [], ["d", "e", "f", "g"]]) as rec:
        pool(batch.sets)
    rec.save(tmp_path / "cap.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["cap.pt"]
    back = Recording.load(tmp_path / "cap.pt")
    assert back.calls[0].labels == rec.calls[0].labels
    assert all(torch.equal(a, b) for a, b in zip(back.calls[0].weights, rec.calls[0].weights))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an attnpool capture"):
        Recording.load(tmp_path / "other.pt")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"model: expected an nn\.Module"):
        capture(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_sets"):
        capture(max_sets=-1)
    with pytest.raises(TypeError, match="labels: expected one sequence"):
        capture(labels=3)
    rec = capture().start()
    try:
        with pytest.raises(RuntimeError, match="already active"):
            rec.start()
    finally:
        rec.stop()
