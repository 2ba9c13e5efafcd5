import numpy as np
import pytest

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
pytest.importorskip("bm25s", reason="the BM25 index needs bm25s (the kb extra)")

from attnpool.cli import main as cli_main
from attnpool.kb import Document, KnowledgeBase
from attnpool.kb.tune import _candidate_sentences, make_pseudo_queries, tune
from tests.kb._fake import HashEncoder
from tests.kb.test_knowledge_base import WORDS


def prose_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        topic = [f"topic{i}", WORDS[i % len(WORDS)]]
        sentences = [" ".join([*rng.choice(WORDS, size=8), *topic]).capitalize() + "." for _ in range(30)]
        docs.append(Document(f"d{i:03d}", " ".join(sentences)))
    return docs


def test_candidate_sentences_skip_commands_and_flags():
    text = "Create a bucket in the project now. $ gcloud storage buckets create gs://x\n\n--flag=VALUE sets it.\n\nOk."
    assert _candidate_sentences(text, 5, 24) == ["Create a bucket in the project now."]


def test_pseudo_queries_are_taken_out_of_their_documents(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=0)
    kb.index(prose_docs(12), progress=False)
    pq = make_pseudo_queries(kb, seed=0)
    assert len(pq.texts) == 12 and len(set(pq.doc_index)) == 12
    for text, d, j in zip(pq.texts, pq.doc_index, pq.chunk_index):
        chunk = kb.store().chunk_texts(kb.doc_ids[d])[j]["text"]
        assert text in " ".join(chunk.split())
        assert text not in pq.doc_texts[d]
    assert make_pseudo_queries(kb, seed=0).texts == pq.texts


def test_tune_saves_what_search_then_uses(tmp_path, capsys):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    kb.index(prose_docs(30), progress=False)
    report = tune(kb, head_steps=30, progress=False)
    assert report.num_pseudo_queries == 30
    assert kb.settings["tuned"] and kb.temperature() == report.temperature
    assert kb.fusion_weight() == report.fusion_weight
    for kind in ("learned", "multi"):
        assert report.heads[kind]["last_loss"] < report.heads[kind]["first_loss"]
    fresh = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16))
    assert len(fresh.search("topic3 bucket", method="learned", k=2)) == 2
    assert len(fresh.search("topic3 bucket", method="hybrid-score", k=2)) == 2


def test_tune_refuses_a_corpus_without_prose(tmp_path, capsys):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    kb.index([Document(f"d{i}", "x " * 10) for i in range(5)], progress=False)
    with pytest.raises(ValueError, match="pseudo-queries"):
        tune(kb, progress=False)
    assert not (tmp_path / "kb" / "heads").exists()
    assert cli_main(["kb", "search", "x", "--store", str(tmp_path / "nope")]) == 2
    assert "no knowledge base here" in capsys.readouterr().err
