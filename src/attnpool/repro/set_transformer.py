"""Set Transformer (Lee et al. 2019): the synthetic tables, max regression (Table 1) and amortized clustering of a
2-D mixture of four Gaussians (Table 3), built from attnpool's own layers.

Lee, Lee, Kim, Kosiorek, Choi & Teh, *Set Transformer: A Framework for Attention-based Permutation-Invariant
Neural Networks*, ICML 2019.

Every model takes a padded batch ``x [B, L, d]`` with ``mask [B, L]`` (True = keep): sets of different sizes share
a batch, and padding never reaches the output (the library zeroes masked positions; each model also zeroes them on
entry so that NaN padding cannot reach a gradient).

**Max regression.** A set of ``n ~ U{1..10}`` reals from ``U[0, 100]``, target ``max``. Encoders rFF
(``FC(64, ReLU) x 3, FC(64)``) or ``SAB(64, 4) x 2``; decoders ``Pooling(mean|sum|max), FC(64, ReLU), FC(1)`` or
``PMA_1(64, 4), FC(1)``. L1 loss, Adam ``lr=1e-3``, batches of 128 sets; test metric: mean absolute error.

**Amortized clustering.** A dataset of ``n ~ U{100..500}`` points of a mixture of ``K = 4`` isotropic Gaussians in
2-D, ``mu_k ~ U[-4, 4]^2``, ``sigma = 0.3``, weights ``pi ~ Dirichlet(1, 1, 1, 1)`` (the generator of the
reference code's ``mixture_of_mvns.py``/``mvn_diag.py``). The network reads the dataset and outputs, per mixture
component, a weight logit, a mean and a standard deviation (``softplus``, as in the reference code); the loss is the
negative log-likelihood of the dataset under that mixture, per data point. Width 128, 4 heads, PMA with 4 seeds,
10 datasets per step, Adam ``lr=1e-3`` falling to ``1e-4`` for the last 30% of the steps. Test metric: the mean over
a fixed test set of datasets of the per-point log-likelihood, beside the oracle (the true parameters).

Run it with ``attnpool repro set-transformer [--task max|clustering|all] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpool.nn import ISAB, PMA, SAB, MaxPool, MeanPool, SumPool

__all__ = [
    "CLUSTERING_MODELS",
    "MAX_MODELS",
    "PAPER_CLUSTERING",
    "PAPER_MAX",
    "MixtureBatch",
    "build_clustering_model",
    "build_max_model",
    "main",
    "mixture_log_likelihood",
    "parse_mixture",
    "sample_max_sets",
    "sample_mixtures",
]

# ---------------------------------------------------------------------------------------------------------------
# The paper's numbers (Lee et al. 2019): Table 1 (MAE, mean ± std) and Table 3 (LL0/data, mean ± std).
# ---------------------------------------------------------------------------------------------------------------

MAX_MODELS = ("rFF + Pooling (mean)", "rFF + Pooling (sum)", "rFF + Pooling (max)", "SAB + PMA")
PAPER_MAX: dict[str, tuple[float, float]] = {
    "rFF + Pooling (mean)": (2.133, 0.190),
    "rFF + Pooling (sum)": (1.902, 0.137),
    "rFF + Pooling (max)": (0.1355, 0.0074),
    "SAB + PMA": (0.2085, 0.0127),
}

CLUSTERING_MODELS = ("rFF + Pooling", "rFFp-mean + Pooling", "SAB + Pooling", "rFF + PMA", "SAB + PMA",
                     "ISAB(16) + PMA")
PAPER_CLUSTERING: dict[str, tuple[float, float]] = {
    "rFF + Pooling": (-2.0006, 0.0123),
    "rFFp-mean + Pooling": (-1.7606, 0.0213),
    "SAB + Pooling": (-1.6772, 0.0066),
    "rFF + PMA": (-1.6680, 0.0040),
    "SAB + PMA": (-1.5145, 0.0046),
    "ISAB(16) + PMA": (-1.5009, 0.0068),
}
PAPER_ORACLE = -1.4726

# The committed run's step counts (see experiments/README.md): what fitted about an hour of wall time on a 2-core
# machine shared with other jobs (load average near 15), with two one-thread workers. The paper trains 20k (max) and
# 50k (clustering) steps; pass --max-steps/--clustering-steps for more.
DEFAULT_MAX_STEPS = 2000
DEFAULT_CLUSTERING_STEPS = 100
DEFAULT_REPEATS = 5
LR_DROP_AT = 0.7  # clustering: lr 1e-3 -> 1e-4 from this fraction of the steps on

MAX_CONFIG = {"batch_size": 128, "max_size": 10, "high": 100.0, "width": 64, "heads": 4, "lr": 1e-3,
              "test_sets": 10_000}
# "inducing" records the m of "ISAB(16) + PMA" (the model name sets it)
CLUSTERING_CONFIG = {"datasets_per_step": 10, "min_size": 100, "max_size": 500, "components": 4, "mean_range": 4.0,
                     "std": 0.3, "width": 128, "heads": 4, "inducing": 16, "lr": 1e-3, "test_datasets": 300}
QUICK_OVERRIDES = {
    "max": {"steps": 20, "test_sets": 128},
    "clustering": {"steps": 3, "test_datasets": 10, "min_size": 10, "max_size": 30},
}
TEST_SEED = 20190101  # the fixed test sets; training repeat r uses seed `--seed + r`


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def _pad(lengths: Tensor, width: int | None = None) -> Tensor:
    """``[B, width]`` bool mask, True at the first ``lengths[b]`` positions."""
    width = int(lengths.max()) if width is None else width
    return torch.arange(width) < lengths.unsqueeze(1)


def sample_max_sets(batch_size: int, generator: torch.Generator, *, max_size: int = 10, high: float = 100.0,
                    pad_value: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of max-regression sets: each of ``n ~ U{1..max_size}`` reals from ``U[0, high)``.

    Returns ``x [B, L, 1]`` (``L`` the largest ``n``; ``pad_value`` at padded positions), ``mask [B, L]`` and the
    target ``max [B]``, all float32 except the mask.
    """
    lengths = torch.randint(1, max_size + 1, (batch_size,), generator=generator)
    mask = _pad(lengths)
    x = torch.rand(batch_size, mask.shape[1], generator=generator) * high
    x = x.masked_fill(~mask, pad_value)
    target = x.masked_fill(~mask, -math.inf).amax(1)
    return x.unsqueeze(-1), mask, target


@dataclass
class MixtureBatch:
    """Datasets drawn from mixtures of isotropic Gaussians, padded to the largest.

    Attributes:
        x: ``[B, L, d]`` points, 0 at padded positions.
        mask: ``[B, L]`` bool, True = a point.
        labels: ``[B, L]`` the component of each point (-1 at padded positions).
        weights: ``[B, K]`` mixing weights, float64.
        means: ``[B, K, d]``, float64.
        stds: ``[B, K, d]``, float64.
    """

    x: Tensor
    mask: Tensor
    labels: Tensor
    weights: Tensor
    means: Tensor
    stds: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)

    def oracle_log_likelihood(self) -> Tensor:
        """``[B]`` float64: each dataset's per-point log-likelihood under its true mixture."""
        return mixture_log_likelihood(self.x.double(), self.mask, self.weights.log(), self.means, self.stds)

    def take(self, index: Tensor | slice) -> MixtureBatch:
        """The datasets at ``index``, padded to the largest of them."""
        width = int(self.mask[index].sum(1).max())
        return MixtureBatch(self.x[index][:, :width], self.mask[index][:, :width], self.labels[index][:, :width],
                            self.weights[index], self.means[index], self.stds[index])


def sample_mixtures(num_datasets: int, generator: torch.Generator, *, min_size: int = 100, max_size: int = 500,
                    components: int = 4, dim: int = 2, mean_range: float = 4.0, std: float = 0.3) -> MixtureBatch:
    """Datasets of ``n ~ U{min_size..max_size}`` points from a mixture of ``components`` Gaussians in ``dim``-D:
    ``pi ~ Dirichlet(1)``, ``mu_k ~ U[-mean_range, mean_range]^dim``, every std ``std`` (the conventions of the
    reference code's data generator, with one size per dataset rather than one per batch)."""
    lengths = torch.randint(min_size, max_size + 1, (num_datasets,), generator=generator)
    mask = _pad(lengths)
    width = mask.shape[1]
    # Dirichlet(1, ..., 1) is a normalized vector of Exp(1) draws; drawn here so that the generator seeds it.
    gamma = torch.empty(num_datasets, components, dtype=torch.float64).exponential_(generator=generator)
    weights = gamma.clamp_min(1e-300) / gamma.sum(1, keepdim=True)
    means = (torch.rand(num_datasets, components, dim, generator=generator, dtype=torch.float64) * 2 - 1) * mean_range
    stds = torch.full((num_datasets, components, dim), std, dtype=torch.float64)
    labels = torch.multinomial(weights, width, replacement=True, generator=generator)
    noise = torch.randn(num_datasets, width, dim, generator=generator, dtype=torch.float64)
    idx = labels.unsqueeze(-1).expand(-1, -1, dim)
    x = torch.gather(means, 1, idx) + noise * torch.gather(stds, 1, idx)
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0).float()
    return MixtureBatch(x, mask, labels.masked_fill(~mask, -1), weights, means, stds)


# ---------------------------------------------------------------------------------------------------------------
# The mixture likelihood
# ---------------------------------------------------------------------------------------------------------------


def mixture_log_likelihood(x: Tensor, mask: Tensor, log_weights: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    r"""Per-point log-likelihood of each dataset under its mixture of diagonal Gaussians, averaged over its points:

    .. math::
        \frac{1}{n_b} \sum_{i \le n_b} \log \sum_k \pi_k \prod_j \mathcal{N}(x_{ij}; \mu_{kj}, \sigma_{kj}^2)

    Args:
        x: ``[B, L, d]``; padded positions are never read (masked out before any arithmetic on them matters).
        mask: ``[B, L]`` bool, True = a point; every dataset needs at least one.
        log_weights: ``[B, K]`` normalized log mixing weights.
        means, stds: ``[B, K, d]``, ``stds > 0``.

    Returns:
        ``[B]`` in the promoted dtype of the inputs.
    """
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    z = (x.unsqueeze(2) - means.unsqueeze(1)) / stds.unsqueeze(1)  # [B, L, K, d]
    comp = -0.5 * z.square() - stds.log().unsqueeze(1) - 0.5 * math.log(2 * math.pi)
    per_point = torch.logsumexp(comp.sum(-1) + log_weights.unsqueeze(1), dim=-1)  # [B, L]
    per_point = per_point.masked_fill(~mask, 0.0)
    return per_point.sum(1) / mask.sum(1).to(per_point.dtype)


def parse_mixture(raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The network's ``[B, K, 1 + 2d]`` output as ``(log_weights [B, K], means [B, K, d], stds [B, K, d])``:
    a softmax over the weight logits, the means as they are and ``softplus`` of the std outputs (the reference
    code's ``mvn_diag.parse``)."""
    d = (raw.shape[-1] - 1) // 2
    return raw[..., 0].log_softmax(-1), raw[..., 1:1 + d], F.softplus(raw[..., 1 + d:])


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def _mlp(dim_in: int, width: int, hidden_layers: int, dim_out: int) -> nn.Sequential:
    """``FC(width, ReLU) x hidden_layers`` then ``FC(dim_out)``."""
    layers: list[nn.Module] = []
    for i in range(hidden_layers):
        layers += [nn.Linear(dim_in if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if hidden_layers else dim_in, dim_out))
    return nn.Sequential(*layers)


class _Rowwise(nn.Module):
    """A row-wise network applied to every element; masked rows come out as 0."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.net(x).masked_fill(~mask.unsqueeze(-1), 0.0)


class EquivariantMean(nn.Module):
    r"""The permutation-equivariant layer of Deep Sets (Zaheer et al. 2017) with mean pooling ("rFFp-mean"):
    :math:`h_i = \Lambda x_i + \Gamma \,\mathrm{mean}_{j \in S}\, x_j + b`, the mean over the kept elements only."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.elem = nn.Linear(dim_in, dim_out)
        self.pooled = nn.Linear(dim_in, dim_out, bias=False)
        self.mean = MeanPool()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.elem(x) + self.pooled(self.mean(x, mask)).unsqueeze(1)
        return h.masked_fill(~mask.unsqueeze(-1), 0.0)


class _EquivariantStack(nn.Module):
    """``rFFp-mean(width, ReLU) x (layers - 1)`` then ``rFFp-mean(width)``."""

    def __init__(self, dim_in: int, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EquivariantMean(dim_in if i == 0 else width, width) for i in range(layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


class _SetStack(nn.Module):
    """Set-to-set blocks (SAB/ISAB) applied in turn to a padded batch."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


class SetModel(nn.Module):
    """``decoder(pool(encoder(x, mask), mask))``: an encoder mapping each set to a set, a pooling module of attnpool
    mapping it to ``[B, D]`` or ``[B, k, D]``, and a row-wise decoder. Padded positions of ``x`` are zeroed first,
    so that whatever they hold (even NaN) reaches neither the output nor the gradients."""

    def __init__(self, encoder: nn.Module, pool: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.pool, self.decoder = encoder, pool, decoder

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self.decoder(self.pool(self.encoder(x, mask), mask))


class _Squeeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)


class _PerSeedHead(nn.Module):
    """Post-PMA decoder: ``SAB(D, H)`` among the ``k`` pooled vectors, then ``FC(out)`` on each."""

    def __init__(self, width: int, heads: int, dim_out: int) -> None:
        super().__init__()
        self.sab = SAB(width, heads)
        self.out = nn.Linear(width, dim_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.sab(h))


class _PooledHead(nn.Module):
    """Post-pooling decoder: an MLP from ``[B, D]`` to ``k`` outputs of size ``dim_out`` each."""

    def __init__(self, width: int, hidden_layers: int, k: int, dim_out: int) -> None:
        super().__init__()
        self.k, self.dim_out = k, dim_out
        self.mlp = _mlp(width, width, hidden_layers, k * dim_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h).view(-1, self.k, self.dim_out)


def build_max_model(name: str, *, width: int = 64, heads: int = 4) -> SetModel:
    """A model of Table 1: ``forward(x [B, L, 1], mask [B, L]) -> [B]``."""
    if name.startswith("rFF + Pooling"):
        pools = {"mean": MeanPool, "sum": SumPool, "max": MaxPool}
        kind = name[name.index("(") + 1:-1]
        return SetModel(_Rowwise(_mlp(1, width, 3, width)), pools[kind](),
                        nn.Sequential(_mlp(width, width, 1, 1), _Squeeze()))
    if name == "SAB + PMA":
        encoder = _SetStack(SAB(width, heads, in_dim=1, residual="projected_query"), SAB(width, heads))
        return SetModel(encoder, PMA(width, 1, heads), nn.Sequential(nn.Linear(width, 1), _Squeeze()))
    raise ValueError(f"name: expected one of {MAX_MODELS}, got {name!r}")


def build_clustering_model(name: str, *, width: int = 128, heads: int = 4, components: int = 4, dim: int = 2
                           ) -> SetModel:
    """A model of Table 3: ``forward(x [B, L, dim], mask [B, L]) -> [B, components, 1 + 2 dim]`` (per component:
    weight logit, mean, std before softplus; see :func:`parse_mixture`).

    Encoders: rFF ``FC(D, ReLU) x 3, FC(D)``; rFFp-mean the same with Deep Sets' mean-equivariant layers;
    ``SAB(D, H) x 2``; ``ISAB_m(D, H) x 2`` (named ``"ISAB(m) + ..."``, any ``m``). Decoders: Pooling
    ``mean, FC(D, ReLU) x 3, FC(K (1 + 2 d))``; PMA ``PMA_K(D, H), SAB(D, H), FC(1 + 2 d)``.
    """
    out = 1 + 2 * dim
    encoder: nn.Module
    if name.startswith("rFF + "):
        encoder = _Rowwise(_mlp(dim, width, 3, width))
    elif name.startswith("rFFp-mean + "):
        encoder = _EquivariantStack(dim, width, 4)
    elif name.startswith("SAB + "):
        encoder = _SetStack(SAB(width, heads, in_dim=dim, residual="projected_query"), SAB(width, heads))
    elif (match := re.fullmatch(r"ISAB\((\d+)\) \+ (Pooling|PMA)", name)) and int(match[1]) > 0:
        m = int(match[1])
        encoder = _SetStack(ISAB(width, m, heads, in_dim=dim, residual="projected_query"), ISAB(width, m, heads))
    else:
        raise ValueError(f"name: expected one of {CLUSTERING_MODELS}, got {name!r}")
    if name.endswith(" + Pooling"):
        return SetModel(encoder, MeanPool(), _PooledHead(width, 3, components, out))
    if name.endswith(" + PMA"):
        return SetModel(encoder, PMA(width, components, heads), _PerSeedHead(width, heads, out))
    raise ValueError(f"name: expected one of {CLUSTERING_MODELS}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Training (one model, one seed: the unit of work that the workers run)
# ---------------------------------------------------------------------------------------------------------------

Progress = Callable[[int], None]
CURVE_POINTS = 100  # training-loss points kept per run (means over equal windows of steps)


def _curve(losses: list[float]) -> list[tuple[int, float]]:
    window = max(1, len(losses) // CURVE_POINTS)
    return [(i + window, sum(losses[i:i + window]) / len(losses[i:i + window]))
            for i in range(0, len(losses), window)]


def lr_drop_step(steps: int, fraction: float | None) -> int | None:
    """The step from which the learning rate is a tenth of its start (None: constant)."""
    return None if fraction is None else int(fraction * steps)


def train_max(name: str, seed: int, steps: int, cfg: dict[str, Any], progress: Progress) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_max_model(name, width=cfg["width"], heads=cfg["heads"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    drop_at = lr_drop_step(steps, cfg.get("lr_drop_at"))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if step == drop_at:
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * 0.1
        x, mask, target = sample_max_sets(cfg["batch_size"], gen, max_size=cfg["max_size"], high=cfg["high"])
        loss = F.l1_loss(model(x, mask), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            progress(50 if (step + 1) % 50 == 0 else (step + 1) % 50)
    train_s = time.perf_counter() - start
    model.eval()
    test = torch.Generator().manual_seed(TEST_SEED)
    x, mask, target = sample_max_sets(cfg["test_sets"], test, max_size=cfg["max_size"], high=cfg["high"])
    with torch.no_grad():
        mae = torch.cat([(model(x[i:i + 1000], mask[i:i + 1000]) - target[i:i + 1000]).abs()
                         for i in range(0, len(x), 1000)]).mean().item()
    return {"task": "max", "model": name, "seed": seed, "steps": steps, "metric": mae, "curve": _curve(losses),
            "train_seconds": train_s}


def _clustering_test_set(cfg: dict[str, Any]) -> MixtureBatch:
    gen = torch.Generator().manual_seed(TEST_SEED)
    return sample_mixtures(cfg["test_datasets"], gen, min_size=cfg["min_size"], max_size=cfg["max_size"],
                           components=cfg["components"], mean_range=cfg["mean_range"], std=cfg["std"])


EXAMPLE_DATASETS = 3  # test datasets whose fitted mixtures are kept for the plot


def train_clustering(name: str, seed: int, steps: int, cfg: dict[str, Any], progress: Progress) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_clustering_model(name, width=cfg["width"], heads=cfg["heads"], components=cfg["components"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    drop_at = lr_drop_step(steps, LR_DROP_AT)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if step == drop_at:
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * 0.1
        batch = sample_mixtures(cfg["datasets_per_step"], gen, min_size=cfg["min_size"], max_size=cfg["max_size"],
                                components=cfg["components"], mean_range=cfg["mean_range"], std=cfg["std"])
        loss = -mixture_log_likelihood(batch.x, batch.mask, *parse_mixture(model(batch.x, batch.mask))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == steps:
            progress(10 if (step + 1) % 10 == 0 else (step + 1) % 10)
    train_s = time.perf_counter() - start
    model.eval()
    test = _clustering_test_set(cfg)
    # batches of datasets of similar sizes: little padding to compute over (padding changes no output)
    by_size = test.lengths.argsort()
    lls = []
    with torch.no_grad():
        for i in range(0, len(by_size), 10):
            part = test.take(by_size[i:i + 10])
            params = parse_mixture(model(part.x, part.mask))
            lls.append(mixture_log_likelihood(part.x.double(), part.mask, *(p.double() for p in params)))
        part = test.take(slice(0, EXAMPLE_DATASETS))
        example = [p.tolist() for p in parse_mixture(model(part.x, part.mask))]
    return {"task": "clustering", "model": name, "seed": seed, "steps": steps, "metric": torch.cat(lls).mean().item(),
            "curve": _curve(losses), "train_seconds": train_s, "example": example}


TRAINERS = {"max": train_max, "clustering": train_clustering}


# ---------------------------------------------------------------------------------------------------------------
# Running the units (in this process, or in one-thread worker processes)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    task: str
    model: str
    seed: int
    steps: int
    cfg: dict[str, Any] = field(default_factory=dict)


_PROGRESS_QUEUE: Any = None
_PARENT_PID = 0


def _worker_init(progress_queue: Any, parent_pid: int) -> None:
    global _PROGRESS_QUEUE, _PARENT_PID
    torch.set_num_threads(1)
    _PROGRESS_QUEUE, _PARENT_PID = progress_queue, parent_pid


def _run_unit(unit: Unit) -> dict[str, Any]:
    weight = _step_cost(unit)

    def report(n: int) -> None:
        if os.getppid() != _PARENT_PID:  # the main process is gone (killed): stop rather than train for nobody
            os._exit(1)
        _PROGRESS_QUEUE.put(n * weight)

    return TRAINERS[unit.task](unit.model, unit.seed, unit.steps, unit.cfg, report)


def unit_key(unit: Unit) -> str:
    """What identifies a finished run in ``runs.jsonl``: task, model, seed, steps and the configuration."""
    return json.dumps([unit.task, unit.model, unit.seed, unit.steps, unit.cfg], sort_keys=True)


def run_units(units: list[Unit], jobs: int, bar: Any, on_result: Callable[[Unit, dict[str, Any]], None]
              ) -> list[dict[str, Any]]:
    """Train every unit, ``jobs`` at a time (1: in this process), repeat by repeat (so that an interrupted run has
    whole repeats) and the costliest first within a repeat. ``on_result`` sees each result as it comes; the
    results are returned in the order of ``units``."""
    order = sorted(range(len(units)), key=lambda i: (units[i].seed, -_step_cost(units[i]) * units[i].steps))
    if jobs <= 1:
        results = {}
        for i in order:
            u = units[i]
            weight = _step_cost(u)
            results[i] = TRAINERS[u.task](u.model, u.seed, u.steps, u.cfg, lambda n, w=weight: bar.update(n * w))
            on_result(u, results[i])
        return [results[i] for i in range(len(units))]
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    progress_queue = manager.Queue()
    results = {}
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(progress_queue, os.getpid())) as pool:
            pending: dict[Future[dict[str, Any]], int] = {pool.submit(_run_unit, units[i]): i for i in order}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    on_result(units[i], results[i])
            _drain(progress_queue, bar)
    finally:
        manager.shutdown()
    return [results[i] for i in range(len(units))]


def _drain(progress_queue: Any, bar: Any) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _step_cost(unit: Unit) -> float:
    """The time of one training step relative to one of rFF + Pooling on max regression, as measured on one
    thread: it orders the runs (costliest first) and weighs the progress bar, so that its rate and ETA hold."""
    measured = {"SAB + PMA": 4.0} if unit.task == "max" else {
        "rFF + Pooling": 6.0, "rFFp-mean + Pooling": 8.0, "rFF + PMA": 12.0, "SAB + Pooling": 200.0,
        "SAB + PMA": 150.0}
    return measured.get(unit.model, 20.0 if unit.task == "clustering" else 1.0)


class _NoBar:
    def __init__(self, total: float, **_: Any) -> None:
        self.total, self.n, self.last = total, 0, 0.0

    def update(self, n: float) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last > 30 or self.n >= self.total:
            self.last = now
            print(f"  {100 * self.n / self.total:.1f}% of the work done", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: float, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency
        return _NoBar(total)
    # the bar counts work (steps weighted by their cost, see _step_cost), shown as a percentage with its ETA
    return tqdm(total=total, desc=desc, smoothing=0.05, dynamic_ncols=True,
                bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}]")


# ---------------------------------------------------------------------------------------------------------------
# Summaries: tables, JSON, plots
# ---------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _ranking(values: dict[str, float], higher_is_better: bool) -> list[str]:
    return sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])


def summarize(task: str, results: list[dict[str, Any]], models: Sequence[str], extra: dict[str, Any]
              ) -> dict[str, Any]:
    paper = PAPER_MAX if task == "max" else PAPER_CLUSTERING
    rows = {}
    for m in models:
        vals = [r["metric"] for r in results if r["model"] == m]
        mean, std = _mean_std(vals)
        rows[m] = {"mean": mean, "std": std, "values": vals, "paper_mean": paper[m][0], "paper_std": paper[m][1],
                   "gap": mean - paper[m][0],
                   "train_seconds": sum(r["train_seconds"] for r in results if r["model"] == m)}
    higher = task == "clustering"
    ours = _ranking({m: rows[m]["mean"] for m in models}, higher)
    theirs = _ranking({m: paper[m][0] for m in models}, higher)
    # pairs of models that the paper orders one way and our means the other
    reversed_pairs = [[a, b] for i, a in enumerate(theirs) for b in theirs[i + 1:] if ours.index(a) > ours.index(b)]
    seeds = sorted({r["seed"] for r in results})
    per_seed = [_ranking({r["model"]: r["metric"] for r in results if r["seed"] == s}, higher) == theirs
                for s in seeds]
    return {"task": task, "rows": rows, "ranking_ours": ours, "ranking_paper": theirs, "ranking_matches":
            ours == theirs, "reversed_pairs": reversed_pairs, "seeds_with_paper_ranking": sum(per_seed), **extra}


def markdown(summary: dict[str, Any]) -> str:
    task = summary["task"]
    if task == "max":
        head = ("### Max regression (Table 1): test MAE, lower is better\n\n"
                "| model | paper | ours | ours - paper |\n|---|---|---|---|\n")
        digits = 4
    else:
        head = ("### Amortized clustering, 2-D mixture of 4 Gaussians (Table 3): test LL0/data, higher is better\n\n"
                "| model | paper | ours | ours - paper |\n|---|---|---|---|\n")
        digits = 4
    lines = [head.rstrip("\n")]
    if task == "clustering":
        oracle = summary["oracle"]
        lines.append(f"| Oracle | {PAPER_ORACLE:.4f} | {oracle:.4f} | {oracle - PAPER_ORACLE:+.4f} |")
    for m, r in summary["rows"].items():
        lines.append(f"| {m} | {_fmt(r['paper_mean'], r['paper_std'], digits)} | {_fmt(r['mean'], r['std'], digits)}"
                     f" | {r['gap']:+.4f} |")
    order = "lowest error first" if task == "max" else "highest likelihood first"
    lines.append("")
    lines.append(f"Ranking ({order}), ours: {', '.join(summary['ranking_ours'])}  ")
    lines.append(f"Ranking, paper: {', '.join(summary['ranking_paper'])}  ")
    n_pairs = len(summary["ranking_paper"]) * (len(summary["ranking_paper"]) - 1) // 2
    lines.append(f"Same ranking as the paper: {'yes' if summary['ranking_matches'] else 'no'} (means over repeats; "
                 f"{n_pairs - len(summary['reversed_pairs'])} of {n_pairs} pairs in the paper's order"
                 + "".join(f"; reversed: {a} vs {b}" for a, b in summary["reversed_pairs"])
                 + f"). Single repeats with the paper's full ranking: {summary['seeds_with_paper_ranking']} of "
                 f"{summary['repeats']}.")
    lines.append("")
    lines.append(f"Steps: {summary['steps']} per run (paper: {summary['paper_steps']}); repeats: "
                 f"{summary['repeats']} (seeds {', '.join(map(str, summary['seeds']))}); test set: "
                 f"{summary['test_size']} {'sets' if task == 'max' else 'datasets'}, seed {TEST_SEED}; "
                 f"learning rate: {summary.get('lr_schedule', '1e-3, constant')}.")
    return "\n".join(lines) + "\n"


def plot(task: str, results: list[dict[str, Any]], models: Sequence[str], out: Path, summary: dict[str, Any]
         ) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    late = []  # the curves past their first tenth: the y range of the clustering plot
    for m in models:
        curves = [r["curve"] for r in results if r["model"] == m]
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        late += mean[len(mean) // 10:]
        ax.plot(steps, mean, label=m)
    ax.set_xlabel("training step")
    if task == "max":
        ax.set_ylabel("training L1 loss (mean over repeats)")
        ax.set_yscale("log")
        ax.set_title("Max regression: training curves")
    else:
        ax.axhline(-summary["oracle"], color="k", ls="--", lw=1, label="oracle NLL (test set)")
        ax.set_ylabel("training NLL per point (mean over repeats)")
        ax.set_ylim(-summary["oracle"] - 0.2, max(late) + 0.2)
        ax.set_title("Amortized clustering: training curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{task}_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path.name)
    if task == "clustering":
        written.append(_plot_clustering_example(results, models, out, summary["config"], plt))
    return written


def _plot_clustering_example(results: list[dict[str, Any]], models: Sequence[str], out: Path, cfg: dict[str, Any],
                             plt: Any) -> str:
    from matplotlib.patches import Ellipse

    test = _clustering_test_set(cfg).take(slice(0, EXAMPLE_DATASETS))
    first = {r["model"]: r for r in results if r["seed"] == min(x["seed"] for x in results)}
    cols = len(models) + 1
    fig, axes = plt.subplots(EXAMPLE_DATASETS, cols, figsize=(2.3 * cols, 2.3 * EXAMPLE_DATASETS), squeeze=False)
    for b in range(EXAMPLE_DATASETS):
        n = int(test.mask[b].sum())
        pts = test.x[b, :n].numpy()
        labels = test.labels[b, :n].numpy()
        fits = [("truth", test.weights[b].log().tolist(), test.means[b].tolist(), test.stds[b].tolist())]
        for m in models:
            lw, mu, sd = first[m]["example"]
            fits.append((m, lw[b], mu[b], sd[b]))
        for c, (title, logw, mu, sd) in enumerate(fits):
            ax = axes[b, c]
            ax.scatter(pts[:, 0], pts[:, 1], c=labels, s=2, cmap="tab10", vmin=0, vmax=9)
            for k in range(len(mu)):
                w = math.exp(logw[k])
                ax.add_patch(Ellipse(tuple(mu[k]), 4 * sd[k][0], 4 * sd[k][1], fill=False, lw=0.5 + 2.5 * w,
                                     color="k" if title == "truth" else "crimson"))
            ax.set_xlim(-5.5, 5.5)
            ax.set_ylim(-5.5, 5.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("Test datasets: true mixture (left) and the mixtures predicted (2-sigma ellipses, line width grows "
                 f"with the weight), seed {min(r['seed'] for r in results)}", fontsize=9)
    fig.tight_layout()
    path = out / "clustering_example.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnpool repro set-transformer",
        description="Set Transformer (Lee et al. 2019) synthetic tables with attnpool's layers: max regression "
                    "(Table 1) and amortized clustering of a 2-D mixture of 4 Gaussians (Table 3). Writes a Markdown "
                    "table, JSON and plots per task to --out.")
    p.add_argument("--task", choices=("max", "clustering", "all"), default="all", help="(default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps, small test sets and small clustering datasets: a smoke test of seconds")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps of every run, both tasks (overrides --max-steps and --clustering-steps)")
    p.add_argument("--max-steps", type=_positive_int, default=DEFAULT_MAX_STEPS,
                   help="max regression: training steps per run (default: %(default)s; the paper: 20000)")
    p.add_argument("--clustering-steps", type=_positive_int, default=DEFAULT_CLUSTERING_STEPS,
                   help="clustering: training steps per run (default: %(default)s; the paper: 50000)")
    p.add_argument("--max-lr-drop", type=_fraction, default=None, metavar="FRACTION",
                   help="max regression: lr 1e-3 -> 1e-4 from this fraction of the steps on (default: constant "
                        "1e-3, as in the paper)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"runs per model, seeds --seed .. --seed + repeats - 1 (default: {DEFAULT_REPEATS}, 2 with "
                        "--quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat (default: %(default)s)")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="worker processes of one thread each (default: %(default)s: this process, one thread)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the results: TASK.md, TASK.json, plots, and TASK_runs.jsonl with every run as "
                        "it finishes (default: print only)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs in --out/TASK_runs.jsonl that match this command's settings, run the rest")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def _machine() -> str:
    from attnpool._machine import cpu_name

    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    tasks = ("max", "clustering") if args.task == "all" else (args.task,)
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS)
    seeds = [args.seed + r for r in range(repeats)]
    cfgs = {"max": dict(MAX_CONFIG), "clustering": dict(CLUSTERING_CONFIG)}
    steps = {"max": args.max_steps, "clustering": args.clustering_steps}
    if args.quick:
        for t in tasks:
            q = dict(QUICK_OVERRIDES[t])
            steps[t] = q.pop("steps")
            cfgs[t].update(q)
    if args.steps is not None:
        steps = {t: args.steps for t in steps}
    if args.max_lr_drop is not None:
        # only when given: the runs of a constant lr keep their keys in runs.jsonl (--resume)
        cfgs["max"]["lr_drop_at"] = args.max_lr_drop
    models = {"max": MAX_MODELS, "clustering": CLUSTERING_MODELS}
    units = [Unit(t, m, s, steps[t], cfgs[t]) for t in tasks for m in models[t] for s in seeds]

    done: dict[str, dict[str, Any]] = {}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for t in tasks:
            log = args.out / f"{t}_runs.jsonl"
            if args.resume and log.exists():
                for line in log.read_text().splitlines():
                    if line.strip():
                        record = json.loads(line)
                        done[record["key"]] = record["result"]
            elif log.exists():
                log.unlink()
    todo = [u for u in units if unit_key(u) not in done]
    if len(todo) < len(units):
        print(f"resuming: {len(units) - len(todo)} of {len(units)} runs found in {args.out}", file=sys.stderr)

    def save(unit: Unit, result: dict[str, Any]) -> None:
        if args.out is not None:
            with open(args.out / f"{unit.task}_runs.jsonl", "a") as f:
                f.write(json.dumps({"key": unit_key(unit), "result": result}) + "\n")

    start = time.perf_counter()
    bar = _progress_bar(sum(u.steps * _step_cost(u) for u in todo), "set-transformer")
    try:
        fresh = dict(zip(map(unit_key, todo), run_units(todo, args.jobs, bar, save)))
    finally:
        bar.close()
    wall = time.perf_counter() - start
    results = [done.get(unit_key(u)) or fresh[unit_key(u)] for u in units]

    command = "attnpool repro set-transformer " + " ".join(argv if argv is not None else sys.argv[1:])
    for t in tasks:
        res = [r for r in results if r["task"] == t]
        extra: dict[str, Any] = {
            "steps": steps[t], "paper_steps": 20_000 if t == "max" else 50_000, "repeats": repeats, "seeds": seeds,
            "test_size": cfgs[t]["test_sets" if t == "max" else "test_datasets"], "test_seed": TEST_SEED,
            "config": cfgs[t], "quick": args.quick, "jobs": args.jobs, "command": command.strip(),
            "wall_seconds_this_invocation": wall,
            "runs_resumed": sum(unit_key(u) in done for u in units if u.task == t),
            "train_seconds_total": sum(r["train_seconds"] for r in res),
            "machine": _machine(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
        if t == "clustering":
            test = _clustering_test_set(cfgs[t])
            oracle = test.oracle_log_likelihood()
            extra["oracle"] = oracle.mean().item()
            extra["paper_oracle"] = PAPER_ORACLE
            extra["lr_schedule"] = f"1e-3, then 1e-4 from step {lr_drop_step(steps[t], LR_DROP_AT)}"
        elif "lr_drop_at" in cfgs[t]:
            extra["lr_schedule"] = f"1e-3, then 1e-4 from step {lr_drop_step(steps[t], cfgs[t]['lr_drop_at'])}"
        else:
            extra["lr_schedule"] = "1e-3, constant"
        summary = summarize(t, res, models[t], extra)
        text = markdown(summary)
        print(text)
        if args.out is not None:
            summary["plots"] = plot(t, res, models[t], args.out, summary)
            (args.out / f"{t}.md").write_text(text)
            summary["runs"] = [{k: v for k, v in r.items() if k != "example"} for r in res]
            (args.out / f"{t}.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    print(f"wall time: {wall:.0f} s", file=sys.stderr)
    return 0


def _json_default(obj: object) -> Any:
    if isinstance(obj, Unit):
        return asdict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
