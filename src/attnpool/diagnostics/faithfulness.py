"""Faithfulness: does removing the elements the attention weights most change the output more than removing random
ones? Attention that does not predict importance shows a ratio near 1.

Jain & Wallace, *Attention is not Explanation*, NAACL 2019; Serrano & Smith, *Is Attention Interpretable?*,
ACL 2019 (the removal test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnpool.diagnostics.capture import Recording

__all__ = ["Faithfulness", "faithfulness"]

Distance = Callable[[Tensor, Tensor], Tensor]


def output_distance(full: Tensor, removed: Tensor) -> Tensor:
    """The default change: the L2 norm of the output difference, per set (``[B, ...]`` to ``[B]``; for ``[B]``
    outputs, the absolute difference)."""
    return (full - removed).reshape(full.shape[0], -1).double().norm(dim=1)


@dataclass
class Faithfulness:
    """The result of :func:`faithfulness` for one module.

    Attributes:
        top_drop: ``[S]``, per set the change of the output when its ``k`` most-weighted elements are removed.
        random_drop: ``[S]``, per set the mean change over ``num_random`` removals of ``k`` random elements.
        ratio: ``mean(top_drop) / mean(random_drop)``: about 1 when the weights do not predict importance, well
            above 1 when they do. ``ratio_ci`` is its bootstrap confidence interval over sets.
        win_rate: the share of sets where removing the top elements changes the output more than the random mean.
    """

    module: str
    k: int
    num_random: int
    top_drop: np.ndarray
    random_drop: np.ndarray
    ratio: float
    ratio_ci: tuple[float, float]
    win_rate: float

    @property
    def num_sets(self) -> int:
        return int(self.top_drop.shape[0])

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"module": self.module, "k": self.k, "num_random": self.num_random, "sets": self.num_sets,
                "top_drop_mean": f(float(self.top_drop.mean())) if self.num_sets else None,
                "random_drop_mean": f(float(self.random_drop.mean())) if self.num_sets else None,
                "ratio": f(self.ratio), "ratio_ci": [f(self.ratio_ci[0]), f(self.ratio_ci[1])],
                "win_rate": f(self.win_rate)}


def _ratio(top: np.ndarray, rnd: np.ndarray) -> float:
    den = rnd.mean()
    return float(top.mean() / den) if den > 0 else (math.inf if top.mean() > 0 else math.nan)


@torch.no_grad()
def faithfulness(
    model: nn.Module,
    sets: Sequence[Tensor],
    *,
    forward: Callable[[list[Tensor]], Tensor] | None = None,
    module: str | None = None,
    k: int = 1,
    num_random: int = 8,
    distance: Distance | None = None,
    batch_size: int = 64,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> Faithfulness:
    """Remove each set's ``k`` most-weighted elements, and ``k`` random ones, and compare how much the output moves.

    Args:
        model: the model; its attnpool module ``module`` is observed through the weights hook.
        sets: the inputs, one ``[L_i, ...]`` tensor per set. Removing an element deletes its row, so the elements
            the module pools must be these rows (an element-wise encoder before the pooling is fine; a layer that
            mixes elements, or sets the module sees in another order, is not: sizes are checked).
        forward: ``forward(list of sets) -> [B, ...]`` outputs; default ``model(list)``. Return what a change should
            be measured on (logits, a probability, an embedding).
        module: the qualified name of the attnpool module whose weights rank the elements; may be omitted when the
            model has one.
        k: elements removed per set; sets with ``k`` or fewer elements are skipped.
        num_random: random removals per set, averaged.
        distance: ``distance(full [B, ...], removed [B, ...]) -> [B]``; default the L2 norm of the difference.
        batch_size: sets per forward call.
        seed: seeds the random removals and the bootstrap.
        n_boot, confidence: the bootstrap of the ratio's confidence interval.

    Elements are ranked by their weight averaged over heads and queries. The model runs in whatever mode it is in
    (call ``model.eval()`` first for deterministic outputs).
    """
    if k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if num_random < 1:
        raise ValueError(f"num_random: expected a positive int, got {num_random!r}")
    if not isinstance(sets, (list, tuple)) or not all(isinstance(s, Tensor) for s in sets):
        raise TypeError("sets: expected a list of tensors [L_i, ...], one per set")
    run = forward if forward is not None else model
    dist = distance or output_distance
    gen = torch.Generator().manual_seed(seed)
    tops: list[float] = []
    rnds: list[float] = []
    chosen = module
    for start in range(0, len(sets), batch_size):
        batch = list(sets[start:start + batch_size])
        with Recording(model) as rec:
            full = run(batch)
        names = rec.module_names
        if chosen is None:
            if len(names) != 1:
                raise ValueError(f"module: the model has {len(names)} attnpool modules with weights {names}; name "
                                 "the one whose weights rank the elements")
            chosen = names[0]
        calls = rec.calls_of(chosen)
        if not calls:
            raise ValueError(f"module: {chosen!r} recorded no weights in the forward pass (recorded: {names})")
        weights = [w for c in calls for w in c.weights]
        sizes = [int(s.shape[0]) for s in batch]
        if [int(w.shape[-1]) for w in weights] != sizes:
            raise ValueError(f"sets: module {chosen!r} pooled sets of sizes {[int(w.shape[-1]) for w in weights]}, "
                             f"but the inputs have {sizes}; its elements must be the input rows")
        keep = [i for i, n in enumerate(sizes) if n > k]
        if not keep:
            continue
        importance = [weights[i].double().mean(dim=(0, 1)) for i in keep]

        def without(drop: list[Tensor], keep: list[int] = keep, batch: list[Tensor] = batch) -> list[Tensor]:
            out = []
            for i, d in zip(keep, drop):
                mask = torch.ones(batch[i].shape[0], dtype=torch.bool)
                mask[d] = False
                out.append(batch[i][mask.to(batch[i].device)])
            return out

        ref = full[keep]
        top = dist(ref, run(without([imp.topk(k).indices for imp in importance])))
        rnd = torch.zeros_like(top)
        for _ in range(num_random):
            drop = [torch.randperm(batch[i].shape[0], generator=gen)[:k] for i in keep]
            rnd = rnd + dist(ref, run(without(drop)))
        tops += top.double().cpu().tolist()
        rnds += (rnd / num_random).double().cpu().tolist()

    top_a, rnd_a = np.asarray(tops), np.asarray(rnds)
    if top_a.size == 0:
        raise ValueError(f"sets: no set has more than k = {k} elements")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, top_a.size, (n_boot, top_a.size))
    with np.errstate(all="ignore"):
        boots = top_a[idx].mean(1) / rnd_a[idx].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(boots, [alpha, 1 - alpha]) if np.isfinite(boots).any() else (math.nan, math.nan)
    return Faithfulness(str(chosen), k, num_random, top_a, rnd_a, _ratio(top_a, rnd_a), (float(lo), float(hi)),
                        float((top_a > rnd_a).mean()))
