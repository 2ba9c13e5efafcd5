"""A bounded load test of the web API on loopback, and a server that runs in a background thread.

:func:`run_load` fires a fixed list of requests at once (at most ``concurrency`` in flight), each on its own
connection, and reports every failure (transport errors, non-2xx answers, bodies that are not JSON with ``hits``) and
the latency percentiles; ``tests/web/test_load.py`` and ``benchmarks/kb_web_load.py`` both use it.

The client is plain asyncio streams (HTTP/1.1, ``Connection: close``) rather than httpx: with a few hundred requests
in flight, httpx's connection pool took longer to hand the responses over than the server took to send them (measured
with both in one process, 300 searches on the test store: the server had sent every response by 5.5 s, httpx delivered
the last at 9.8 s; with this client, the last arrives as it is sent), so its latencies measured the client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BackgroundServer", "LoadResult", "percentile", "run_load"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    statuses: dict[int, int]
    errors: list[str]

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "concurrency": self.concurrency, "ok": self.ok,
                "errors": len(self.errors), "statuses": dict(sorted(self.statuses.items())),
                "seconds": round(self.seconds, 3), "throughput_rps": round(self.requests / self.seconds, 1),
                "p50_ms": round(self.p(50), 1), "p95_ms": round(self.p(95), 1), "p99_ms": round(self.p(99), 1),
                "max_ms": round(max(self.latencies_ms, default=float("nan")), 1)}


async def _post(host: str, port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on its own connection (``Connection: close``): the status and the body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (path.encode(), host.encode(), port, len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:
            data = await reader.read()  # the server closes the connection after the body
        return status, data
    finally:
        writer.close()


async def _load(base_url: str, requests: Sequence[tuple[str, dict[str, Any]]], concurrency: int,
                timeout: float) -> LoadResult:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: list[str] = []

    async def one(path: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        async with gate:
            start = time.perf_counter()
            try:
                status, data = await asyncio.wait_for(_post(host, port, path, payload), timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                errors.append(f"POST {path}: {type(e).__name__}: {e}")
                return
            latencies.append(1000 * (time.perf_counter() - start))
        statuses[status] += 1
        if not 200 <= status < 300:
            errors.append(f"POST {path}: HTTP {status}: {data[:300]!r}")
            return
        try:
            answer = json.loads(data)
        except ValueError as e:
            errors.append(f"POST {path}: HTTP {status} with a body that is not JSON ({e}): {data[:300]!r}")
            return
        if not isinstance(answer, dict) or "hits" not in answer:
            errors.append(f"POST {path}: HTTP {status} without hits: {data[:300]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(one(p, b) for p, b in requests))
    seconds = time.perf_counter() - start
    return LoadResult(len(requests), concurrency, seconds, latencies, dict(statuses), errors)


def run_load(base_url: str, requests: Sequence[tuple[str, dict[str, Any]]], *, concurrency: int = 200,
             timeout: float = 120.0) -> LoadResult:
    """POST every ``(path, json_body)`` of ``requests`` to ``base_url`` (``http://host:port``), at most
    ``concurrency`` at a time; ``timeout`` seconds per request.

    The latency of a request runs from when it gets its slot (before it connects) to the last byte of its response,
    so it includes the wait in the server's queue behind the others in flight.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency: expected an integer >= 1, got {concurrency}")
    return asyncio.run(_load(base_url, requests, concurrency, timeout))


class BackgroundServer:
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a daemon thread, as a context manager.

    ``url`` is its base URL once entered; leaving stops the server and waits for the thread.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", *, start_timeout: float = 30.0) -> None:
        self.app, self.host, self.start_timeout = app, host, start_timeout
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"uvicorn-{port}")
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"uvicorn did not start on {self.host}:{port} within {self.start_timeout:.0f} s")
            time.sleep(0.02)
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
