"""Load test of the knowledge base's web API (`attnpool kb serve`) on loopback, written up as Markdown.

Starts `attnpool kb serve` in its own process on a free port, measures each endpoint one request at a time (the
service time), then fires a few hundred requests at once (search, explain and history search mixed) and records
errors and the latency percentiles. A request's latency runs from when the client connects to its response, so under
load it includes the wait behind the others in flight: the server answers one search at a time (the encoder is not
shared between threads), so p95 under load is about (requests in flight) x (service time).

    python benchmarks/kb_web_load.py                                  # a synthetic store, built in a temp dir
    python benchmarks/kb_web_load.py --store /tmp/kb-gcloud \\
        --queries ../shared/datasets/gcloud-man/queries.jsonl         # a real store, opened read-only

The store is only read: the dense methods are used (BM25 would cache its index inside the store).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["create", "list", "delete", "update", "describe", "instance", "bucket", "cluster", "network", "firewall",
         "disk", "snapshot", "image", "key", "role", "policy", "topic", "subscription", "queue", "job", "service",
         "account", "project", "region", "zone", "backup", "restore", "export", "import", "rule", "route",
         "certificate", "secret", "version", "alias", "endpoint", "model", "dataset", "table", "view", "index"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


def synthetic_store(path: Path, docs: int, seed: int) -> None:
    from attnpool.kb import Document, KnowledgeBase

    rng = random.Random(seed)
    documents = [Document(f"doc{i:04d}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 600))),
                          title=f"synthetic document {i}") for i in range(docs)]
    report = KnowledgeBase(path).index(documents, progress=False)
    print(f"synthetic store {path}: {report}", flush=True)


def read_queries(path: str | None, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if path is None:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            texts.append(json.loads(line)["text"] if line.startswith("{") else line)
    if not texts:
        raise SystemExit(f"--queries {path}: no query in the file")
    return [rng.choice(texts) for _ in range(n)]


def requests_for(queries: list[str], k: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i, q in enumerate(queries):
        kind = i % 3
        if kind == 0:
            out.append(("/api/search", {"query": q, "k": k, "method": "attention"}))
        elif kind == 1:
            out.append(("/api/explain", {"query": q, "k": k, "top_chunks": 3}))
        else:
            turns = [{"role": "user", "text": rng.choice(queries)}, {"role": "assistant", "text": "see its page"}]
            out.append(("/api/history/search", {"turns": turns, "message": q, "k": k}))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"attnpool kb serve exited with code {proc.returncode}")
        try:
            r = httpx.get(url + "/api/info", timeout=5)
            if r.status_code == 200:
                return r.json()  # type: ignore[no-any-return]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"attnpool kb serve: not ready after {timeout:.0f} s")


def screenshot(url: str, path: str, query: str, turns: str) -> None:
    """The page as a user sees it: the query typed into the search box (and turns into the conversation pane)."""
    from attnpool.web.browser import Chromium

    with Chromium(width=1280, height=1400) as browser:
        browser.navigate(url + "/")
        browser.wait_for("document.body && document.body.dataset.state === 'ready'")
        if turns:
            browser.click("#conversation summary")
            browser.click("#turns")
            browser.type_text(turns)
        browser.click("#query")
        browser.type_text(query)
        browser.press_enter()
        state = browser.wait_for("['results', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state", timeout=300)
        if state != "results":
            shown = browser.evaluate("document.getElementById('error').textContent")
            raise SystemExit(f"screenshot: the page shows an error: {shown}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(path, full_page=False)
        if browser.console_errors:
            raise SystemExit(f"screenshot: console errors: {browser.console_errors}")
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="a knowledge base to serve, read-only (default: a synthetic one)")
    p.add_argument("--queries", default=None, help="queries: a BEIR queries.jsonl or one query a line "
                                                   "(default: random words)")
    p.add_argument("--docs", type=int, default=120, help="documents of the synthetic store (default: %(default)s)")
    p.add_argument("--requests", type=int, default=300, help="requests fired at once (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=300, help="most requests in flight (default: %(default)s)")
    p.add_argument("--sequential", type=int, default=15, help="requests per endpoint one at a time "
                                                              "(default: %(default)s)")
    p.add_argument("-k", type=int, default=10, help="hits per request (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds a request may take, queueing included")
    p.add_argument("--out", default=None, help="the Markdown file (default: benchmarks/results/kb-web-load-DATE.md)")
    p.add_argument("--screenshot", default=None, help="also save a PNG of the page in headless Chromium, with the "
                                                      "results of --screenshot-query (e.g. docs/images/kb-web.png)")
    p.add_argument("--screenshot-query", default="how do I delete a storage bucket")
    p.add_argument("--screenshot-turns", default="", help="conversation turns typed into the page, one per line "
                                                          "('user: ...' / 'assistant: ...')")
    args = p.parse_args(argv)

    from attnpool.web.loadtest import run_load

    started = datetime.now(timezone.utc)
    command = "python benchmarks/kb_web_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tmp = None
    store = args.store
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="kb-web-load-")
        store = str(Path(tmp.name) / "kb")
        synthetic_store(Path(store), args.docs, args.seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-c", "from attnpool.cli import main; raise SystemExit(main())", "kb",
                               "serve", "--store", store, "--port", str(port)], env=env)
    try:
        t0 = time.perf_counter()
        info = wait_ready(url, server, 600)
        startup = time.perf_counter() - t0
        print(f"server ready in {startup:.1f} s: {info['documents']} documents, {info['chunks']} chunks", flush=True)
        load1_before = os.getloadavg()[0]
        queries = read_queries(args.queries, args.requests + 3 * args.sequential, args.seed)
        # one at a time per endpoint: the service time
        sequential = {}
        seq_requests = requests_for(queries[:3 * args.sequential], args.k, args.seed + 1)
        run_load(url, seq_requests[:3], concurrency=1)  # warm every endpoint
        for path in ("/api/search", "/api/explain", "/api/history/search"):
            mine = [r for r in seq_requests if r[0] == path]
            sequential[path] = run_load(url, mine, concurrency=1)
            print(f"{path} one at a time: {sequential[path].summary()}", flush=True)
        load = run_load(url, requests_for(queries[3 * args.sequential:], args.k, args.seed + 2),
                        concurrency=args.concurrency, timeout=args.timeout)
        print(f"load: {load.summary()}", flush=True)
        if load.errors:
            print("errors:", *load.errors[:10], sep="\n  ")
        load1_after = os.getloadavg()[0]
        if args.screenshot:
            screenshot(url, args.screenshot, args.screenshot_query, args.screenshot_turns.replace("\\n", "\n"))
    finally:
        server.terminate()
        server.wait(30)
        if tmp is not None:
            tmp.cleanup()

    s = load.summary()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"kb-web-load-{started:%Y-%m-%d}.md"
    import torch

    import attnpool

    lines = [
        f"# Knowledge-base web API under load, {started:%Y-%m-%d}",
        "",
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (VM); 1-minute load average {load1_before:.1f} before the "
        f"load, {load1_after:.1f} after" + (" — **other jobs shared the cores: the latencies are noisy and "
                                            "pessimistic**" if max(load1_before, load1_after) > 1.5 else ""),
        f"- python {platform.python_version()}, torch {torch.__version__}, attnpool {attnpool.__version__} @ "
        f"{git_commit()}",
        f"- store: {args.store or f'synthetic, {args.docs} documents of random words (seed {args.seed})'}: "
        f"{info['documents']} documents, {info['chunks']} chunks, {info['model_id']} ({info['dim']}-d), "
        f"temperature {info['temperature']:.3g}",
        f"- queries: {args.queries or 'random words'}; k = {args.k}; the server (`attnpool kb serve`, uvicorn, one "
        f"process) ready {startup:.1f} s after its start; the client (asyncio streams, one connection per request, "
        "see attnpool.web.loadtest) in another process, on loopback",
        "",
        "## One request at a time (service time)",
        "",
        "| endpoint | requests | errors | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for path, r in sequential.items():
        q = r.summary()
        lines.append(f"| `POST {path}` | {q['requests']} | {q['errors']} | {q['p50_ms']} | {q['p95_ms']} | "
                     f"{q['max_ms']} |")
    lines += [
        "",
        f"## {s['requests']} requests at once (at most {s['concurrency']} in flight; search, explain and history "
        "search in turn)",
        "",
        "| requests | ok | errors | statuses | wall s | requests/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['ok']} | {s['errors']} | {s['statuses']} | {s['seconds']} | {s['throughput_rps']} | "
        f"{s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['max_ms']} |",
        "",
        "The server answers one search at a time (one worker thread calls the knowledge base, whose encoder is not "
        "shared between threads; the others wait in a FIFO queue), so under load a request waits for those ahead of "
        "it: p50 is about half the wall time and p95 about 95% of it. Errors are transport errors, non-2xx answers "
        "and 2xx bodies that are not JSON with hits.",
        "",
    ]
    if load.errors:
        lines += ["Errors (first 10):", "", *[f"- {e}" for e in load.errors[:10]], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return 1 if load.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
