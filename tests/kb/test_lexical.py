import pytest
import torch

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")

from attnpool.kb import Document, KnowledgeBase
from attnpool.kb.lexical import ChunkLexicalIndex, document_scores, document_texts
from attnpool.kb.methods import reciprocal_rank_fusion, zscore_fusion
from attnpool.text import chunk_text
from tests.kb._fake import HashEncoder
from tests.kb.test_knowledge_base import make_docs


@pytest.fixture(scope="module")
def encoder():
    return HashEncoder(dim=16)


def test_document_text_is_rebuilt_from_overlapping_chunks(encoder):
    text = make_docs(1, words=500)[0].text
    chunks = [vars(c) for c in chunk_text(text, encoder.tokenizer, max_tokens=64, overlap=16)]
    assert len(chunks) > 3
    assert document_texts(chunks) == text[chunks[0]["start"]:chunks[-1]["end"]]


def test_document_score_is_its_best_chunk():
    scores = torch.tensor([[0.0, 2.0, 1.0, 0.0, 3.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    offsets = torch.tensor([0, 3, 3, 5])  # the second document has no chunk
    torch.testing.assert_close(document_scores(scores, offsets), torch.tensor([[2.0, 0.0, 3.0], [1.0, 0.0, 0.0]]))


def test_bm25_is_chunk_level_and_follows_adds_updates_and_deletes(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    docs = make_docs(10)
    kb.index(docs, progress=False)
    assert kb.store().has_text_index(), "indexing builds the full-text index"
    q = torch.nn.functional.normalize(torch.ones(1, 16), dim=-1)
    assert (kb.score(q, "bm25", texts=["zebra"]) == 0).all()
    long_doc = Document("doc0009", " ".join(["filler words here"] * 60) + " the zebra zebra crossing")
    kb.index([*docs[:9], long_doc], progress=False)
    kb2 = KnowledgeBase(tmp_path / "kb", encoder)  # a new process would see the same
    chunk_scores = kb2.lexical_chunk_scores(["zebra"])[0]
    d = kb2.doc_ids.index("doc0009")
    a, b = (int(x) for x in kb2.chunk_matrix().offsets[d:d + 2])
    assert b - a > 1 and (chunk_scores > 0).nonzero().flatten().tolist() == [b - 1], "only the last chunk matches"
    s = kb2.score(q, "bm25", texts=["zebra"])[0]
    assert s[d] == chunk_scores[b - 1] and (s > 0).sum() == 1
    # rows appended after the index was last optimized are found too (a scan until the next optimize)
    store = kb2.store()
    kb2.index([*docs[:8], Document("doc0008", "a quokka"), long_doc], progress=False)
    assert kb2.score(q, "bm25", texts=["quokka"])[0].argmax().item() == kb2.doc_ids.index("doc0008")
    kb2.delete(["doc0009"])
    assert (kb2.score(q, "bm25", texts=["zebra"]) == 0).all()
    assert store.text_search("zebra", 10)["doc_id"] == []
    with pytest.raises(ValueError, match="needs the text of each"):
        kb2.score(q, "hybrid")


def test_hits_on_uncommitted_chunks_never_count(tmp_path, encoder):
    """Chunks appended by a run killed before its commit (step 2 of the store's write order) are in the table and
    in the full-text index, but they are not the document's and must not score."""
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index(make_docs(4), progress=False)
    store = kb.store()
    import pyarrow as pa

    orphan = pa.table({"doc_id": ["doc0001"], "doc_hash": ["not-the-committed-hash"],
                       "chunk_index": pa.array([0], pa.int32()),
                       "start": pa.array([0], pa.int64()), "end": pa.array([5], pa.int64()),
                       "num_tokens": pa.array([1], pa.int32()), "text": ["zebra"],
                       "vector": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 16, pa.float32()), 16)},
                      schema=store.chunk_schema)
    store.chunks.add(orphan)
    assert store.text_search("zebra", 10)["doc_id"] == ["doc0001"]
    fresh = KnowledgeBase(tmp_path / "kb", encoder)
    assert (fresh.score(torch.zeros(1, 16), "bm25", texts=["zebra"]) == 0).all()


def test_query_words_are_plain_words(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index([Document("a", "create a bucket --filter=FOO in storage"), Document("b", "delete the cluster")],
             progress=False)
    q = torch.zeros(1, 16)
    for text in ['"bucket storage"', "bucket AND", "(bucket", "--filter=FOO", "", "the of and", "*"]:
        s = kb.score(q, "bm25", texts=[text])[0]
        assert torch.isfinite(s).all()
    assert kb.score(q, "bm25", texts=['"bucket storage"'])[0].argmax().item() == kb.doc_ids.index("a")


def test_throwaway_index_over_texts():
    index = ChunkLexicalIndex.from_texts(["a zebra here", "nothing", "zebras everywhere zebra"])
    s = index.chunk_scores(["zebra", "quokka"])
    assert s.shape == (2, 3) and s[0, 1] == 0 and s[0, 0] > 0 and s[0, 2] > 0 and (s[1] == 0).all()


def test_reciprocal_rank_fusion_by_hand():
    a = torch.tensor([[3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 3.0, 2.0]])
    got = reciprocal_rank_fusion([a, b], k=60)
    want = torch.tensor([[1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62]])
    torch.testing.assert_close(got, want)


def test_zscore_fusion_by_hand_and_dead_documents():
    a = torch.tensor([[1.0, 2.0, 3.0, float("-inf")]])
    b = torch.tensor([[10.0, 0.0, 5.0, 1.0]])
    got = zscore_fusion([a, b], [0.25, 0.75])
    za = (torch.tensor([1.0, 2.0, 3.0]) - 2) / torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    bb = torch.tensor([10.0, 0.0, 5.0, 1.0])
    zb = (bb - bb.mean()) / bb.std(unbiased=False)
    torch.testing.assert_close(got[0, :3], 0.25 * za + 0.75 * zb[:3])
    assert torch.isneginf(got[0, 3])
