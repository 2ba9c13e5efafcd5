import numpy as np
import pytest
import torch

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")

from attnpool.cli import main as cli_main
from attnpool.kb import Document, KnowledgeBase
from attnpool.kb.tune import _candidate_sentences, _with_source_chunks_replaced, make_pseudo_queries, tune
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
    text = ("DESCRIPTION\n    Create a bucket in the\n    project now. $ gcloud storage buckets create gs://x\n\n"
            "--flag=VALUE sets it.\n\nOk.")
    got = _candidate_sentences(text, 5, 24)
    assert got == [("Create a bucket in the project now.", "DESCRIPTION\n    Create a bucket in the\n    project now.")]
    assert got[0][1] in text  # the raw span, to take out of the chunk


@pytest.mark.parametrize("kind", ["lead", "cloze"])
def test_pseudo_queries_are_taken_out_of_their_documents(tmp_path, kind):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=0)
    kb.index(prose_docs(12), progress=False)
    pq = make_pseudo_queries(kb, kind=kind, seed=0)
    assert len(pq.texts) == 12 and len(set(pq.doc_index)) == 12
    for text, d, j, edited in zip(pq.texts, pq.doc_index, pq.chunk_index, pq.chunk_texts, strict=True):
        chunk = kb.store().chunk_texts(kb.doc_ids[d])[j]["text"]
        assert text in " ".join(chunk.split()) and text not in " ".join(edited.split())
        if kind == "lead":  # the first prose sentence of the document
            assert j == 0 and " ".join(chunk.split()).startswith(text)
    assert make_pseudo_queries(kb, kind=kind, seed=0).texts == pq.texts
    with pytest.raises(ValueError, match="kind"):
        make_pseudo_queries(kb, kind="summary")


def test_source_chunks_are_encoded_again_without_the_query(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=0)
    kb.index(prose_docs(6), progress=False)
    pq = make_pseudo_queries(kb, seed=0)
    chunks, texts = _with_source_chunks_replaced(kb, pq)
    original = kb.chunk_matrix()
    rows = {int(original.offsets[d]) + j for d, j in zip(pq.doc_index, pq.chunk_index)}
    for r in range(original.vectors.shape[0]):
        same = torch.equal(chunks.vectors[r], original.vectors[r])
        assert same != (r in rows)
    for r, t in zip(sorted(rows), [t for _, t in sorted(zip([int(original.offsets[d]) + j for d, j in zip(
            pq.doc_index, pq.chunk_index)], pq.chunk_texts))]):
        assert texts[r] == t
        torch.testing.assert_close(chunks.vectors[r], torch.from_numpy(kb.encoder.encode([t]))[0])


def test_tune_saves_what_search_then_uses(tmp_path, capsys):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    kb.index(prose_docs(30), progress=False)
    report = tune(kb, heads=("learned", "multi"), head_steps=30, max_fusion_weight=0.6, progress=False)
    assert report.num_pseudo_queries == 30 and report.kind == "lead"
    assert kb.settings["tuned"] and kb.temperature() == report.temperature
    assert kb.first_bias() == report.first_bias and kb.fusion_weight() == report.fusion_weight <= 0.6
    assert f"T={report.temperature},beta={report.first_bias}" in report.curve
    for kind in ("learned", "multi"):
        assert report.heads[kind]["last_loss"] < report.heads[kind]["first_loss"]
    fresh = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16))
    assert len(fresh.search("topic3 bucket", method="learned", k=2)) == 2
    assert len(fresh.search("topic3 bucket", method="hybrid-score", k=2)) == 2
    assert "cloze pseudo-queries" in str(tune(fresh, kind="cloze", save=False, progress=False))
    with pytest.raises(ValueError, match="max_fusion_weight: expected a number in"):
        tune(fresh, max_fusion_weight=1.5, progress=False)


def test_tune_refuses_a_corpus_without_prose(tmp_path, capsys):
    kb = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=16), max_tokens=64, overlap=8)
    kb.index([Document(f"d{i}", "x " * 10) for i in range(5)], progress=False)
    with pytest.raises(ValueError, match="pseudo-queries"):
        tune(kb, progress=False)
    assert not (tmp_path / "kb" / "heads").exists()
    assert cli_main(["kb", "search", "x", "--store", str(tmp_path / "nope")]) == 2
    assert "no knowledge base here" in capsys.readouterr().err
