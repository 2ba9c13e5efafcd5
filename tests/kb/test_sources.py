import json

import pytest

from attnpool.kb.sources import (
    Document,
    InputError,
    content_hash,
    html_to_text,
    read_beir_corpus,
    read_beir_qrels,
    read_documents,
)


def test_reads_text_markdown_html_and_beir(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# Title\n\nmarkdown body")
    (tmp_path / "c.html").write_text("<html><head><title>Page</title><style>x{}</style></head>"
                                     "<body><p>Hello&amp;bye</p><script>var a;</script><div>two</div></body></html>")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "beir text"}) + "\n")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "c.html", tmp_path / "corpus.jsonl"])
    by_id = {d.doc_id: d for d in docs}
    assert by_id[str(tmp_path / "a.txt")].text == "plain text"
    html = by_id[str(tmp_path / "c.html")]
    assert html.title == "Page" and html.text == "Hello&bye\ntwo"
    assert by_id["d1"].full_text == "T\nbeir text"


def test_directory_with_corpus_is_beir(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "x", "text": "a"}\n{"_id": "y", "text": "b", "title": null}\n')
    assert [d.doc_id for d in read_documents([tmp_path])] == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    ('{"_id": "x", "text": "a"}\n{not json}\n', ":2: expected one JSON object per line"),
    ('{"_id": "x"}\n', "expected a string 'text'"),
    ('{"text": "a"}\n', "expected a non-empty string '_id'"),
    ('{"_id": "x", "text": "a"}\n{"_id": "x", "text": "b"}\n', "duplicate _id 'x'"),
    ('[1, 2]\n', "expected a JSON object, got list"),
])
def test_malformed_beir_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "corpus.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        read_beir_corpus(f)
    assert str(f) in str(e.value)


def test_missing_undecodable_and_empty(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_documents([tmp_path / "nope.txt"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe bytes")
    with pytest.raises(InputError, match="expected UTF-8 text, got undecodable bytes at offset 3"):
        read_documents([bad])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(InputError, match="expected at least one document with text"):
        read_documents([empty])
    with pytest.raises(InputError, match="expected at least one file"):
        read_documents([])
    odd = tmp_path / "x.pdf"
    odd.write_bytes(b"%PDF")
    with pytest.raises(InputError, match=r"got a \.pdf file"):
        read_documents([odd])


def test_qrels_errors(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n")
    with pytest.raises(InputError, match=":3: expected 3 tab-separated fields"):
        read_beir_qrels(f)
    f.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    assert read_beir_qrels(f) == {"q1": {"d1": 1}, "q2": {"d2": 2}}


def test_content_hash_changes_with_text_title_and_settings():
    d = Document("a", "text", "title")
    assert content_hash(d) == content_hash(Document("a", "text", "title", source="elsewhere"))
    variants = [Document("a", "text2", "title"), Document("a", "text", "t")]
    assert len({content_hash(d), *map(content_hash, variants), content_hash(d, "other-model")}) == 4


def test_html_to_text_skips_scripts_and_keeps_blocks():
    text, title = html_to_text("<title> A  b </title><ul><li>one</li><li>two</li></ul><noscript>x</noscript>")
    assert (text, title) == ("one\ntwo", "A b")
