"""Indexing on a Ray cluster: Ray Data reads, chunks and embeds the documents; one writer stores them.

:func:`index_with_ray` builds the same store as :meth:`attnpool.kb.KnowledgeBase.index` (same ``kb.json``, same
``chunks`` and ``documents`` tables, same content hashes, chunk offsets and vectors), so a store built here is searched,
updated and evaluated like any other, by either path. The work is split so that the expensive part runs anywhere and
the part that must be ordered runs in one place:

1. **read** (Ray tasks): files are parsed where they are read (text, Markdown, HTML, BEIR ``corpus.jsonl``) and each
   document gets its content hash. The dataset is materialized, and the driver checks every id (read errors,
   duplicates, an empty corpus) before the store is touched, and counts what is new, changed and unchanged against
   the store's current hashes. (Documents passed in memory are hashed on the driver, and only those that need work
   become a Ray dataset.)
2. **chunk and embed** (Ray actors, ``map_batches`` with a class): each actor loads the encoder once, skips documents
   whose stored hash is current, chunks the rest with :func:`attnpool.text.chunk_text` and embeds the chunks.
3. **write** (the driver, the only writer): batches of embedded documents stream back in any order and each batch goes
   through :meth:`attnpool.kb.store.LanceStore.write`: chunks appended, then the ``documents`` rows merged (the commit
   record), then the documents' other versions deleted. A run killed at any point leaves every document at its old or
   its new version, and the next run (either path) removes the orphans and finishes the job.

Workers need the files at the same paths as the driver (a shared file system) and ``attnpool`` installed. Needs the
``kb-ray`` extra (``ray[data]``) besides the ``kb`` extra.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnpool.kb.knowledge_base import IndexReport
from attnpool.kb.sources import Document, InputError, content_hash
from attnpool.kb.store import ChunkRows, LanceStore

__all__ = ["index_with_ray"]

def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("index_with_ray needs Ray Data: pip install 'attnpool[kb,kb-ray]' "
                          f"(ray[data]==2.60.0); the import failed with: {e}") from None
    return ray


def _default_encoder(model: str | os.PathLike[str] | None) -> Any:
    from attnpool.text.encoder import Encoder

    return Encoder(model)


# -- stage 1: reading --------------------------------------------------------------------------------------------------


def _read_file(row: dict[str, Any], settings: str) -> list[dict[str, Any]]:
    """One file's documents with their content hashes; a file that cannot be read gives one row naming the error."""
    from attnpool.kb import sources

    path = Path(row["path"])
    try:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs = sources.read_beir_corpus(path)
        elif suffix in sources.HTML_SUFFIXES:
            text, title = sources.html_to_text(sources._read_text(path))
            docs = [Document(str(path), text, title, str(path))]
        elif suffix in sources.TEXT_SUFFIXES or suffix == "":
            docs = [Document(str(path), sources._read_text(path), "", str(path))]
        else:
            raise InputError(f"{path}: expected text (.txt, .md, .rst), HTML (.html) or a BEIR corpus (.jsonl), got "
                             f"a {suffix} file")
    except InputError as e:
        return [{"doc_id": "", "text": "", "title": "", "source": str(path), "doc_hash": "", "error": str(e)}]
    # as read_documents: a file or corpus line with no text is not indexed
    return [{"doc_id": d.doc_id, "text": d.text, "title": d.title, "source": d.source,
             "doc_hash": content_hash(d, settings), "error": ""} for d in docs if d.full_text.strip()]


def _read_documents(ray: Any, docs_or_paths: Sequence[Document | str | os.PathLike[str]], settings: str,
                    ) -> tuple[Any, list[str], list[str]]:
    """The documents as a materialized Ray dataset (``doc_id``, ``text``, ``title``, ``source``, ``doc_hash``), and
    every document's id and hash, after checking the whole input: read errors, duplicate ids, nothing to index.

    Documents given in memory are hashed on the driver (a sha256 each) and the dataset is ``None``: the caller hands
    Ray Data only those that need work.
    """
    if all(isinstance(d, Document) for d in docs_or_paths):
        docs: list[Document] = list(docs_or_paths)  # type: ignore[arg-type]
        ids = [d.doc_id for d in docs]
        _check_ids(ids, [d.source for d in docs], [])
        return None, ids, [content_hash(d, settings) for d in docs]
    if any(isinstance(d, Document) for d in docs_or_paths):
        raise InputError("docs_or_paths: expected Documents or paths, got a mix of both")
    from attnpool.kb.sources import _files

    files = list(_files(docs_or_paths))  # type: ignore[arg-type]
    if not files:
        raise InputError(f"paths: expected files to index, got no files under {list(map(str, docs_or_paths))}")
    dataset = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files)).flat_map(
        _read_file, fn_kwargs={"settings": settings}).materialize()
    ids, hashes, sources, errors = [], [], [], []
    # only the small columns travel to the driver
    for batch in dataset.select_columns(["doc_id", "doc_hash", "source", "error"]).iter_batches(
            batch_size=4096, batch_format="pyarrow"):
        cols = batch.to_pydict()
        for doc_id, h, source, error in zip(cols["doc_id"], cols["doc_hash"], cols["source"], cols["error"]):
            if error:
                errors.append(error)
            else:
                ids.append(doc_id)
                hashes.append(h)
                sources.append(source)
    _check_ids(ids, sources, errors)
    return dataset, ids, hashes


def _check_ids(ids: list[str], sources: list[str], errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)
    seen: set[str] = set()
    for doc_id, source in zip(ids, sources):
        if doc_id in seen:
            raise InputError(f"{source or 'docs_or_paths'}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
    if not ids:
        raise InputError("docs_or_paths: expected at least one document with text, got none (every file empty)")


# -- stage 2: chunking and embedding -----------------------------------------------------------------------------------


class _ChunkAndEmbed:
    """A Ray Data actor: the encoder is built once per actor; each call chunks and embeds a batch of documents."""

    def __init__(self, encoder_factory: Callable[[], Any], max_tokens: int, overlap: int,
                 existing: dict[str, str], threads: int) -> None:
        import pyarrow as pa
        import torch

        from attnpool.text.chunking import chunk_text

        torch.set_num_threads(max(1, threads))
        self.pa = pa
        self.chunk_text = chunk_text
        self.encoder = encoder_factory()
        self.max_tokens, self.overlap = max_tokens, overlap
        self.existing = existing
        self.schema = pa.schema([
            ("doc_id", pa.string()), ("doc_hash", pa.string()), ("title", pa.string()), ("source", pa.string()),
            ("texts", pa.list_(pa.string())), ("starts", pa.list_(pa.int64())), ("ends", pa.list_(pa.int64())),
            ("num_tokens", pa.list_(pa.int32())), ("vectors", pa.list_(pa.float32())),
            ("encode_seconds", pa.float64()),
        ])

    def __call__(self, batch: Any) -> Any:
        rows = [r for r in batch.select(["doc_id", "doc_hash", "title", "text", "source"]).to_pylist()
                if self.existing.get(r["doc_id"]) != r["doc_hash"]]
        chunked = [self.chunk_text(Document(r["doc_id"], r["text"], r["title"]).full_text, self.encoder.tokenizer,
                                   max_tokens=self.max_tokens, overlap=self.overlap) for r in rows]
        texts = [c.text for cs in chunked for c in cs]
        t0 = time.perf_counter()
        vectors = np.asarray(self.encoder.encode(texts), dtype=np.float32) if texts else np.zeros((0, 0), np.float32)
        seconds = (time.perf_counter() - t0) / max(1, len(rows))
        out: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        at = 0
        for r, cs in zip(rows, chunked):
            for key in ("doc_id", "doc_hash", "title", "source"):
                out[key].append(r[key])
            out["texts"].append([c.text for c in cs])
            out["starts"].append([c.start for c in cs])
            out["ends"].append([c.end for c in cs])
            out["num_tokens"].append([c.num_tokens for c in cs])
            out["vectors"].append(vectors[at:at + len(cs)].reshape(-1))
            out["encode_seconds"].append(seconds)
            at += len(cs)
        return self.pa.table(out, schema=self.schema)


# -- the pipeline ------------------------------------------------------------------------------------------------------


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless the caller already did; True when this call started it."""
    if ray.is_initialized():
        return False
    joins = address not in (None, "local") or (address is None and os.environ.get("RAY_ADDRESS"))
    if joins and num_cpus is not None:
        raise ValueError(f"num_cpus: sets the CPUs of a local Ray instance; joining the cluster at "
                         f"{address or os.environ.get('RAY_ADDRESS')} uses its own CPUs (limit the actors with "
                         f"concurrency), got num_cpus={num_cpus}")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    return True


def index_with_ray(docs_or_paths: Sequence[Document | str | os.PathLike[str]], store_path: str | os.PathLike[str], *,
                   model: str | os.PathLike[str] | None = None, max_tokens: int = 256, overlap: int = 32,
                   batch_size: int = 64, num_cpus: int | None = None, concurrency: int | None = None,
                   encoder_factory: Callable[[], Any] | None = None, address: str | None = None,
                   delete_missing: bool = False, progress: bool = True) -> IndexReport:
    """Index documents into the store at ``store_path`` with Ray Data: the same store, hashes and vectors as
    :meth:`attnpool.kb.KnowledgeBase.index` with the same encoder and chunking.

    Args:
        docs_or_paths: :class:`attnpool.kb.Document` objects, or files and directories as for
            :func:`attnpool.kb.read_documents` (text, Markdown, HTML, BEIR ``corpus.jsonl``), read by Ray tasks.
        store_path: the knowledge base's directory (created if needed).
        model: a local sentence-transformers directory; ``None`` is all-MiniLM-L6-v2 (ignored with ``encoder_factory``).
        max_tokens, overlap: chunking, as for :class:`attnpool.kb.KnowledgeBase`.
        batch_size: documents per embedding call and per store write.
        num_cpus: CPUs of the local Ray instance this call starts (when Ray is not running yet and ``address`` is
            ``None`` or ``"local"``).
        concurrency: embedding actors (one CPU each); default: every CPU of the cluster.
        encoder_factory: a picklable zero-argument callable returning an encoder (``tokenizer``, ``encode``, ``dim``,
            ``model_id``, ``path``), called once on the driver (for the store's settings) and once per actor.
        address: ``"auto"`` (the running cluster), ``"ray://host:10001"``, or ``"local"`` (a new instance on this
            machine for this call); ``None``: ``$RAY_ADDRESS`` if set, else local. Ignored when Ray is already
            initialized in this process; a Ray instance this call starts is shut down at its end.
        delete_missing: delete stored documents that are not among the input.
        progress: progress bars (Ray Data's and the writer's).

    Returns:
        An :class:`attnpool.kb.IndexReport`; ``encode_seconds`` is the actors' encoder time divided by their number
        (so that ``outside_encoder_fraction`` says how much of the wall time an actor spent not encoding).
    """
    if not docs_or_paths:
        raise InputError("docs_or_paths: expected at least one document, file or directory, got none")
    docs_or_paths = [docs_or_paths] if isinstance(docs_or_paths, (str, os.PathLike, Document)) else list(docs_or_paths)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency: expected an integer >= 1, got {concurrency}")
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus: expected an integer >= 1, got {num_cpus}")
    ray = _import_ray()
    start = time.perf_counter()
    report = IndexReport()
    factory = encoder_factory if encoder_factory is not None else functools.partial(_default_encoder, model)
    encoder = factory()
    meta = {"model_id": encoder.model_id, "model_path": str(encoder.path), "dim": int(encoder.dim),
            "max_tokens": max_tokens, "overlap": overlap}
    # the chunking settings are checked here, before any work is distributed (a bad max_tokens raises ValueError)
    from attnpool.text.chunking import chunk_text

    chunk_text("check", encoder.tokenizer, max_tokens=max_tokens, overlap=overlap)
    settings = f"{meta['model_id']}|{max_tokens}|{overlap}"
    del encoder

    import logging

    started = _start_ray(ray, address, num_cpus)
    ctx = ray.data.DataContext.get_current()
    data_logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, data_logger.level
    ctx.enable_progress_bars = progress
    if not progress:
        data_logger.setLevel(logging.WARNING)
    try:
        docs, ids, hashes = _read_documents(ray, docs_or_paths, settings)
        store = LanceStore(store_path, meta)  # raises StoreError for another model's store, before any write
        report.orphans_removed = store.remove_orphans()
        existing = store.document_hashes()
        for doc_id, h in zip(ids, hashes):
            if existing.get(doc_id) == h:
                report.unchanged += 1
            elif doc_id in existing:
                report.updated += 1
            else:
                report.added += 1
        todo = report.added + report.updated
        if todo:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = concurrency or max(1, min(cpus, -(-todo // batch_size)))
            if docs is None:
                items = [{"doc_id": d.doc_id, "text": d.text, "title": d.title, "source": d.source, "doc_hash": h}
                         for d, h in zip(docs_or_paths, hashes)  # type: ignore[union-attr]
                         if existing.get(d.doc_id) != h]  # type: ignore[union-attr]
                docs = ray.data.from_items(items, override_num_blocks=min(-(-todo // batch_size), 1000))
            elif docs.num_blocks() < min(actors, -(-len(ids) // batch_size)):
                # one BEIR corpus.jsonl is read as one block: split it so that every actor gets work
                docs = docs.repartition(-(-len(ids) // batch_size))
            embedded = docs.map_batches(
                _ChunkAndEmbed, batch_size=batch_size, batch_format="pyarrow", num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={"encoder_factory": factory, "max_tokens": max_tokens, "overlap": overlap,
                                       "existing": existing, "threads": 1})
            _write(embedded, store, meta["dim"], batch_size, todo, report, progress)
            # the actors encode side by side: their mean encoder time is what compares with the run's wall time
            report.encode_seconds /= actors
        if delete_missing:
            report.deleted = store.delete(set(existing) - set(ids))
        if todo or report.deleted or report.orphans_removed:
            store.optimize()
    finally:
        ctx.enable_progress_bars, level = saved
        data_logger.setLevel(level)
        if started:
            ray.shutdown()
    report.seconds = time.perf_counter() - start
    return report


def _write(embedded: Any, store: LanceStore, dim: int, batch_size: int, todo: int, report: IndexReport,
           progress: bool) -> None:
    """The single writer: each batch of embedded documents is one crash-safe :meth:`LanceStore.write`."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc="indexing (ray)", unit="doc")
    try:
        for batch in embedded.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            cols = batch.drop_columns(["vectors"]).to_pydict()
            # the vectors stay in numpy: float32 as the actors computed them, never through Python floats
            flat = batch.column("vectors").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors = flat.astype(np.float32, copy=False).reshape(-1, dim)
            rows, at = [], 0
            for i, doc_id in enumerate(cols["doc_id"]):
                texts = cols["texts"][i]
                rows.append(ChunkRows(doc_id, cols["doc_hash"][i], cols["title"][i], cols["source"][i], texts,
                                      cols["starts"][i], cols["ends"][i], cols["num_tokens"][i],
                                      vectors[at:at + len(texts)]))
                at += len(texts)
                report.chunks += len(texts)
                report.encode_seconds += cols["encode_seconds"][i]
            store.write(rows)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
