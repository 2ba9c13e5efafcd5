"""attnpool.kb.ray_pipeline on a local Ray instance with 2 CPUs: the store it writes equals the one
KnowledgeBase.index writes (same hashes, chunks, offsets and vectors), reruns do no work, updates replace old versions,
a failing batch leaves a consistent store, and the CLI's --ray path works with the real MiniLM encoder."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
pytest.importorskip("ray.data", reason="the Ray pipeline needs ray[data] (the kb-ray extra)")

import ray

from attnpool.kb import Document, InputError, KnowledgeBase, read_documents
from attnpool.kb.ray_pipeline import index_with_ray
from tests.kb._fake import HashEncoder

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["create", "list", "delete", "update", "describe", "instance", "bucket", "cluster", "network", "firewall",
         "disk", "snapshot", "image", "key", "role", "policy", "topic", "subscription", "queue", "job"]
CHUNKING = {"max_tokens": 64, "overlap": 8}


class PoisonEncoder(HashEncoder):
    """Fails on any batch holding the word 'poison', as a model running out of memory mid-run would."""

    def encode(self, texts, **kw):
        if any("poison" in t for t in texts):
            raise RuntimeError("poisoned batch")
        return super().encode(texts, **kw)


def make_docs(n: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = [Document(f"doc{i:03d}", " ".join(rng.choice(WORDS, size=int(rng.integers(5, 200)))),
                     title=f"title {i}" if i % 3 else "", source=f"src/{i}") for i in range(n)]
    return [*docs, Document("empty", "", "")]  # no chunks, but stored as KnowledgeBase.index stores it


def snapshot(path: Path) -> dict:
    """What a reader can see in a store: settings, committed documents, and their live chunks with vectors."""
    kb = KnowledgeBase(path)
    store = kb.store()
    meta = json.loads((path / "kb.json").read_text())
    docs = sorted(store.documents.to_arrow().to_pylist(), key=lambda r: r["doc_id"])
    current = {d["doc_id"]: d["doc_hash"] for d in docs}
    chunks = [r for r in store.chunks.to_arrow().to_pylist() if current.get(r["doc_id"]) == r["doc_hash"]]
    chunks.sort(key=lambda r: (r["doc_id"], r["chunk_index"]))
    vectors = np.array([r.pop("vector") for r in chunks], dtype=np.float32).reshape(len(chunks), -1)
    return {"meta": meta, "docs": docs, "chunks": chunks, "vectors": vectors}


def assert_same_store(a: Path, b: Path, atol: float = 0.0) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa["meta"] == sb["meta"]
    assert sa["docs"] == sb["docs"]  # ids, content hashes, titles, sources, chunk counts
    assert sa["chunks"] == sb["chunks"]  # texts, offsets, token counts, chunk order
    np.testing.assert_allclose(sa["vectors"], sb["vectors"], rtol=0, atol=max(atol, 1e-7))
    live = {(c["doc_id"], c["chunk_index"]) for c in sa["chunks"]}
    assert len(live) == len(sa["chunks"]), "a live chunk is stored twice"
    for d in sa["docs"]:
        assert {i for (doc, i) in live if doc == d["doc_id"]} == set(range(d["num_chunks"])), d["doc_id"]


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process; this module starts its own 2-CPU instance")
    # the workers import tests.kb._fake (the HashEncoder) from the checkout and never reach the Hugging Face hub
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def built(local_ray, tmp_path_factory):
    """30 documents (and an empty one) indexed both ways: with Ray (2 actors) and with KnowledgeBase.index."""
    root = tmp_path_factory.mktemp("ray-kb")
    docs = make_docs(30)
    report = index_with_ray(docs, root / "ray", encoder_factory=HashEncoder, batch_size=4, progress=False,
                            **CHUNKING)
    KnowledgeBase(root / "single", HashEncoder(), **CHUNKING).index(docs, progress=False)
    return {"root": root, "docs": docs, "report": report}


def test_same_store_as_the_single_machine_path(built):
    r = built["report"]
    assert (r.added, r.updated, r.unchanged, r.deleted) == (31, 0, 0, 0)
    assert_same_store(built["root"] / "ray", built["root"] / "single")
    assert r.chunks == len(snapshot(built["root"] / "ray")["chunks"]) > 31
    assert 0 < r.encode_seconds <= r.seconds and 0 <= r.outside_encoder_fraction < 1


def test_search_reads_the_ray_store_like_the_single_machine_one(built):
    ray_kb = KnowledgeBase(built["root"] / "ray", HashEncoder())
    single = KnowledgeBase(built["root"] / "single", HashEncoder())
    for method in ("attention", "mean", "max", "first"):
        a = ray_kb.search("firewall snapshot policy", method=method, k=5, explain=True)
        b = single.search("firewall snapshot policy", method=method, k=5, explain=True)
        assert [h.to_dict() for h in a] == [h.to_dict() for h in b]
    assert ray_kb.num_documents == 31


def test_rerun_does_no_work_and_the_single_machine_path_agrees(built, tmp_path):
    store = tmp_path / "kb"
    shutil.copytree(built["root"] / "ray", store)
    versions = lambda s: (s.chunks.version, s.documents.version)  # noqa: E731
    before = versions(KnowledgeBase(store).store())
    r = index_with_ray(built["docs"], store, encoder_factory=HashEncoder, batch_size=4, progress=False, **CHUNKING)
    assert (r.added, r.updated, r.unchanged, r.chunks) == (0, 0, 31, 0)
    assert versions(KnowledgeBase(store).store()) == before, "an unchanged rerun wrote to the store"
    # the same content hashes: the single-machine path sees every document as unchanged, and the reverse
    encoder = HashEncoder()
    r = KnowledgeBase(store, encoder, **CHUNKING).index(built["docs"], progress=False)
    assert (r.unchanged, r.chunks, encoder.calls) == (31, 0, 0)

    # chunks a killed writer appended but never committed are invisible, and the next Ray run removes them
    import pyarrow as pa

    s = KnowledgeBase(store).store()
    live = s.chunks.search().where("doc_id = 'doc001'").limit(None).to_arrow()
    s.chunks.add(live.set_column(live.schema.get_field_index("doc_hash"), "doc_hash",
                                 pa.array(["killed-run"] * live.num_rows)))
    assert_same_store(store, built["root"] / "single")
    r = index_with_ray(built["docs"], store, encoder_factory=HashEncoder, progress=False, **CHUNKING)
    assert (r.orphans_removed, r.unchanged, r.chunks) == (live.num_rows, 31, 0)
    assert KnowledgeBase(store).store().chunks.count_rows() == len(snapshot(store)["chunks"])


def test_update_add_and_delete_match_the_single_machine_path(built, tmp_path):
    docs = built["docs"]
    changed = [*docs[:5], Document("doc005", "firewall " * 120, "a new title", "src/5"), *docs[6:29],
               Document("new", "queue topic subscription " * 10, "", "src/new")]  # doc029 and "empty" are gone
    ray_store, single_store = tmp_path / "ray", tmp_path / "single"
    shutil.copytree(built["root"] / "ray", ray_store)
    shutil.copytree(built["root"] / "single", single_store)
    r = index_with_ray(changed, ray_store, encoder_factory=HashEncoder, batch_size=4, delete_missing=True,
                       progress=False, **CHUNKING)
    assert (r.added, r.updated, r.unchanged, r.deleted) == (1, 1, 28, 2)
    KnowledgeBase(single_store, HashEncoder(), **CHUNKING).index(changed, delete_missing=True, progress=False)
    assert_same_store(ray_store, single_store)
    kb = KnowledgeBase(ray_store, HashEncoder())
    assert kb.store().chunk_texts("doc005")[0]["text"].startswith("a new title\nfirewall")
    assert "doc029" not in kb.doc_ids and kb.search("queue topic subscription", k=1)[0].doc_id == "new"


def test_failed_batch_leaves_a_consistent_store_and_a_rerun_finishes(built, tmp_path):
    docs = [*built["docs"][:20], Document("bad", "poison " * 20), *built["docs"][20:]]
    store = tmp_path / "kb"
    with pytest.raises(Exception, match="poisoned batch"):
        index_with_ray(docs, store, encoder_factory=PoisonEncoder, batch_size=4, progress=False, **CHUNKING)
    kb = KnowledgeBase(store)
    partial = snapshot(store)
    assert "bad" not in kb.doc_ids and len(partial["docs"]) < len(docs)
    ref = {d["doc_id"]: d for d in snapshot(built["root"] / "single")["docs"]}
    assert all(d == ref[d["doc_id"]] for d in partial["docs"]), "a committed document differs from the reference"
    # every committed document has all its chunks, and nothing else is visible
    assert len(partial["chunks"]) == sum(d["num_chunks"] for d in partial["docs"])
    r = index_with_ray(docs[:20] + docs[21:], store, encoder_factory=HashEncoder, batch_size=4, progress=False,
                       **CHUNKING)
    assert r.unchanged == len(partial["docs"]) and r.added == 31 - len(partial["docs"])
    assert_same_store(store, built["root"] / "single")


def test_files_and_beir_corpus_read_by_ray_tasks(local_ray, tmp_path):
    src = tmp_path / "src"
    (src / "beir").mkdir(parents=True)
    (src / "notes.md").write_text("# Disks\nsnapshot the disk before you delete the instance\n")
    (src / "page.html").write_text("<html><head><title>Roles</title></head><body><p>grant a role</p></body></html>")
    (src / "blank.txt").write_text("   \n")  # no text: skipped, as read_documents skips it
    rows = [{"_id": f"b{i}", "title": f"t{i}", "text": " ".join(WORDS[i:i + 12])} for i in range(8)]
    (src / "beir" / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    paths = [src / "notes.md", src / "page.html", src / "blank.txt", src / "beir"]
    r = index_with_ray(paths, tmp_path / "ray", encoder_factory=HashEncoder, batch_size=2, progress=False,
                       **CHUNKING)
    assert (r.added, r.unchanged) == (10, 0)
    KnowledgeBase(tmp_path / "single", HashEncoder(), **CHUNKING).index(read_documents(paths), progress=False)
    assert_same_store(tmp_path / "ray", tmp_path / "single")
    sources = {d["doc_id"]: d["source"] for d in snapshot(tmp_path / "ray")["docs"]}
    assert sources["b0"] == f"{src / 'beir' / 'corpus.jsonl'}:1"
    assert sources[str(src / "notes.md")] == str(src / "notes.md")

    # one file changed: the actors skip the 9 unchanged documents (their stored hash is current) and embed the other
    (src / "notes.md").write_text("# Disks\nresize the disk, then snapshot it\n")
    r = index_with_ray(paths, tmp_path / "ray", encoder_factory=HashEncoder, batch_size=2, progress=False,
                       **CHUNKING)
    assert (r.added, r.updated, r.unchanged, r.chunks) == (0, 1, 9, 1)
    KnowledgeBase(tmp_path / "single", HashEncoder(), **CHUNKING).index(read_documents(paths), progress=False)
    assert_same_store(tmp_path / "ray", tmp_path / "single")

    # bad input is reported before the store is touched, naming the file and line
    (src / "beir" / "corpus.jsonl").write_text('{"_id": "x", "text": "a"}\n{"_id": "x", "text": "b"}\n')
    with pytest.raises(InputError, match=r"corpus.jsonl:2: duplicate _id 'x'"):
        index_with_ray([src / "beir"], tmp_path / "new", encoder_factory=HashEncoder, progress=False)
    (src / "other.jsonl").write_text('{"_id": "b1", "text": "again"}\n')
    (src / "beir" / "corpus.jsonl").write_text('{"_id": "b1", "text": "first"}\n')
    with pytest.raises(InputError, match=r"duplicate document id 'b1'"):
        index_with_ray([src / "beir", src / "other.jsonl"], tmp_path / "new", encoder_factory=HashEncoder,
                       progress=False)
    with pytest.raises(InputError, match="no such file or directory"):
        index_with_ray([src / "missing.txt"], tmp_path / "new", encoder_factory=HashEncoder, progress=False)
    assert not (tmp_path / "new").exists()


def test_argument_errors(local_ray, tmp_path):
    with pytest.raises(InputError, match="docs_or_paths: expected at least one"):
        index_with_ray([], tmp_path / "kb", encoder_factory=HashEncoder)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        index_with_ray(make_docs(2), tmp_path / "kb", encoder_factory=HashEncoder, batch_size=0)
    with pytest.raises(InputError, match="duplicate document id 'doc000'"):
        index_with_ray([*make_docs(2), Document("doc000", "x")], tmp_path / "kb", encoder_factory=HashEncoder)
    with pytest.raises(ValueError, match="overlap: expected 0 <= overlap"):
        index_with_ray(make_docs(2), tmp_path / "kb", encoder_factory=HashEncoder, max_tokens=16, overlap=20)
    assert not (tmp_path / "kb").exists()


def test_cli_ray_with_the_minilm_encoder(local_ray, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sentence_transformers", reason="the MiniLM encoder needs sentence-transformers (kb extra)")
    from attnpool.cli import main
    from attnpool.text.encoder import Encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("The firewall blocks incoming traffic on port 22 unless a rule allows it.")
    (src / "b.txt").write_text("Snapshots copy a disk so that it can be restored after a failure.")
    (src / "c.txt").write_text("A queue holds messages until a subscriber reads them.")
    assert main(["kb", "index", str(src), "--ray", "--store", str(tmp_path / "ray"), "--max-tokens", "64",
                 "--overlap", "8", "--quiet"]) == 0
    assert "3 added" in capsys.readouterr().out
    KnowledgeBase(tmp_path / "single", Encoder(), max_tokens=64, overlap=8).index(read_documents([src]),
                                                                                  progress=False)
    assert_same_store(tmp_path / "ray", tmp_path / "single", atol=1e-6)
    hits = KnowledgeBase(tmp_path / "ray").search("how do I restore a disk?", k=3)
    assert hits[0].doc_id == str(src / "b.txt")
