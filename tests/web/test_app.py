import json
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the web app needs fastapi and uvicorn (the web extra)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the web extra)")

from fastapi.testclient import TestClient

from attnpool.diagnostics.signals import effective_count, normalized_entropy
from attnpool.kb import METHODS, StoreError
from attnpool.web.app import MAX_BODY_BYTES, MAX_QUERY_CHARS, history_query

QUERY = "zebra quokka marmoset paragraph"


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def conversation_available() -> bool:
    try:
        from attnpool.conversation import contextual_query  # noqa: F401
    except ImportError:
        return False
    return True


def test_info_describes_the_store_and_its_methods(client, kb):
    info = client.get("/api/info").json()
    assert info["documents"] == kb.num_documents == 27 and info["chunks"] == kb.num_chunks
    assert info["model_id"] == "hash-encoder-32" and info["dim"] == 32
    # no head was trained in this store, so the head methods are listed as unavailable, with the reason
    assert info["methods"] == SEARCHABLE
    assert set(info["unavailable_methods"]) == set(METHODS) - set(SEARCHABLE)
    assert "--save-heads" in info["unavailable_methods"]["learned"]
    assert info["limits"]["query_chars"] == MAX_QUERY_CHARS


SEARCHABLE = [m for m in METHODS if m not in ("learned", "multi")]  # no head is trained in the test store


@pytest.mark.parametrize("method", SEARCHABLE)
def test_search_returns_what_the_knowledge_base_returns(client, kb, method):
    r = client.post("/api/search", json={"query": QUERY, "method": method, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    want = kb.search(QUERY, method=method, k=5)
    assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in want]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in want], abs=1e-6)
    assert body["method"] == method and body["temperature"] == kb.temperature() and body["took_ms"] > 0


def test_search_finds_the_planted_document(client):
    hits = client.post("/api/search", json={"query": QUERY}).json()["hits"]
    assert hits[0]["doc_id"] == "storage-buckets-delete" and hits[0]["title"] == "gcloud storage buckets delete"
    assert len(hits) == 10 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_explain_gives_every_chunk_weight_and_the_pooling_diagnostics(client, kb):
    r = client.post("/api/explain", json={"query": QUERY, "k": 4, "top_chunks": 2, "method": "attention"})
    assert r.status_code == 200, r.text
    body = r.json()
    lengths = kb.chunk_matrix().lengths
    for hit in body["hits"]:
        w = torch.tensor([c["weight"] for c in hit["chunks"]], dtype=torch.float64)
        assert len(w) == int(lengths[kb.doc_ids.index(hit["doc_id"])])
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
        assert sum(bool(c["text"]) for c in hit["chunks"]) == min(2, len(w))
        # the shown texts are the best-weighted chunks
        best = sorted(hit["chunks"], key=lambda c: -c["weight"])[:2]
        assert all(c["text"] for c in best)
        p = hit["pooling"]
        assert p["n"] == len(w) and p["max_weight"] == pytest.approx(float(w.max()))
        assert p["effective_n"] == pytest.approx(float(effective_count(w)), rel=1e-6)
        want_h = float(normalized_entropy(w))
        assert (p["normalized_entropy"] is None) if math.isnan(want_h) else p["normalized_entropy"] == pytest.approx(
            want_h, rel=1e-6)
    diag = body["diagnostics"]
    assert diag["top_hit"] == body["hits"][0]["pooling"]
    effs = [h["pooling"]["effective_n"] for h in body["hits"]]
    assert diag["mean_effective_n"] == pytest.approx(sum(effs) / len(effs))
    # the planted chunk (rare words) carries most of the top hit's weight
    top = body["hits"][0]
    assert top["doc_id"] == "storage-buckets-delete"
    heaviest = max(top["chunks"], key=lambda c: c["weight"])
    assert "zebra quokka marmoset" in heaviest["text"]


def test_explain_of_a_hybrid_shows_each_signal_and_the_chunks_bm25(client, kb):
    body = client.post("/api/explain", json={"query": QUERY, "k": 3, "method": "hybrid-score"}).json()
    for hit in body["hits"]:
        assert set(hit["signals"]) == {"bm25", "attention"}
        assert all(1 <= s["rank"] <= kb.num_documents for s in hit["signals"].values())
        assert all(c["lexical"] is not None for c in hit["chunks"])
    top = body["hits"][0]
    assert top["doc_id"] == "storage-buckets-delete" and top["signals"]["bm25"]["rank"] == 1
    assert max(top["chunks"], key=lambda c: c["lexical"])["text"], "the chunk with the lexical evidence is shown"
    plain = client.post("/api/explain", json={"query": QUERY, "k": 1, "method": "attention"}).json()["hits"][0]
    assert plain["signals"] == {} and all(c["lexical"] is None for c in plain["chunks"])


def test_a_lower_temperature_concentrates_the_weights(client):
    def top_pooling(t):
        body = client.post("/api/explain", json={"query": QUERY, "k": 1, "temperature": t}).json()
        assert body["temperature"] == t
        return body["hits"][0]["pooling"]

    sharp, flat = top_pooling(0.02), top_pooling(10.0)
    assert sharp["effective_n"] < flat["effective_n"]
    assert sharp["normalized_entropy"] < 0.5 < 0.99 < flat["normalized_entropy"]


@pytest.mark.skipif(not conversation_available(), reason="attnpool.conversation (history pooling) is not present")
def test_history_search_pools_the_conversation_into_the_query(client, kb):
    from attnpool.conversation import Turn, contextual_query, default_history_pool

    turns = [{"role": "user", "text": "how do I list pubsub topics"},
             {"role": "assistant", "text": "gcloud pubsub topics list"},
             {"role": "user", "text": "zebra quokka marmoset bucket removal"}]
    r = client.post("/api/history/search", json={"turns": turns, "message": "and how do I delete it", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["turn_weights"]) == len(turns)
    assert sum(body["turn_weights"]) + body["message_weight"] == pytest.approx(1.0, abs=1e-5)
    query, weights = contextual_query(default_history_pool().eval(), [Turn(**t) for t in turns],
                                      "and how do I delete it", kb.encode_queries)
    assert body["turn_weights"] == pytest.approx(weights[:-1].tolist(), abs=1e-6)
    assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in kb.search(query, k=3)]
    assert body["turn_pooling"]["n"] == len(turns) + 1
    assert body["turn_pooling"]["effective_n"] == pytest.approx(float(effective_count(weights.double())), rel=1e-5)
    assert all(h["chunks"] and h["pooling"]["n"] == len(h["chunks"]) for h in body["hits"])


def test_history_search_without_conversation_pooling_is_a_501_that_says_why(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnpool.conversation", None)  # makes the import fail
    r = client.post("/api/history/search", json={"turns": [], "message": "delete it"})
    assert r.status_code == 501 and "attnpool.conversation" in r.json()["message"]


def test_history_query_is_the_boundary(kb, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnpool.conversation", None)
    from attnpool.web.app import HistoryUnavailable

    with pytest.raises(HistoryUnavailable, match="conversation-history pooling"):
        history_query(kb, [], "hello")


LONG = "x" * 100_000

BAD_JSON = [
    # (body, expected status, words the message must contain)
    ({"query": ""}, 422, ["query", "at least 1 character"]),
    ({"query": "  \n\t "}, 422, ["query", "non-empty", "whitespace"]),
    ({"query": LONG}, 422, ["query", f"at most {MAX_QUERY_CHARS} characters", "got 100000"]),
    ({"query": "bucket", "method": "nope"}, 422, ["method", "'attention'", "got 'nope'"]),
    ({"query": "bucket", "method": "learned"}, 422, ["method", "learned", "not available", "--save-heads"]),
    ({"query": "bucket", "k": 0}, 422, ["k", "greater than or equal to 1", "got 0"]),
    ({"query": "bucket", "k": 101}, 422, ["k", "less than or equal to 100", "got 101"]),
    ({"query": "bucket", "k": "ten"}, 422, ["k", "integer"]),
    ({"query": "bucket", "temperature": 0}, 422, ["temperature", "greater than 0"]),
    ({"query": "bucket", "temperature": "nan"}, 422, ["temperature", "finite"]),
    ({"query": "bucket", "colour": "red"}, 422, ["colour", "unknown field"]),
    ({"query": 5}, 422, ["query", "string"]),
    ({}, 422, ["query", "required"]),
    ([1, 2], 422, ["request body", "JSON object", "list"]),
    ("just a string", 422, ["request body", "JSON object"]),
]


@pytest.mark.parametrize("path", ["/api/search", "/api/explain"])
@pytest.mark.parametrize(("body", "status", "words"), BAD_JSON,
                         ids=[f"{i}-{json.dumps(b)[:24]}" for i, (b, *_) in enumerate(BAD_JSON)])
def test_bad_input_is_a_4xx_with_a_clear_message(client, path, body, status, words):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    message = r.json()["message"]
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(("content", "headers", "words"), [
    (b'{"query": ', {"content-type": "application/json"}, ["invalid JSON at character 10"]),
    (b'{"query": "a",}', {"content-type": "application/json"}, ["invalid JSON"]),
    (b"", {"content-type": "application/json"}, ["request body", "got none"]),
    (b"query=bucket", {"content-type": "application/x-www-form-urlencoded"}, ["request body", "JSON object"]),
    (b'{"query": "bucket"}', {"content-type": "text/plain"}, ["request body", "JSON object"]),
    ("{\"query\": \"\udcff\"}".encode("utf-8", "surrogatepass"), {"content-type": "application/json"},
     ["query", "unicode string"]),
])
def test_invalid_json_is_a_422_with_a_clear_message(client, content, headers, words):
    r = client.post("/api/search", content=content, headers=headers)
    assert r.status_code == 422, r.text
    for word in words:
        assert word in r.json()["message"], r.json()


@pytest.mark.parametrize("query", ["\\ud800 bucket", "\\u0000", "\\ufeff\\u202e bucket \\ud83d\\ude00"])
def test_odd_but_valid_unicode_does_not_break_the_server(client, query):
    r = client.post("/api/explain", content=f'{{"query": "{query}"}}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(client):
    big = json.dumps({"query": "x" * (MAX_BODY_BYTES + 10)}).encode()
    r = client.post("/api/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"at most {MAX_BODY_BYTES} bytes" in r.json()["message"]

    def chunks():  # no Content-Length: the limit must hold for a chunked upload too
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = client.post("/api/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["message"]


@pytest.mark.parametrize(("verb", "path", "status", "words"), [
    ("DELETE", "/api/search", 405, ["DELETE", "not allowed", "POST"]),
    ("GET", "/api/explain", 405, ["GET", "not allowed", "POST"]),
    ("PUT", "/api/history/search", 405, ["PUT", "POST"]),
    ("POST", "/api/info", 405, ["POST", "GET"]),
    ("GET", "/api/nothing-here", 404, ["no such path", "/api/nothing-here", "/openapi.json"]),
])
def test_unknown_http_method_or_path_is_a_4xx_with_a_clear_message(client, verb, path, status, words):
    r = client.request(verb, path)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["message"], r.json()


@pytest.mark.parametrize(("body", "words"), [
    ({"turns": [], "message": " "}, ["message", "non-empty"]),
    ({"turns": [{"role": "robot", "text": "hi"}], "message": "a"}, ["turns.0.role", "'user'", "got 'robot'"]),
    ({"turns": [{"role": "user", "text": ""}], "message": "a"}, ["turns.0.text", "at least 1 character"]),
    ({"turns": [{"role": "user", "text": "hi"}] * 51, "message": "a"}, ["turns", "at most 50"]),
    ({"turns": "hello", "message": "a"}, ["turns", "list"]),
    ({"message": LONG}, ["message", "at most 2000 characters", "got 100000"]),
    ({"message": "delete it", "method": "bm25"}, ["method", "'bm25'", "pooled vector", "attention"]),
])
def test_bad_history_input_is_a_422_with_a_clear_message(client, body, words):
    r = client.post("/api/history/search", json=body)
    assert r.status_code == 422, r.text
    for word in words:
        assert word in r.json()["message"], r.json()


def test_store_errors_are_a_503_that_says_why(app, client, kb, monkeypatch):
    def broken(*args, **kwargs):
        raise StoreError("the chunks table is gone")

    monkeypatch.setattr(kb, "search", broken)
    r = client.post("/api/search", json={"query": "bucket"})
    assert r.status_code == 503 and "the chunks table is gone" in r.json()["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
request_like = st.fixed_dictionaries({}, optional={
    "query": st.text(max_size=40) | json_values, "method": st.sampled_from([*METHODS, "x", ""]) | json_values,
    "k": st.integers(-5, 200) | json_values, "temperature": st.floats() | json_values,
    "top_chunks": st.integers(-2, 60) | json_values, "turns": json_values, "message": json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=request_like | json_values, path=st.sampled_from(["/api/search", "/api/explain", "/api/history/search"]))
def test_no_request_body_gives_a_5xx(client, body, path):
    # json.dumps writes NaN and Infinity as bare tokens, which Python's JSON parser (and so the server's) accepts
    r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500 or (r.status_code == 501 and path == "/api/history/search"), r.text
    if r.status_code >= 400:
        assert r.json()["message"]


def test_openapi_schema_lists_the_endpoints_with_their_limits(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/api/search", "/api/explain", "/api/history/search", "/api/info"} <= set(paths)
    assert set(paths["/api/search"]) == {"post"} and set(paths["/api/info"]) == {"get"}
    search = schema["components"]["schemas"]["SearchRequest"]["properties"]
    assert search["query"]["maxLength"] == MAX_QUERY_CHARS and search["query"]["minLength"] == 1
    assert search["method"]["enum"] == list(METHODS)
    assert "422" in paths["/api/explain"]["post"]["responses"] and "413" in paths["/api/explain"]["post"]["responses"]
    assert "501" in paths["/api/history/search"]["post"]["responses"]


def test_the_page_and_its_assets_are_served_and_need_no_network(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="query"' in html and 'id="diagnostics"' in html and 'id="conversation"' in html
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and asset in html
        # everything is served from here: no CDN, no absolute URL
        assert "http://" not in r.text and "https://" not in r.text
    assert "http://" not in html and "https://" not in html


def test_kb_serve_subcommand_calls_the_server(monkeypatch, tmp_path):
    from attnpool.cli import main

    seen = {}
    monkeypatch.setattr("attnpool.web.app.serve", lambda store, **kw: seen.update(store=store, **kw))
    assert main(["kb", "serve", "--store", str(tmp_path), "--port", "8123"]) == 0
    assert seen == {"store": str(tmp_path), "host": "127.0.0.1", "port": 8123, "model": None}


def test_passages_fit_the_budget_and_carry_their_source(client, kb):
    from attnpool.passages import passages_for_question

    r = client.post("/api/passages", json={"query": QUERY, "budget": 300, "diversity": 0.3, "docs": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < body["tokens"] <= 300 and body["tokens"] == sum(p["num_tokens"] for p in body["passages"])
    want = passages_for_question(kb, QUERY, budget=300, diversity=0.3, num_docs=5)
    assert [(p["doc_id"], p["index"]) for p in body["passages"]] == [(p.doc_id, p.index) for p in want.passages]
    for p in body["passages"]:
        chunk = kb.store().chunk_texts(p["doc_id"])[p["index"]]
        assert (chunk["start"], chunk["end"], chunk["text"]) == (p["start"], p["end"], p["text"])
    assert "/api/passages" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body, words", [
    ({"query": QUERY, "budget": 0}, "budget"),
    ({"query": QUERY, "diversity": 2}, "diversity"),
    ({"query": "   "}, "query"),
    ({"query": QUERY, "docs": 0}, "docs"),
])
def test_bad_passage_requests_are_422(client, body, words):
    r = client.post("/api/passages", json=body)
    assert r.status_code == 422 and words in r.json()["message"]
