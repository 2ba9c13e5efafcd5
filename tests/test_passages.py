import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpool.passages import Passage, passage_weights, select_passages


def unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64), dim=-1)


def make(n, dim=6, seed=0, tokens=None):
    g = torch.Generator().manual_seed(seed)
    vectors = unit(torch.randn(n, dim, generator=g, dtype=torch.float64))
    tokens = tokens or [int(t) for t in torch.randint(10, 120, (n,), generator=g)]
    passages = [Passage(f"doc{i % 3}", i // 3, 100 * i, 100 * i + 80, tokens[i], f"text {i}") for i in range(n)]
    return passages, vectors


def test_flat_weights_are_the_float64_softmax():
    _, vectors = make(7)
    q = unit(torch.randn(6, dtype=torch.float64))
    w = passage_weights(q, vectors, mode="flat", temperature=0.2)
    s = [float(v @ q) / 0.2 for v in vectors]
    ref = torch.tensor([math.exp(x - max(s)) for x in s], dtype=torch.float64)
    torch.testing.assert_close(w, ref / ref.sum(), rtol=1e-12, atol=1e-14)


def test_hierarchical_weights_match_the_formula_in_float64():
    passages, vectors = make(8)
    doc_ids = [p.doc_id for p in passages]
    q = unit(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    w = passage_weights(q, vectors, doc_ids, temperature=0.3, doc_temperature=0.1)
    ref = torch.zeros(8, dtype=torch.float64)
    docs = sorted(set(doc_ids))
    within, pooled = {}, {}
    for d in docs:
        idx = [i for i, x in enumerate(doc_ids) if x == d]
        a = torch.softmax(vectors[idx] @ q / 0.3, 0)
        within[d] = dict(zip(idx, a.tolist()))
        r = (a[:, None] * vectors[idx]).sum(0)
        pooled[d] = float(r @ q / r.norm())
    p_doc = torch.softmax(torch.tensor([pooled[d] for d in docs], dtype=torch.float64) / 0.1, 0)
    for j, d in enumerate(docs):
        for i, a in within[d].items():
            ref[i] = p_doc[j] * a
    torch.testing.assert_close(w, ref, rtol=1e-10, atol=1e-14)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_hierarchical_prefers_the_passages_of_the_document_that_answers():
    q = unit([1.0, 0.0, 0.0])
    # doc "a": one passage fairly close; doc "b": one passage a bit closer, its other passage unrelated
    vectors = unit([[0.9, 0.43, 0.0], [0.85, 0.0, 0.52], [0.95, 0.31, 0.0], [0.0, 0.0, 1.0]])
    doc_ids = ["a", "a", "b", "b"]
    flat = passage_weights(q, vectors, doc_ids, mode="flat")
    # a warm passage temperature makes each document's vector close to the mean of its passages
    hier = passage_weights(q, vectors, doc_ids, temperature=5.0, doc_temperature=0.05)
    assert int(flat.argmax()) == 2
    assert hier[0] + hier[1] > hier[2] + hier[3]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 14), st.integers(0, 600), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_selection_respects_the_budget_exactly(n, budget, diversity, seed):
    passages, vectors = make(n, seed=seed)
    w = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
    sel = select_passages(passages, vectors, w, budget=budget, diversity=diversity)
    assert sel.tokens == sum(p.num_tokens for p in sel.passages) <= budget
    assert len(set(sel.indices)) == len(sel.indices)
    # greedy: nothing left out would still fit (unless excluded as a near-duplicate)
    left = budget - sel.tokens
    if diversity == 0:
        assert all(passages[i].num_tokens > left for i in range(n) if i not in sel.indices)


def test_diversity_zero_is_top_weight_order_and_carries_doc_and_offsets():
    passages, vectors = make(6, tokens=[50] * 6)
    w = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.2, 0.1], dtype=torch.float64)
    sel = select_passages(passages, vectors, w, budget=150)
    assert sel.indices == [1, 3, 4] and sel.tokens == 150
    for i, p in zip(sel.indices, sel.passages):
        src = passages[i]
        assert (p.doc_id, p.index, p.start, p.end, p.text) == (src.doc_id, src.index, src.start, src.end, src.text)
        assert p.weight == pytest.approx(float(w[i]))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 10), st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_identical_passages_are_never_both_selected_with_diversity(n, diversity, seed):
    passages, vectors = make(n, seed=seed, tokens=[10] * n)
    dup = Passage("copy", 0, 0, 80, 10, passages[0].text)
    passages = [*passages, dup]
    vectors = torch.cat([vectors, vectors[:1]])
    w = torch.softmax(torch.randn(n + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
    w[-1] = w[0]
    sel = select_passages(passages, vectors, w, budget=10_000, diversity=diversity)
    assert not {0, n}.issubset(sel.indices)
    both = select_passages(passages, vectors, w, budget=10_000, diversity=0.0)
    assert {0, n}.issubset(both.indices)  # without diversity, the budget takes everything


def test_diversity_prefers_a_different_passage_over_a_near_duplicate():
    vectors = unit([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.6, 0.0, 0.8]])  # 1 is a near-copy of 0
    passages = [Passage(f"d{i}", 0, 0, 10, 10) for i in range(3)]
    w = torch.tensor([0.5, 0.45, 0.05], dtype=torch.float64)
    assert select_passages(passages, vectors, w, budget=20).indices == [0, 1]
    assert select_passages(passages, vectors, w, budget=20, diversity=0.8, duplicate_threshold=1.0).indices == [0, 2]


def test_empty_and_bad_input():
    q = unit([1.0, 0.0])
    assert passage_weights(q, torch.zeros(0, 2, dtype=torch.float64)).numel() == 0
    sel = select_passages([], torch.zeros(0, 2), torch.zeros(0), budget=100)
    assert sel.passages == [] and sel.tokens == 0
    passages, vectors = make(3)
    w = torch.ones(3) / 3
    with pytest.raises(ValueError, match="budget: expected an int >= 0"):
        select_passages(passages, vectors, w, budget=-1)
    with pytest.raises(ValueError, match=r"diversity: expected a number in \[0, 1\]"):
        select_passages(passages, vectors, w, budget=10, diversity=1.5)
    with pytest.raises(ValueError, match="weights: expected"):
        select_passages(passages, vectors, torch.ones(2), budget=10)
    with pytest.raises(ValueError, match="mode: expected one of"):
        passage_weights(unit(torch.ones(6)), vectors, mode="nope")
    with pytest.raises(ValueError, match="doc_ids: expected one per passage"):
        passage_weights(unit(torch.ones(6)), vectors, ["a"])
    with pytest.raises(ValueError, match="vectors: expected"):
        passage_weights(q, vectors)


def test_passages_from_a_knowledge_base_and_the_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
    import json

    from attnpool import cli
    from attnpool.kb import Document, KnowledgeBase
    from attnpool.kb import cli as kb_cli
    from attnpool.passages import PassageTable, candidate_passages
    from tests.kb._fake import HashEncoder

    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=24, overlap=4)
    text = "alpha beta gamma " * 20
    kb.index([Document("a", text + " bucket create"), Document("b", text + " topic delete"),
              Document("c", "bucket " * 40)], progress=False)
    table = PassageTable(kb)
    assert len(table.passages) == kb.num_chunks
    stored = {r["chunk_index"]: r for r in kb.store().chunk_texts("a")}
    for p in (p for p in table.passages if p.doc_id == "a"):
        assert (p.start, p.end, p.text) == (stored[p.index]["start"], stored[p.index]["end"], stored[p.index]["text"])
        assert text[p.start:p.end] == p.text[:len(text[p.start:p.end])] and 0 < p.num_tokens <= 24
    q = kb.encode_queries(["bucket create"])[0]
    passages, vectors = candidate_passages(kb, q, num_docs=2, table=table)
    assert len({p.doc_id for p in passages}) == 2 and vectors.shape == (len(passages), 16)

    monkeypatch.setattr(kb_cli, "_kb", lambda args: kb)
    assert cli.main(["kb", "passages", "bucket create", "--budget", "50", "--diversity", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == sum(p["num_tokens"] for p in out["passages"]) <= 50
    assert all({"doc_id", "start", "end", "index"} <= set(p) for p in out["passages"])
    texts = [p["text"] for p in out["passages"]]
    assert len(texts) == len(set(texts))  # the repeated "alpha beta gamma" windows are not all taken
    assert cli.main(["kb", "passages", "bucket", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err
