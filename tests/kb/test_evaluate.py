import json
import math

import numpy as np
import pytest

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")

from attnpool.cli import main as cli_main
from attnpool.kb import InputError, KnowledgeBase
from attnpool.kb.evaluate import (
    bootstrap_difference,
    evaluate_beir,
    load_beir,
    metrics_for_ranking,
    split_queries,
    write_results,
)
from attnpool.kb.knowledge_base import DEFAULT_TEMPERATURE
from tests.kb._fake import HashEncoder
from tests.kb.test_knowledge_base import WORDS


def test_metrics_against_hand_computed_values():
    m = metrics_for_ranking(["a", "b", "c"], {"b": 1})
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3)) and m["mrr@10"] == 0.5
    assert m["recall@10"] == 1.0 and m["recall@100"] == 1.0
    m = metrics_for_ranking(["x", "b", "a"], {"a": 2, "b": 1})
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    ranking = [f"d{i}" for i in range(150)]
    m = metrics_for_ranking(ranking, {"d50": 1, "d120": 1})
    assert (m["recall@10"], m["recall@100"], m["mrr@10"]) == (0.0, 0.5, 0.0)


def test_split_is_seeded_disjoint_covering_and_order_free():
    ids = [f"q{i}" for i in range(400)]
    tune, test = split_queries(ids, seed=0)
    assert set(tune) | set(test) == set(ids) and not set(tune) & set(test)
    assert 150 < len(tune) < 250
    assert split_queries(list(reversed(ids)), seed=0) == (tune, test)
    assert split_queries(ids, seed=1) != (tune, test)
    tune2, _ = split_queries([*ids, "q_new"], seed=0)
    assert set(tune) <= set(tune2), "adding a query moved another"


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    a, b = rng.random(2000) + 0.05, rng.random(2000)
    mean, lo, hi = bootstrap_difference(a, b, seed=0)
    assert lo < mean < hi and mean == pytest.approx((a - b).mean())
    _, lo2, hi2 = bootstrap_difference(a[:100], b[:100], seed=0)
    assert hi2 - lo2 > hi - lo
    assert bootstrap_difference(a, a) == (0.0, 0.0, 0.0)


def make_beir(tmp_path, n_docs=40):
    rng = np.random.default_rng(0)
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i in range(n_docs):
        topic = [WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)], f"item{i}"]
        body = " ".join(rng.choice(WORDS, size=300)) + " " + " ".join(topic * 3)
        docs.append({"_id": f"d{i}", "title": "", "text": body})
        queries.append({"_id": f"q{i}", "text": " ".join(topic)})
        qrels.append(f"q{i}\td{i}\t1")
    (d / "corpus.jsonl").write_text("\n".join(map(json.dumps, docs)) + "\n")
    (d / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n")
    (d / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return d


def test_evaluate_every_method_and_write(tmp_path):
    beir = make_beir(tmp_path)
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    result = evaluate_beir(beir, kb, head_steps=20, save_heads=True, progress=False)
    assert set(result.metrics) - {"attention-no-prior"} == {
        "first", "mean", "max", "attention", "learned", "multi", "bm25", "hybrid", "hybrid-score", "rrf-bm25-max"}
    assert ("attention-no-prior" in result.metrics) == (result.first_bias != 0)
    assert kb.fusion_weight() == result.fusion_weight
    assert result.num_tune + result.num_test == 40
    for m in result.metrics.values():
        assert all(0 <= v <= 1 for v in m.values())
    assert result.metrics["bm25"]["recall@100"] == 1.0  # 40 documents: everything is in the top 100
    assert f"T={result.temperature},beta={result.first_bias}" in result.tuning_curve
    assert f"w={result.fusion_weight}" in result.tuning_curve
    assert any(d["a"] == "hybrid-score" and d["b"] == "rrf-bm25-max" for d in result.differences)
    assert any(d["a"] == "attention" for d in result.differences)
    # the saved heads and temperature are used by search from then on
    assert kb.temperature() == result.temperature and kb.first_bias() == result.first_bias
    assert len(kb.search("bucket", method="learned", k=3)) == 3
    assert len(kb.search("bucket", method="multi", k=3)) == 3
    files = write_results(result, tmp_path / "out", "cmd")
    assert {f.name for f in files} >= {"results.md", "results.json"}
    assert "| attention |" in (tmp_path / "out" / "results.md").read_text()


def test_malformed_beir_is_refused_before_the_store_is_touched(tmp_path, capsys):
    beir = make_beir(tmp_path, 6)
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq_missing\td1\t1\n")
    with pytest.raises(InputError, match=r"judged queries are not in queries\.jsonl"):
        load_beir(beir)
    (beir / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{oops\n')
    rc = cli_main(["kb", "eval", str(beir), "--store", str(tmp_path / "kb")])
    assert rc == 2 and "expected one JSON object per line" in capsys.readouterr().err
    assert not (tmp_path / "kb").exists()
    with pytest.raises(InputError, match=r"expected a BEIR directory with corpus\.jsonl, which is missing"):
        load_beir(tmp_path)


def test_no_fit_uses_the_stores_settings_and_heads(tmp_path):
    beir = make_beir(tmp_path)
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    plain = evaluate_beir(beir, kb, fit=False, progress=False)
    assert "learned" not in plain.metrics and plain.temperature == DEFAULT_TEMPERATURE and not plain.tuning_curve
    kb.save_settings(attention_temperature=0.05, fusion_weight=0.3)
    again = evaluate_beir(beir, kb, fit=False, methods=["attention", "hybrid-score"], progress=False)
    assert (again.temperature, again.fusion_weight) == (0.05, 0.3) and not again.fitted
