"""The ``attnpool`` command. Subcommands are thin: each parses its flags and calls a library function.

    attnpool demo [--part text|mil|all] [--seed N] [--epochs N] [--splits N] [--temperature T] [--threads N]
    attnpool report CAPTURE [--out DIR] [--no-html] [--no-png]
    attnpool kb {index,search,delete,eval} ...
    attnpool repro {mil,set-transformer,kernel-regression} [--quick] ...

A new subcommand is a function ``_add_NAME(subparsers)`` that registers its parser with ``func=`` set, listed in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from attnpool import __version__, demo

__all__ = ["build_parser", "main"]

Subparsers = argparse._SubParsersAction


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    demo.run(args.part, seed=args.seed, epochs=args.epochs, splits=args.splits, temperature=args.temperature,
             threads=args.threads or None)
    return 0


def _add_demo(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo", help="pool real data (a document, MIL bags) and print what the pooling attended to",
        description="Attention pooling on real data. text: a document embedded with all-MiniLM-L6-v2 and pooled once "
                    "per question. mil: musk1 bags classified with gated attention pooling vs mean pooling.")
    p.add_argument("--part", choices=("text", "mil", "all"), default="all", help="which part to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=demo.MIL_EPOCHS,
                   help="mil: training epochs (default: %(default)s)")
    p.add_argument("--splits", type=_positive_int, default=demo.MIL_SPLITS,
                   help="mil: number of seeded train/test splits (default: %(default)s)")
    p.add_argument("--temperature", type=_positive_float, default=demo.TEXT_TEMPERATURE,
                   help="text: softmax temperature on the question-sentence cosines (default: %(default)s)")
    p.add_argument("--threads", type=int, default=demo.DEMO_THREADS,
                   help="torch intra-op threads; 0 keeps torch's default (default: %(default)s, fastest for the "
                        "demo's tiny tensors)")
    p.set_defaults(func=_run_demo)


def _add_report(sub: Subparsers) -> None:
    from attnpool.diagnostics import report

    p = sub.add_parser("report", help="diagnose the attention weights of a saved capture (JSON, Markdown, HTML)",
                       description="Signals and alerts for a capture written by attnpool.diagnostics "
                                   "Recording.save. Exit code 1 on a critical alert (leakage, unnormalized weights).")
    report.add_arguments(p)
    p.set_defaults(func=report.run)


def _run_repro(args: argparse.Namespace) -> int:
    from attnpool import repro

    return int(repro.load(args.reproduction).main(args.args))


def _add_repro(sub: Subparsers) -> None:
    from attnpool.repro import REPRODUCTIONS

    listing = "; ".join(f"{name}: {summary}" for name, (_, summary) in REPRODUCTIONS.items())
    p = sub.add_parser("repro", help="reproduce a published table (results: experiments/README.md)",
                       description=f"Reproduce a paper's results with attnpool's layers ({listing}). Each has "
                                   "--quick, a seconds-long end-to-end check; `attnpool repro NAME --help` lists "
                                   "its options.")
    p.add_argument("reproduction", choices=sorted(REPRODUCTIONS), metavar="NAME",
                   help=f"one of {', '.join(sorted(REPRODUCTIONS))}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the reproduction's own options")
    p.set_defaults(func=_run_repro)


def _add_kb(sub: Subparsers) -> None:
    from attnpool.kb.cli import add_parser

    add_parser(sub)


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [_add_demo, _add_report, _add_repro, _add_kb]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnpool", description="Attention pooling for sets.")
    parser.add_argument("--version", action="version", version=f"attnpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from attnpool.kb.sources import InputError
    from attnpool.kb.store import StoreError

    try:
        return int(args.func(args))
    except (InputError, StoreError) as e:
        # bad input or an incompatible store: one clear line, no traceback, and nothing was written
        print(f"attnpool {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
