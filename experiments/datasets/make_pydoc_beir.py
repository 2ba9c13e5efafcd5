"""A second long-document retrieval set, in BEIR format, from the Python standard library's own documentation.

    python experiments/datasets/make_pydoc_beir.py --out /tmp/pydoc-beir [--seed 0] [--max-docs 600]

Documents: ``pydoc``'s plain-text page of public classes and functions of standard-library modules (classes bring their
methods, so many pages are several chunks long). Query: the first line of the object's docstring ("Return a new
deque object ..."), removed from its page, so that the page no longer repeats its own summary: the same construction
as gcloud-man. Near neighbours abound (the methods of sibling classes, functions of one module), so negatives are hard.

Seeded: the module list is fixed below, objects are sorted by qualified name, and ``--seed`` picks the sample. Pages
are cut at ``--max-chars`` characters (default 6000) to bound embedding time on a CPU. The content depends on the
Python version that runs the script (its standard library); the output's README records it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pydoc
import random
import re
import sys
import warnings
from pathlib import Path

MODULES = [
    "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "logging.handlers",
    "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "operator", "os", "os.path", "pathlib", "pickle",
    "platform", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
]


def objects() -> list[tuple[str, object]]:
    found: dict[str, object] = {}
    for name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            home = (getattr(obj, "__module__", None) or "").lstrip("_").split(".")[0]
            if home not in (name.split(".")[0], module.__name__.lstrip("_").split(".")[0]):
                continue  # re-exports: keep each object once, under its own module
            doc = inspect.getdoc(obj) or ""
            summary = doc.strip().split("\n")[0].strip()
            if len(summary.split()) < 4 or summary.endswith(":") or re.match(r"^[\w.]+\(", summary):
                continue
            found.setdefault(f"{name}.{attr}", obj)
    return sorted(found.items())


def page(qualname: str, obj: object, summary: str, max_chars: int) -> str:
    text = pydoc.render_doc(obj, title="%s", renderer=pydoc.plaintext)
    text = text.replace(summary, "", 1)  # the query must not be found verbatim in its own page
    return text[:max_chars]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=600)
    ap.add_argument("--max-chars", type=int, default=6000)
    args = ap.parse_args(argv)
    items = objects()
    random.Random(args.seed).shuffle(items)
    out = Path(args.out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels, seen_summaries = [], [], ["query-id\tcorpus-id\tscore"], set()
    for qualname, obj in items:
        summary = (inspect.getdoc(obj) or "").strip().split("\n")[0].strip()
        if summary in seen_summaries:
            continue  # two objects with one summary would make an ambiguous query
        text = page(qualname, obj, summary, args.max_chars)
        if len(text.split()) < 20:
            continue
        seen_summaries.add(summary)
        i = len(corpus)
        corpus.append({"_id": f"d{i}", "title": "", "text": text, "object": qualname})
        queries.append({"_id": f"q{i}", "text": summary})
        qrels.append(f"q{i}\td{i}\t1")
        if len(corpus) >= args.max_docs:
            break
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    (out / "README.md").write_text(
        f"pydoc-stdlib: {len(corpus)} documents, made by experiments/datasets/make_pydoc_beir.py --seed {args.seed} "
        f"--max-docs {args.max_docs} --max-chars {args.max_chars} with Python {sys.version.split()[0]}.\n")
    print(f"{out}: {len(corpus)} documents, {len(queries)} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
