"""The FastAPI app over a knowledge base: a page (``/``) and a JSON API (``/api/...``, schema at ``/openapi.json``).

Endpoints:

=============================  ===========================================================================
``GET  /api/info``             the store (documents, chunks, model), the methods it can search with, the limits
``POST /api/search``           the ``k`` best documents for a query, by any document pooling method
``POST /api/explain``          the same, with each hit's chunk weights and the pooling's diagnostics
``POST /api/history/search``   a conversation (turns + current message) pooled into the query, then explained
=============================  ===========================================================================

Bad input never reaches the knowledge base: requests are validated against pydantic models with limits, and every
error, ours or the framework's, is answered as ``{"message": "<what was wrong>", "detail": ...}`` with a 4xx status:
422 for a well-formed request with bad values (empty or too long query, unknown method, invalid JSON), 413 for a body
over :data:`MAX_BODY_BYTES`, 404/405 for an unknown path or HTTP method, 501 while conversation pooling is missing.

The knowledge base is called from one worker thread: the encoder's Hugging Face fast tokenizer is not documented as
safe to share between threads (it can raise "Already borrowed"), the knowledge base's caches are filled on first use,
and the encoder already uses every core, so parallel searches would only compete for them.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attnpool.diagnostics.signals import effective_count, entropy, normalized_entropy
from attnpool.kb.methods import DEFAULT_METHOD, LEXICAL_METHODS, METHODS
from attnpool.kb.sources import InputError
from attnpool.kb.store import StoreError

__all__ = ["MAX_BODY_BYTES", "MAX_QUERY_CHARS", "HistoryUnavailable", "create_app", "history_query"]

STATIC = Path(__file__).resolve().parent / "static"
MAX_QUERY_CHARS = 2000
MAX_TURN_CHARS = 4000
MAX_TURNS = 50
MAX_K = 100
MAX_TOP_CHUNKS = 50
MAX_BODY_BYTES = 512 * 1024
MAX_PASSAGE_BUDGET = 8192
HEAD_METHODS = ("learned", "multi")  # these need a head trained by `attnpool kb eval --save-heads`

Method = Literal[METHODS]  # type: ignore[valid-type]


# -- the conversation boundary -------------------------------------------------------------------------------------

class HistoryUnavailable(RuntimeError):
    """Conversation-history pooling (:mod:`attnpool.conversation`) is not installed in this build."""


def history_query(kb: Any, turns: Sequence[dict[str, str]], message: str) -> tuple[torch.Tensor, list[float]]:
    """The query vector ``[D]`` for ``message`` in the context of ``turns`` (``{"role", "text"}``, oldest first), and
    the weights of the pooled set: one per turn, then the current message's (they sum to 1).

    The web app's only contact with conversation pooling (:func:`attnpool.conversation.contextual_query` with
    :func:`~attnpool.conversation.default_history_pool`); it holds no pooling of its own.
    """
    try:
        from attnpool.conversation import Turn, contextual_query, default_history_pool
    except ImportError as e:
        raise HistoryUnavailable("history search needs attnpool.conversation (conversation-history pooling), which "
                                 f"this build does not have ({e})") from e
    pool = _POOLS.get("default")
    if pool is None:
        pool = _POOLS.setdefault("default", default_history_pool().eval())
    query, weights = contextual_query(pool, [Turn(t["role"], t["text"]) for t in turns], message, kb.encode_queries)
    return query, [float(w) for w in weights]


_POOLS: dict[str, Any] = {}


# -- requests and responses ----------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name}: expected a non-empty text, got only whitespace")
    return value


class SearchRequest(_Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the question, in plain text")
    method: Method = Field(DEFAULT_METHOD, description="document pooling: " + ", ".join(METHODS))
    k: int = Field(10, ge=1, le=MAX_K, description="number of hits")
    temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False,
                                      description="softmax temperature over a document's chunks (default: the "
                                                  "store's tuned one)")

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _not_blank(v, "query")


class ExplainRequest(SearchRequest):
    top_chunks: int = Field(3, ge=1, le=MAX_TOP_CHUNKS, description="chunks per hit whose text is returned")


class PassagesRequest(_Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the question, in plain text")
    budget: int = Field(512, ge=1, le=MAX_PASSAGE_BUDGET, description="token budget of the selection")
    diversity: float = Field(0.3, ge=0, le=1, allow_inf_nan=False,
                             description="0: highest weights first; > 0: near-duplicates of a selected passage are "
                                         "penalized (MMR)")
    docs: int = Field(10, ge=1, le=MAX_K, description="documents whose passages are candidates")

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _not_blank(v, "query")


class PassageOut(BaseModel):
    doc_id: str
    index: int
    start: int
    end: int
    num_tokens: int
    text: str
    weight: float
    similarity: float


class PassagesResponse(BaseModel):
    query: str
    budget: int
    tokens: int
    took_ms: float
    passages: list[PassageOut]


class Turn(_Strict):
    role: Literal["user", "assistant"] = "user"
    text: str = Field(min_length=1, max_length=MAX_TURN_CHARS)


class HistorySearchRequest(_Strict):
    turns: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS, description="the history, oldest first")
    message: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the current message")
    method: Method = "attention"
    k: int = Field(10, ge=1, le=MAX_K)
    temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    top_chunks: int = Field(3, ge=1, le=MAX_TOP_CHUNKS)

    @field_validator("message")
    @classmethod
    def _message(cls, v: str) -> str:
        return _not_blank(v, "message")


class PoolingDiagnostics(BaseModel):
    """Signals of one attention distribution (see :mod:`attnpool.diagnostics.signals`)."""

    n: int = Field(description="number of elements pooled")
    entropy: float | None = Field(description="Shannon entropy of the weights, nats")
    normalized_entropy: float | None = Field(description="entropy / log n: 1 uniform, 0 one-hot; null for n < 2")
    effective_n: float | None = Field(description="1 / sum(w^2): n uniform, 1 one-hot")
    max_weight: float | None


class ChunkOut(BaseModel):
    index: int
    weight: float
    similarity: float
    start: int
    end: int
    text: str
    lexical: float | None = Field(None, description="the chunk's BM25 score (methods that read the query's words)")


class SignalOut(BaseModel):
    score: float
    rank: int = Field(description="1 = best")


class HitOut(BaseModel):
    doc_id: str
    score: float
    title: str


class ExplainedHit(HitOut):
    chunks: list[ChunkOut]
    pooling: PoolingDiagnostics
    signals: dict[str, SignalOut] = Field(default_factory=dict,
                                          description="for a hybrid: the document's score and rank under each signal")


class Summary(BaseModel):
    top_hit: PoolingDiagnostics | None
    mean_normalized_entropy: float | None
    mean_effective_n: float | None


class SearchResponse(BaseModel):
    query: str
    method: str
    temperature: float
    took_ms: float
    hits: list[HitOut]


class ExplainResponse(BaseModel):
    query: str
    method: str
    temperature: float
    took_ms: float
    hits: list[ExplainedHit]
    diagnostics: Summary


class HistorySearchResponse(ExplainResponse):
    turn_weights: list[float] = Field(description="one weight per history turn, oldest first")
    message_weight: float = Field(description="the current message's weight (with turn_weights, sums to 1)")
    turn_pooling: PoolingDiagnostics = Field(description="signals of the turns' and the message's weights")


class Info(BaseModel):
    store: str
    documents: int
    chunks: int
    model_id: str
    dim: int
    temperature: float
    methods: list[str]
    default_method: str = Field(description="the method the page starts with")
    lexical_methods: list[str] = Field(description="methods that read the query's words (not for history search, "
                                                   "which pools vectors)")
    unavailable_methods: dict[str, str]
    limits: dict[str, int]


class ErrorResponse(BaseModel):
    message: str
    detail: Any = None


# -- helpers -------------------------------------------------------------------------------------------------------

def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def pooling_diagnostics(weights: Sequence[float]) -> PoolingDiagnostics:
    w = torch.tensor(list(weights), dtype=torch.float64)
    if w.numel() == 0:
        return PoolingDiagnostics(n=0, entropy=None, normalized_entropy=None, effective_n=None, max_weight=None)
    return PoolingDiagnostics(n=w.numel(), entropy=_finite(float(entropy(w))),
                              normalized_entropy=_finite(float(normalized_entropy(w))),
                              effective_n=_finite(float(effective_count(w))), max_weight=float(w.max()))


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return sum(real) / len(real) if real else None


def _explained(hits: list[Any]) -> tuple[list[ExplainedHit], Summary]:
    out = [ExplainedHit(doc_id=h.doc_id, score=h.score, title=h.title,
                        chunks=[ChunkOut(**vars(c)) for c in h.chunks],
                        pooling=pooling_diagnostics([c.weight for c in h.chunks]),
                        signals={k: SignalOut(score=v["score"], rank=int(v["rank"])) for k, v in h.signals.items()})
           for h in hits]
    summary = Summary(top_hit=out[0].pooling if out else None,
                      mean_normalized_entropy=_mean([h.pooling.normalized_entropy for h in out]),
                      mean_effective_n=_mean([h.pooling.effective_n for h in out]))
    return out, summary


def _error(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "detail": detail}, status_code=status, headers=headers)


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "request body"


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """One readable line per pydantic error: where, what was expected, and (for lengths) what came."""
    lines = []
    for e in errors:
        kind, loc, msg = e.get("type", ""), e.get("loc", ()), e.get("msg", "")
        if kind == "json_invalid":
            pos = loc[1] if len(loc) > 1 else "?"
            lines.append(f"invalid JSON at character {pos}: {e.get('ctx', {}).get('error', msg)}")
            continue
        if kind == "missing" and tuple(loc) == ("body",):
            lines.append("request body: expected a JSON object, got none")
            continue
        if kind in ("model_attributes_type", "dict_type") and tuple(loc) == ("body",):
            got = e.get("input")
            shown = type(got).__name__ if not isinstance(got, (str, bytes)) else f"{len(got)} characters of text"
            lines.append(f"request body: expected a JSON object (Content-Type: application/json), got {shown}")
            continue
        if kind == "extra_forbidden":
            lines.append(f"{_where(loc)}: unknown field")
            continue
        msg = msg.removeprefix("Value error, ")
        if msg.startswith(f"{_where(loc)}:"):
            lines.append(msg)
            continue
        got = e.get("input")
        if kind in ("string_too_long", "too_long") and hasattr(got, "__len__"):
            msg += f", got {len(got)}"
        elif kind in ("literal_error", "greater_than", "greater_than_equal", "less_than_equal", "int_parsing",
                      "int_type", "float_parsing", "finite_number") and not isinstance(got, (dict, list)):
            msg += f", got {got!r}"
        lines.append(f"{_where(loc)}: {msg}")
    return "; ".join(lines) or "invalid request"


class BodyLimit:
    """Reads the whole request body (JSON bodies here are small) and answers 413 once it passes ``limit`` bytes,
    whether or not the client declared a Content-Length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send, int(declared))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(scope, receive, send, size)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = _error(413, f"request body: expected at most {self.limit} bytes, got {size}"
                               f"{' or more' if size <= self.limit * 2 else ''}")
        await response(scope, receive, send)


# -- the app -------------------------------------------------------------------------------------------------------

def create_app(kb: Any, *, warm: bool = True) -> FastAPI:
    """The app over ``kb`` (an :class:`attnpool.kb.KnowledgeBase` whose store exists).

    ``warm`` loads the store's vectors and the encoder now, so that a missing store fails here rather than on the
    first request, and the first request is not slow.
    """
    # one worker thread runs every call into the knowledge base; waiting requests queue in FIFO order on the event
    # loop (a lock in the thread pool would park up to 40 threads that then contend with the loop for the GIL)
    worker = anyio.CapacityLimiter(1)

    async def in_worker(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=worker)

    def timed(fn: Any, /, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, 1000 * (time.perf_counter() - start)
    meta = kb.store().meta  # raises StoreError for a missing or foreign store
    unavailable = {m: f"no trained head at {kb.head_path(m)} (train one with `attnpool kb eval BEIR_DIR --store "
                      f"{kb.path} --save-heads`)"
                   for m in HEAD_METHODS if not (kb.head_path(m) / "config.json").is_file()}
    if warm:
        kb.search("warm up", k=1)
    app = FastAPI(title="attnpool knowledge base", version="1",
                  description="Search a knowledge base whose documents are pooled from their chunks; see which chunks "
                              "each hit's attention pooling weighted, and how concentrated the weights are.",
                  docs_url=None, redoc_url=None,  # both load their scripts from a CDN; the page works offline
                  responses={422: {"model": ErrorResponse, "description": "bad input"}})
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.state.kb = kb

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]
        return _error(422, validation_message(errors), detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            msg = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed or 'none'}"
        elif exc.status_code == 404:
            msg = f"no such path: {request.url.path} (the API is under /api/, its schema at /openapi.json)"
        else:
            msg = str(exc.detail)
        return _error(exc.status_code, msg, headers=exc.headers)

    @app.exception_handler(HistoryUnavailable)
    async def _history_missing(request: Request, exc: HistoryUnavailable) -> JSONResponse:
        return _error(501, str(exc))

    @app.exception_handler(InputError)
    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        return _error(503, f"the knowledge base cannot answer: {exc}")

    def check_method(method: str) -> None:
        if method in unavailable:
            raise InputError(f"method: {method!r} is not available on this store: {unavailable[method]}; available: "
                             f"{', '.join(m for m in METHODS if m not in unavailable)}")

    def temperature(t: float | None) -> float:
        return float(kb.temperature() if t is None else t)

    errors: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorResponse, "description": "body too large"},
        422: {"model": ErrorResponse, "description": "bad input: the message says what and where"},
    }

    @app.get("/api/info", response_model=Info, summary="the store, its methods and the request limits")
    async def info() -> Info:
        docs, chunks = await in_worker(lambda: (kb.num_documents, kb.num_chunks))
        return Info(store=str(kb.path), documents=docs, chunks=chunks, model_id=str(meta["model_id"]),
                    dim=int(meta["dim"]), temperature=kb.temperature(),
                    methods=[m for m in METHODS if m not in unavailable],
                    default_method=DEFAULT_METHOD if DEFAULT_METHOD not in unavailable else "attention",
                    lexical_methods=list(LEXICAL_METHODS),
                    unavailable_methods=unavailable,
                    limits={"query_chars": MAX_QUERY_CHARS, "turn_chars": MAX_TURN_CHARS, "turns": MAX_TURNS,
                            "k": MAX_K, "top_chunks": MAX_TOP_CHUNKS, "body_bytes": MAX_BODY_BYTES})

    @app.post("/api/search", response_model=SearchResponse, responses=errors,
              summary="the k best documents for a query")
    async def search(req: SearchRequest) -> SearchResponse:
        check_method(req.method)
        hits, took = await in_worker(timed, kb.search, req.query, method=req.method, k=req.k,
                                     temperature=req.temperature)
        return SearchResponse(query=req.query, method=req.method, temperature=temperature(req.temperature),
                              took_ms=took,
                              hits=[HitOut(doc_id=h.doc_id, score=h.score, title=h.title) for h in hits])

    @app.post("/api/explain", response_model=ExplainResponse, responses=errors,
              summary="search, with each hit's chunk attention weights and the pooling's entropy and effective N")
    async def explain(req: ExplainRequest) -> ExplainResponse:
        check_method(req.method)
        hits, took = await in_worker(timed, kb.search, req.query, method=req.method, k=req.k, explain=True,
                                     temperature=req.temperature, top_chunks=req.top_chunks)
        out, summary = _explained(hits)
        return ExplainResponse(query=req.query, method=req.method, temperature=temperature(req.temperature),
                               took_ms=took, hits=out, diagnostics=summary)

    @app.post("/api/history/search", response_model=HistorySearchResponse,
              responses={**errors, 501: {"model": ErrorResponse, "description": "conversation pooling missing"}},
              summary="a conversation pooled into the query (turn weights returned), then search explained")
    async def history_search(req: HistorySearchRequest) -> HistorySearchResponse:
        check_method(req.method)
        if req.method in LEXICAL_METHODS:
            raise InputError(f"method: {req.method!r} ranks by the query's words, and a history search's query is a "
                             f"pooled vector; use one of {', '.join(m for m in METHODS if m not in LEXICAL_METHODS)}")
        def run() -> tuple[list[float], list[Any]]:
            query, turn_weights = history_query(kb, [t.model_dump() for t in req.turns], req.message)
            return turn_weights, kb.search(query, method=req.method, k=req.k, explain=True,
                                           temperature=req.temperature, top_chunks=req.top_chunks)

        (turn_weights, hits), took = await in_worker(timed, run)
        out, summary = _explained(hits)
        return HistorySearchResponse(query=req.message, method=req.method, temperature=temperature(req.temperature),
                                     took_ms=took, hits=out, diagnostics=summary,
                                     turn_weights=turn_weights[:-1], message_weight=turn_weights[-1],
                                     turn_pooling=pooling_diagnostics(turn_weights))

    passage_table: list[Any] = []

    @app.post("/api/passages", response_model=PassagesResponse, responses=errors,
              summary="passages of the best documents, weighted by attention with the question as the query, "
                      "selected within a token budget")
    async def passages(req: PassagesRequest) -> PassagesResponse:
        from attnpool.passages import PassageTable, passages_for_question

        def run() -> Any:
            if not passage_table:  # every chunk's text and offsets, read from the store once
                passage_table.append(PassageTable(kb))
            return passages_for_question(kb, req.query, budget=req.budget, diversity=req.diversity,
                                         num_docs=req.docs, table=passage_table[0])

        sel, took = await in_worker(timed, run)
        return PassagesResponse(query=req.query, budget=sel.budget, tokens=sel.tokens, took_ms=took,
                                passages=[PassageOut(**p.to_dict()) for p in sel.passages])

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(store: str, *, host: str = "127.0.0.1", port: int = 8000, model: str | None = None) -> None:
    """``attnpool kb serve``: open the store, build the app and run it with uvicorn until interrupted."""
    import uvicorn

    from attnpool.kb import KnowledgeBase

    kb = KnowledgeBase(store, model)
    app = create_app(kb)
    print(f"attnpool kb serve: {kb.num_documents} documents from {store} on http://{host}:{port}/ "
          f"(API schema at /openapi.json)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
