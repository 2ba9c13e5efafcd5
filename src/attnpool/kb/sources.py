"""Documents to index: plain text, Markdown, HTML and BEIR ``corpus.jsonl`` files, read and checked before anything
touches the store."""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "Document",
    "InputError",
    "content_hash",
    "html_to_text",
    "read_beir_corpus",
    "read_beir_qrels",
    "read_beir_queries",
    "read_documents",
]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}


class InputError(ValueError):
    """Input that cannot be indexed or evaluated; the message names the file, what was expected and what came."""


@dataclass(frozen=True)
class Document:
    """One document: ``doc_id`` is unique in a knowledge base; ``source`` says where it came from."""

    doc_id: str
    text: str
    title: str = ""
    source: str = ""

    @property
    def full_text(self) -> str:
        """What is chunked and embedded: the title, if any, as the first line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def content_hash(doc: Document, settings: str = "") -> str:
    """A hash of what determines a document's chunks and vectors: its title, its text and the index settings."""
    digest = hashlib.sha256()
    for part in (settings, doc.title, doc.text):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


class _HtmlText(html.parser.HTMLParser):
    _SKIP: ClassVar[set[str]] = {"script", "style", "head", "noscript", "template", "svg"}
    _BLOCK: ClassVar[set[str]] = {
        "p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
        "article", "pre", "blockquote", "hr", "dt", "dd", "header", "footer", "nav", "main", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP and self._skip:
            self._skip -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> tuple[str, str]:
    """The visible text of an HTML page and its ``<title>``: scripts, styles and the head dropped, blocks on their own
    lines, runs of blank lines collapsed."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(line for line in lines if line)
    return text, " ".join("".join(parser.title).split())


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected UTF-8 text, got undecodable bytes at offset {e.start} "
                         f"({data[e.start:e.start + 4]!r})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; anything but an object is an error."""
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: expected one JSON object per line, got invalid JSON "
                             f"({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_beir_corpus(path: str | os.PathLike[str]) -> list[Document]:
    """The documents of a BEIR ``corpus.jsonl``: one JSON object per line with ``_id``, ``text`` and optionally
    ``title``. Every line is checked before any is returned."""
    path = Path(path)
    docs: list[Document] = []
    seen: set[str] = set()
    for lineno, row in _json_lines(path):
        doc_id, text, title = row.get("_id"), row.get("text"), row.get("title", "")
        if not isinstance(doc_id, (str, int)) or str(doc_id) == "":
            raise InputError(f"{path}:{lineno}: expected a non-empty string '_id', got {doc_id!r}")
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: expected a string 'text', got {type(text).__name__}")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise InputError(f"{path}:{lineno}: expected a string 'title', got {type(title).__name__}")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise InputError(f"{path}:{lineno}: duplicate _id {doc_id!r}")
        seen.add(doc_id)
        docs.append(Document(doc_id, text, title, f"{path}:{lineno}"))
    return docs


def read_beir_queries(path: str | os.PathLike[str]) -> dict[str, str]:
    """``queries.jsonl`` of a BEIR directory: query id -> text."""
    path = Path(path)
    queries: dict[str, str] = {}
    for lineno, row in _json_lines(path):
        if not isinstance(row.get("text"), str) or "_id" not in row:
            raise InputError(f"{path}:{lineno}: expected an object with '_id' and a string 'text', got "
                             f"{json.dumps(row)[:80]}")
        queries[str(row["_id"])] = row["text"]
    return queries


def read_beir_qrels(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """A BEIR qrels TSV (``query-id  corpus-id  score``, with a header line): query id -> {doc id: relevance}."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        fields = line.split("\t")
        if not line.strip() or (lineno == 1 and fields[0] == "query-id"):
            continue
        if len(fields) != 3:
            raise InputError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got "
                             f"{len(fields)}")
        try:
            score = int(float(fields[2]))
        except ValueError:
            raise InputError(f"{path}:{lineno}: expected a numeric score, got {fields[2]!r}") from None
        qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def _files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            if (p / "corpus.jsonl").is_file():
                yield p / "corpus.jsonl"
                continue
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in
                           TEXT_SUFFIXES | HTML_SUFFIXES | {".jsonl"})
            yield from found
        elif p.exists():
            yield p
        else:
            raise InputError(f"{p}: no such file or directory")


def read_documents(paths: Sequence[str | os.PathLike[str]]) -> list[Document]:
    """Read every document under ``paths``: text and Markdown files (``.txt``, ``.md``, ...), HTML pages and BEIR
    ``corpus.jsonl`` files (a directory holding ``corpus.jsonl`` is read as a BEIR corpus; any other directory is
    searched for those files). A text file's id is its path as given; BEIR ids are kept.

    Everything is read and checked first: a missing file, undecodable bytes, malformed JSON, a duplicate id or an
    empty result raises :class:`InputError`, and nothing is returned.
    """
    if not paths:
        raise InputError("paths: expected at least one file or directory, got none")
    docs: list[Document] = []
    for f in _files(paths):
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(read_beir_corpus(f))
        elif suffix in HTML_SUFFIXES:
            text, title = html_to_text(_read_text(f))
            docs.append(Document(str(f), text, title, str(f)))
        elif suffix in TEXT_SUFFIXES or suffix == "":
            docs.append(Document(str(f), _read_text(f), "", str(f)))
        else:
            raise InputError(f"{f}: expected text (.txt, .md, .rst), HTML (.html) or a BEIR corpus (.jsonl), got a "
                             f"{suffix} file")
    ids: set[str] = set()
    for d in docs:
        if d.doc_id in ids:
            raise InputError(f"{d.source}: duplicate document id {d.doc_id!r}")
        ids.add(d.doc_id)
    nonempty = [d for d in docs if d.full_text.strip()]
    if not nonempty:
        raise InputError(f"paths: expected at least one document with text, got {len(docs)} document(s), all empty")
    return nonempty
