"""``attnpool repro kernel-regression``: Nadaraya-Watson kernel regression as attention pooling.

A teaching example. Nadaraya (1964) and Watson (1964) estimate a regression function by a weighted average of the
training targets,

.. math::
    \\hat f(x) = \\sum_i \\frac{K(x - x_i)}{\\sum_j K(x - x_j)} \\, y_i, \\qquad
    K(u) = \\exp\\Big(-\\frac{u^2}{2\\sigma^2}\\Big),

which is attention pooling: the query is ``x``, the keys are the training inputs ``x_i``, the values the targets
``y_i``, and the weights are a softmax over the scores ``-(x - x_i)^2 / 2`` at temperature ``sigma^2``. Here it is
computed by :func:`attnpool.functional.attention_pool` with that score as a callable and the bandwidth as its
temperature, first fixed (``sigma = 1``, non-parametric attention pooling) and then learned by gradient descent on
the leave-one-out squared error (each training point is predicted from the others, a mask removing it from its own
set; without that, the loss would be minimized by ``sigma -> 0``, which memorizes the training targets).

Data (as in *Dive into Deep Learning*, Sec. 11.2): ``y = 2 sin(x) + x^0.8 + eps``, ``eps ~ N(0, 0.5^2)``, 50
training inputs drawn uniformly on ``[0, 5]``, test inputs on a grid. The output is a plot of both fits and of
their attention matrices (test queries x training keys), a Markdown summary and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from attnpool.functional import attention_pool

__all__ = ["NadarayaWatson", "gaussian_score", "main", "make_data", "nadaraya_watson_reference", "train_width"]


def truth(x: Tensor) -> Tensor:
    return 2 * torch.sin(x) + x**0.8


def make_data(n_train: int = 50, seed: int = 0, noise: float = 0.5, dtype: torch.dtype = torch.float64,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test_truth)``: sorted uniform inputs on [0, 5], noisy targets; a 0.1 grid."""
    g = torch.Generator().manual_seed(seed)
    x_train = (torch.rand(n_train, generator=g, dtype=dtype) * 5).sort().values
    y_train = truth(x_train) + noise * torch.randn(n_train, generator=g, dtype=dtype)
    x_test = torch.arange(0, 5, 0.1, dtype=dtype)
    return x_train, y_train, x_test, truth(x_test)


def gaussian_score(query: Tensor, keys: Tensor) -> Tensor:
    """``-(q - k)^2 / 2`` under attnpool's score convention (query ``[G|1, H, Q, 1]``, keys ``[G, H, L, 1]`` ->
    ``[G, H, Q, L]``); divided by the temperature ``sigma^2`` it is the log of a Gaussian kernel of width sigma."""
    return -0.5 * (query - keys.transpose(-1, -2)) ** 2


def nadaraya_watson_reference(x_query: Tensor, x_train: Tensor, y_train: Tensor, sigma: float) -> Tensor:
    """The closed form, written out: Gaussian kernel values normalized by their sum (no softmax involved)."""
    k = torch.exp(-((x_query[:, None] - x_train[None, :]) ** 2) / (2 * sigma**2))
    return (k * y_train[None, :]).sum(1) / k.sum(1)


class NadarayaWatson(nn.Module):
    """Nadaraya-Watson regression with a Gaussian kernel of width ``sigma`` (learned as ``log sigma`` when
    ``learn_width``), evaluated as attention pooling of the training targets."""

    def __init__(self, sigma: float = 1.0, learn_width: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        log_sigma = torch.tensor(math.log(sigma), dtype=dtype)
        if learn_width:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def forward(self, x_query: Tensor, x_train: Tensor, y_train: Tensor, *, leave_one_out: bool = False,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Predictions ``[Q]`` at ``x_query`` (and the weights ``[Q, n]``).

        One set per query (``[Q, n, 1]`` padded): the same ``n`` training points, each set with its own query.
        With ``leave_one_out`` (``x_query`` must be ``x_train``), query ``i`` cannot see training point ``i``.
        """
        q, n = x_query.shape[0], x_train.shape[0]
        keys = x_train.view(1, n, 1).expand(q, n, 1)
        values = y_train.view(1, n, 1).expand(q, n, 1)
        mask = None
        if leave_one_out:
            if q != n:
                raise ValueError(f"x_query: leave_one_out needs the training inputs as queries, got {q} queries "
                                 f"for {n} training points")
            mask = ~torch.eye(n, dtype=torch.bool)
        out, weights = attention_pool(values, x_query.view(q, 1, 1), keys, mask=mask, score=gaussian_score,
                                      scale=1.0, temperature=self.sigma**2, return_weights=True)
        pred, w = out[:, 0, 0], weights[:, 0, 0, :]  # [Q], [Q, n]
        return (pred, w) if return_weights else pred


def train_width(model: NadarayaWatson, x_train: Tensor, y_train: Tensor, steps: int = 200, lr: float = 0.05,
                ) -> list[float]:
    """Fit ``log sigma`` by Adam on the leave-one-out mean squared error; returns the loss before each step and
    after the last."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = ((model(x_train, x_train, y_train, leave_one_out=True) - y_train) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(((model(x_train, x_train, y_train, leave_one_out=True) - y_train) ** 2).mean().item())
    return losses


@dataclass
class Fit:
    name: str
    sigma: float
    loo_train_mse: float  # leave-one-out mean squared error on the (noisy) training targets
    test_mse: float  # against the noise-free function on the test grid


def plot(path: Path, data: tuple[Tensor, Tensor, Tensor, Tensor], fits: list[tuple[Fit, Tensor, Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_train, y_train, x_test, y_truth = (t.numpy() for t in data)
    fig, axes = plt.subplots(1, 1 + len(fits), figsize=(4.2 * (1 + len(fits)), 3.8))
    ax = axes[0]
    ax.plot(x_test, y_truth, "k-", lw=1, label="truth 2 sin x + x^0.8")
    ax.plot(x_train, y_train, "o", ms=3, color="0.5", label="training points")
    for fit, pred, _ in fits:
        ax.plot(x_test, pred.numpy(), lw=1.5, label=f"{fit.name} (sigma {fit.sigma:.2f}, test MSE {fit.test_mse:.3f})")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Nadaraya-Watson = attention pooling", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower left")
    for ax, (fit, _, w) in zip(axes[1:], fits, strict=True):
        im = ax.imshow(w.numpy(), aspect="auto", cmap="Reds", extent=(0.5, w.shape[1] + 0.5, float(x_test[-1]),
                                                                  float(x_test[0])))
        ax.set_xlabel("training point i, sorted by x_i (keys)")
        ax.set_ylabel("test input x (queries)")
        ax.set_title(f"attention weights, {fit.name}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnpool repro kernel-regression",
        description="Nadaraya-Watson kernel regression as attention pooling: a fixed Gaussian kernel and a learned "
                    "width, on y = 2 sin(x) + x^0.8 + noise with 50 training points on [0, 5].")
    p.add_argument("--n-train", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=1.0, help="the fixed kernel width (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps fitting the width (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="20 Adam steps")
    p.add_argument("--out", type=Path, default=Path("experiments/results/kernel_regression"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20)
    start = time.perf_counter()
    data = make_data(args.n_train, args.seed)
    x_train, y_train, x_test, y_truth = data
    fits = []
    curves: dict[str, list[float]] = {}
    for name, learn in (("fixed width", False), ("learned width", True)):
        model = NadarayaWatson(args.sigma, learn_width=learn)
        if learn:
            curves[name] = train_width(model, x_train, y_train, args.steps, args.lr)
        with torch.no_grad():
            pred, w = model(x_test, x_train, y_train, return_weights=True)
            loo = ((model(x_train, x_train, y_train, leave_one_out=True) - y_train) ** 2).mean().item()
        fit = Fit(name, model.sigma.item(), loo, ((pred - y_truth) ** 2).mean().item())
        fits.append((fit, pred, w))
    wall = time.perf_counter() - start

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "kernel_regression.png", data, fits)
    command = "attnpool repro kernel-regression " + " ".join(argv if argv is not None else [])
    rows = [f"| {f.name} | {f.sigma:.3f} | {f.loo_train_mse:.4f} | {f.test_mse:.4f} |" for f, _, _ in fits]
    md = [f"# Nadaraya-Watson kernel regression as attention pooling, `{command.strip()}`", "",
          f"{args.n_train} training points (seed {args.seed}), y = 2 sin(x) + x^0.8 + N(0, 0.5^2); width learned "
          f"by Adam (lr {args.lr:g}, {args.steps} steps) on the leave-one-out MSE. Machine: {platform.machine()}, "
          f"torch {torch.__version__}, float64. Wall time {wall:.1f} s.", "",
          "| kernel | sigma | leave-one-out training MSE | test MSE vs the noise-free function |",
          "|---|---|---|---|", *rows, ""]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    (out / "results.json").write_text(json.dumps({
        "command": command.strip(), "wall_seconds": wall, "args": {k: str(v) for k, v in vars(args).items()},
        "fits": [asdict(f) for f, _, _ in fits], "learned_width_loss_curve": curves.get("learned width"),
    }, indent=1), encoding="utf-8")
    print("\n".join(md))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'kernel_regression.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
