import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")

from attnpool.kb import Document, InputError, KnowledgeBase, StoreError
from attnpool.kb import methods as M
from tests.kb._fake import HashEncoder

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "create", "list", "delete", "update", "describe", "instance", "bucket", "cluster", "network", "firewall", "disk",
    "snapshot", "image", "key", "role", "policy", "topic", "subscription", "queue", "job",
]


def make_docs(n: int, seed: int = 0, words: int = 400) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document(f"doc{i:04d}", " ".join(rng.choice(WORDS, size=words)), title=f"title {i}") for i in range(n)]


def live_consistency(kb: KnowledgeBase) -> None:
    """Every committed document has exactly its num_chunks live chunks, numbered 0..n-1, once each."""
    store = kb.store()
    docs = store.documents.to_arrow().to_pydict()
    current = dict(zip(docs["doc_id"], docs["doc_hash"]))
    chunks = store.chunks.to_arrow().select(["doc_id", "doc_hash", "chunk_index"]).to_pydict()
    live = Counter((d, i) for d, h, i in zip(chunks["doc_id"], chunks["doc_hash"], chunks["chunk_index"])
                   if current.get(d) == h)
    assert all(c == 1 for c in live.values()), "a live chunk is stored twice"
    for d, n in zip(docs["doc_id"], docs["num_chunks"]):
        assert {i for (dd, i) in live if dd == d} == set(range(n)), d


@pytest.fixture(scope="module")
def encoder():
    return HashEncoder(dim=16)


def test_index_search_incremental_update_delete(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    docs = make_docs(12)
    r = kb.index(docs, progress=False)
    assert (r.added, r.updated, r.unchanged) == (12, 0, 0) and r.chunks > 12
    calls = encoder.calls
    r = kb.index(docs, progress=False)  # unchanged content: no work
    assert (r.added, r.updated, r.unchanged, r.chunks) == (0, 0, 12, 0) and encoder.calls == calls
    changed = [*docs[:11], Document("doc0011", "firewall " * 50, "new title")]
    r = kb.index(changed, progress=False)
    assert (r.added, r.updated, r.unchanged) == (0, 1, 11)
    live_consistency(kb)
    hits = kb.search("firewall firewall firewall", method="max", k=3)
    assert hits[0].doc_id == "doc0011" and hits[0].title == "new title"
    assert kb.delete(["doc0011", "not-there"]) == 1
    assert "doc0011" not in kb.doc_ids and kb.num_documents == 11
    live_consistency(kb)
    r = kb.index(docs[:5], delete_missing=True, progress=False)
    assert r.deleted == 6 and kb.num_documents == 5


def test_search_methods_and_explain(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index(make_docs(8), progress=False)
    for method in ("first", "mean", "max", "attention"):
        hits = kb.search("bucket policy", method=method, k=5)
        assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    hit = kb.search("bucket policy", method="attention", k=1, explain=True, top_chunks=2)[0]
    weights = [c.weight for c in hit.chunks]
    assert abs(sum(weights) - 1) < 1e-5 and len(weights) == kb.chunk_matrix().lengths[kb.doc_ids.index(hit.doc_id)]
    shown = [c for c in hit.chunks if c.text]
    assert len(shown) == 2 and min(c.weight for c in shown) >= max(c.weight for c in hit.chunks if not c.text)
    source = next(d for d in make_docs(8) if d.doc_id == hit.doc_id).full_text
    assert all(source[c.start:c.end] == c.text for c in shown)
    with pytest.raises(StoreError, match="no trained head"):
        kb.search("x", method="learned")
    with pytest.raises(ValueError, match="method: expected one of"):
        kb.search("x", method="median")
    with pytest.raises(ValueError, match="query: expected a non-empty question"):
        kb.search("  ")


def test_scores_match_a_float64_reference(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=48, overlap=4)
    kb.index(make_docs(6, words=200), progress=False)
    chunks = kb.chunk_matrix()
    q = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    got = {m: kb.score(q, m, temperature=0.07, first_bias=0.0) for m in ("first", "mean", "max", "attention")}
    for b in range(chunks.num_docs):
        c = chunks.vectors[chunks.offsets[b]:chunks.offsets[b + 1]].double()
        s = q.double() @ c.T
        a = torch.softmax(s / 0.07, dim=1)
        pooled = torch.nn.functional.normalize(a @ c, dim=-1)
        ref = {"first": s[:, 0], "max": s.max(1).values,
               "mean": (q.double() @ torch.nn.functional.normalize(c.mean(0), dim=0)),
               "attention": (pooled * q.double()).sum(-1)}
        for m, r in ref.items():
            torch.testing.assert_close(got[m][:, b].double(), r, atol=1e-5, rtol=1e-5, msg=m)


@pytest.mark.parametrize("beta", [0.7, -2.0])
def test_first_chunk_prior_matches_a_float64_reference(tmp_path, encoder, beta):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=48, overlap=4)
    kb.index([*make_docs(5, words=200), Document("empty", "")], progress=False)
    chunks = kb.chunk_matrix()
    q = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    got = kb.score(q, "attention", temperature=0.2, first_bias=beta)
    for b in range(chunks.num_docs):
        c = chunks.vectors[chunks.offsets[b]:chunks.offsets[b + 1]].double()
        if c.shape[0] == 0:
            assert torch.isneginf(got[:, b]).all()
            continue
        logits = q.double() @ c.T / 0.2
        logits[:, 0] += beta
        pooled = torch.nn.functional.normalize(torch.softmax(logits, dim=1) @ c, dim=-1)
        torch.testing.assert_close(got[:, b].double(), (pooled * q.double()).sum(-1), atol=1e-5, rtol=1e-5)
        w = M.attention_weights(chunks.vectors[chunks.offsets[b]:chunks.offsets[b + 1]], q[0], 0.2, beta)
        torch.testing.assert_close(w.double(), torch.softmax(logits[0], 0), atol=1e-6, rtol=1e-6)
    # beta -> inf is the first chunk, beta = 0 plain attention
    torch.testing.assert_close(kb.score(q, "attention", temperature=0.2, first_bias=60.0), kb.score(q, "first"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb.score(q, "attention", temperature=0.2, first_bias=0.0),
                               M.attention_scores(chunks, q, 0.2))
    kb.save_settings(first_bias=beta)
    hit = KnowledgeBase(tmp_path / "kb", encoder).search(q[0], k=1, explain=True, temperature=0.2)[0]
    a, b = (int(x) for x in chunks.offsets[kb.doc_ids.index(hit.doc_id):][:2])
    torch.testing.assert_close(torch.tensor([c.weight for c in hit.chunks]),
                               M.attention_weights(chunks.vectors[a:b], q[0], 0.2, beta))


def test_explain_shows_each_signal_of_a_hybrid(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index([*make_docs(6), Document("zz", "zebra " * 10 + " ".join(["filler"] * 200))], progress=False)
    hits = kb.search("zebra bucket", method="hybrid-score", k=7, explain=True)
    n = kb.num_documents
    for hit in hits:
        assert set(hit.signals) == {"bm25", "attention"}
        assert all(1 <= s["rank"] <= n for s in hit.signals.values())
        assert all(c.lexical is not None and c.lexical >= 0 for c in hit.chunks)
    zz = next(h for h in hits if h.doc_id == "zz")
    assert zz.signals["bm25"]["rank"] == 1 and zz.chunks[0].lexical > 0 and zz.chunks[0].text
    assert all(not h.signals for h in kb.search("zebra", method="attention", k=2, explain=True))


def test_refuses_another_model_and_missing_store(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index(make_docs(3), progress=False)
    before = kb.store().chunks.version
    other = KnowledgeBase(tmp_path / "kb", HashEncoder(dim=24), max_tokens=64, overlap=8)
    with pytest.raises(StoreError, match=r"dim = 16.*dim = 24"):
        other.index(make_docs(3, seed=1), progress=False)
    assert KnowledgeBase(tmp_path / "kb", encoder).store().chunks.version == before
    with pytest.raises(StoreError, match="no knowledge base here"):
        KnowledgeBase(tmp_path / "nothing", encoder).search("x")
    with pytest.raises(InputError, match="expected at least one document"):
        kb.index([], progress=False)


def test_empty_document_has_no_chunks_but_stays_consistent(tmp_path, encoder):
    kb = KnowledgeBase(tmp_path / "kb", encoder, max_tokens=64, overlap=8)
    kb.index([Document("e", "   "), *make_docs(2)], progress=False)
    assert kb.num_documents == 3
    s = kb.score(torch.nn.functional.normalize(torch.ones(1, 16), dim=-1), "attention")
    assert torch.isneginf(s[0, kb.doc_ids.index("e")]) and torch.isfinite(s).sum() == 2
    live_consistency(kb)


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.kb._fake import HashEncoder
    from tests.kb.test_knowledge_base import make_docs
    from attnpool.kb import KnowledgeBase
    kb = KnowledgeBase({store!r}, HashEncoder(dim=16, delay={delay}, progress_file={progress!r}), max_tokens=64,
                       overlap=8)
    print(kb.index(make_docs(60, seed={seed}), batch_docs=2, progress=False))
""")


def _run_index(tmp_path, store, *, seed=0, delay=0.0, kill_after=None):
    progress = tmp_path / f"progress-{time.monotonic_ns()}"
    script = CRASH_SCRIPT.format(root=str(ROOT), store=str(store), delay=delay, progress=str(progress), seed=seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return out
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if progress.exists() and len(progress.read_text().split()) >= kill_after:
            break
        if proc.poll() is not None:
            pytest.fail(f"indexing ended before the kill: {proc.communicate()[1]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return None


@pytest.mark.slow
def test_sigkill_midway_leaves_a_consistent_store_and_rerun_completes(tmp_path, encoder):
    store = tmp_path / "kb"
    # a kill at several points of the batch loop (the encoder's delay puts most kills between writes, the
    # 0-delay kills land inside LanceDB's own writes)
    for kill_after, delay in ((3, 0.05), (4, 0.01), (5, 0.0)):
        _run_index(tmp_path, store, delay=delay, kill_after=kill_after)
        kb = KnowledgeBase(store, encoder, max_tokens=64, overlap=8)
        live_consistency(kb)
        n = kb.num_documents
        assert 0 <= n < 60
        if n:
            assert len(kb.search("bucket cluster", method="attention", k=3)) == min(3, n)
    out = _run_index(tmp_path, store)
    assert "0 updated" in out
    kb = KnowledgeBase(store, encoder, max_tokens=64, overlap=8)
    live_consistency(kb)
    assert kb.doc_ids == [d.doc_id for d in make_docs(60)]
    # and the result is the same store content as one uninterrupted run
    clean = KnowledgeBase(tmp_path / "clean", encoder, max_tokens=64, overlap=8)
    clean.index(make_docs(60), progress=False)
    np.testing.assert_array_equal(kb.chunk_matrix().offsets.numpy(), clean.chunk_matrix().offsets.numpy())
    np.testing.assert_allclose(kb.chunk_matrix().vectors.numpy(), clean.chunk_matrix().vectors.numpy())
    chunks = kb.store().chunks.to_arrow()
    assert chunks.num_rows == clean.num_chunks, "orphans of the killed runs were not removed"
    # the lexical side (the store's full-text index) survived the kills as well: same chunks matched, same order
    texts = ["bucket policy", "snapshot key role"]
    got, want = kb.lexical_chunk_scores(texts), clean.lexical_chunk_scores(texts)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunk_matrix_helpers():
    c = M.ChunkMatrix(torch.eye(4), torch.tensor([0, 1, 1, 4]))
    assert c.num_docs == 3 and c.lengths.tolist() == [1, 0, 3] and c.doc_of_chunk().tolist() == [0, 2, 2, 2]
    assert torch.isneginf(M.first_scores(c, torch.eye(4)[:1])[0, 1])
