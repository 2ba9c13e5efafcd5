"""A bounded load test on loopback: a few hundred requests in flight at once against uvicorn, no error allowed, the
latency percentiles recorded (``-s`` prints them; they also go into the JUnit report as properties). Speed figures
live in benchmarks/kb_web_load.py; this test asserts correctness under concurrency only."""

import json
import urllib.request

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the web app's server is uvicorn (the web extra)")

from attnpool.web.loadtest import BackgroundServer, percentile, run_load

REQUESTS = 300


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        x = rng.exponential(size=n).tolist()
        for q in (0, 50, 95, 99, 100):
            assert percentile(x, q) == pytest.approx(float(np.percentile(x, q)))


def test_hundreds_of_concurrent_requests_all_succeed(app, record_property):
    words = ["bucket", "firewall", "topic", "delete", "create", "list", "zebra", "quokka", "policy", "network"]
    requests = []
    for i in range(REQUESTS):
        query = " ".join(words[(i + j) % len(words)] for j in range(1 + i % 4))
        if i % 3 == 0:
            requests.append(("/api/explain", {"query": query, "k": 3, "top_chunks": 1}))
        elif i % 3 == 1:
            method = ("attention", "max", "mean")[(i // 3) % 3]
            requests.append(("/api/search", {"query": query, "k": 10, "method": method}))
        else:
            requests.append(("/api/search", {"query": query, "k": 5}))
    with BackgroundServer(app) as server:
        result = run_load(server.url, requests, concurrency=REQUESTS)
        # the server is still healthy afterwards
        with urllib.request.urlopen(server.url + "/api/info", timeout=30) as r:
            assert r.status == 200 and json.load(r)["documents"] == 27
    summary = result.summary()
    for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps"):
        record_property(key, summary[key])
    print(f"\nload test: {summary}")
    assert result.errors == [], result.errors[:5]
    assert result.ok == REQUESTS and summary["statuses"] == {200: REQUESTS}
    assert len(result.latencies_ms) == REQUESTS and 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"]
