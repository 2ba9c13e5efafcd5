import pytest
import torch

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
pytest.importorskip("bm25s", reason="the BM25 index needs bm25s (the kb extra)")

from attnpool.kb import Document, KnowledgeBase
from attnpool.kb.lexical import LexicalIndex, document_texts
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


def test_bm25_follows_adds_updates_and_deletes(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    docs = make_docs(10)
    kb.index(docs, progress=False)
    q = torch.nn.functional.normalize(torch.ones(1, 16), dim=-1)
    assert (kb.score(q, "bm25", texts=["zebra"]) == 0).all()
    kb.index([*docs[:9], Document("doc0009", "the zebra zebra crossing")], progress=False)
    kb2 = KnowledgeBase(tmp_path / "kb", encoder)  # a new process would see the same
    s = kb2.score(q, "bm25", texts=["zebra"])[0]
    assert s.argmax().item() == kb2.doc_ids.index("doc0009") and (s > 0).sum() == 1
    caches = list((tmp_path / "kb" / "bm25").iterdir())
    assert len(caches) == 1, "stale BM25 caches are removed"
    kb2.delete(["doc0009"])
    assert (kb2.score(q, "bm25", texts=["zebra"]) == 0).all()
    with pytest.raises(ValueError, match="needs the text of each"):
        kb2.score(q, "hybrid")


def test_cache_is_reused_and_a_corrupt_one_is_rebuilt(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index(make_docs(6), progress=False)
    ref = kb.score(torch.zeros(1, 16), "bm25", texts=["bucket policy"])
    (cache,) = (tmp_path / "kb" / "bm25").iterdir()
    for f in cache.iterdir():
        if f.suffix == ".npy":
            f.write_bytes(b"garbage")
    fresh = KnowledgeBase(tmp_path / "kb", encoder)
    torch.testing.assert_close(fresh.score(torch.zeros(1, 16), "bm25", texts=["bucket policy"]), ref)
    assert LexicalIndex.fingerprint(["a"], ["h"]) != LexicalIndex.fingerprint(["a"], ["h2"])


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
