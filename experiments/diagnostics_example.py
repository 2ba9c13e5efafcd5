"""The diagnostics report shown in the README: gated attention MIL on musk1, captured on its test bags.

    .venv/bin/python experiments/diagnostics_example.py [--out docs/images/diagnostics-example]

Trains the demo's ABMIL model (instance MLP -> GatedAttentionPool -> linear) on a seeded stratified split of musk1,
captures the pooling's weights on the test bags (instances labelled by their index in the bag), and writes the
report (JSON, Markdown, HTML and PNG figures) with :mod:`attnpool.diagnostics`.
"""

from __future__ import annotations

import argparse

import torch

from attnpool.demo import gather_bags, load_mil_bags, stratified_split, train_mil
from attnpool.diagnostics import analyze, capture
from attnpool.nn import GatedAttentionPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/diagnostics-example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_mil_bags("musk1")
    train, test = stratified_split(data.labels, 0.25, args.seed)
    run = train_mil(data, train, test, GatedAttentionPool(64, 64), seed=args.seed, epochs=args.epochs)
    print(f"musk1 gated attention MIL: test accuracy {run.accuracy:.3f} on {run.test_total} bags")
    x, lengths = gather_bags(data, test)
    labels = [[f"i{k}" for k in range(int(n))] for n in lengths]
    with torch.no_grad(), capture(run.model, labels=labels, set_ids=[int(b) for b in test]) as rec:
        run.model((x - run.mean) / run.std, lengths)
    report = analyze(rec)
    paths = report.save(args.out)
    for alert in report.alerts:
        print(alert)
    print("wrote", ", ".join(sorted(str(p) for p in paths.values())))


if __name__ == "__main__":
    main()
