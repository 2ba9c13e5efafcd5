"""From recorded weights to per-module summaries: the signals of :mod:`.signals` per set, per head and over the
data set, ready for the alerts of :mod:`.alerts`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnpool.diagnostics import signals as sg
from attnpool.diagnostics.capture import CallRecord, Recording

__all__ = ["ModuleSummary", "summarize", "summarize_module"]

#: per-set signals, each averaged over the set's heads and queries
PER_SET = ("normalized_entropy", "effective_count", "effective_fraction", "max_weight", "topk_mass", "gini",
           "position_centroid")


@dataclass
class Example:
    """One set kept whole for the report's heatmaps."""

    call: int
    index: int
    weights: Tensor  # [H, Q, L]
    labels: list[str] | None


@dataclass
class ModuleSummary:
    """Every signal of one module over all the sets recorded from it.

    Per-distribution signals (one value per set, head and query) are averaged with NaN left out: the entropy of a
    one-element set, anything of an empty set. ``per_set`` holds each set's values averaged over its heads and
    queries (arrays of length ``num_sets``); ``per_head`` one value per head.
    """

    name: str
    module_type: str
    layouts: list[str]
    num_calls: int
    num_sets: int
    num_heads: int
    num_queries: int
    self_attention: bool
    training_calls: int
    skipped_sets: int
    topk: int
    sizes: np.ndarray  # [S]
    means: dict[str, float]
    per_set: dict[str, np.ndarray]
    per_head: dict[str, list[float]]
    position: dict[str, Any]
    collapse: dict[str, Any]
    redundancy: list[list[float]]
    query_sensitivity: dict[str, Any]
    leakage: dict[str, float]
    examples: list[Example] = field(default_factory=list)

    @property
    def informative_sets(self) -> int:
        """Sets with at least two elements: the only ones whose weights say anything."""
        return int((self.sizes >= 2).sum())

    def to_dict(self, per_set: bool = False) -> dict[str, Any]:
        sizes = self.sizes
        out: dict[str, Any] = {
            "module": self.name, "module_type": self.module_type, "layouts": self.layouts,
            "calls": self.num_calls, "sets": self.num_sets, "informative_sets": self.informative_sets,
            "heads": self.num_heads, "queries": self.num_queries, "self_attention": self.self_attention,
            "training_calls": self.training_calls, "skipped_sets": self.skipped_sets, "topk": self.topk,
            "set_size": ({"min": int(sizes.min()), "median": float(np.median(sizes)), "mean": float(sizes.mean()),
                          "max": int(sizes.max())} if sizes.size else None),
            "means": self.means, "per_head": self.per_head, "position": self.position, "collapse": self.collapse,
            "head_redundancy_jsd": self.redundancy, "query_sensitivity": self.query_sensitivity,
            "leakage": self.leakage,
        }
        if per_set:
            out["per_set"] = {k: v.tolist() for k, v in self.per_set.items()} | {"size": sizes.tolist()}
        return _finite(out)


def _finite(x: Any) -> Any:
    """NaN and inf become None, so that the JSON is valid."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _nanmean(x: np.ndarray, axis: Any = None) -> Any:
    """``np.nanmean`` without its warning for all-NaN slices (which stay NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _pad(ws: list[Tensor], h: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sets ``[H, Q_i, L_i]`` as ``[C, H, Q, L]`` zero-padded, with their sizes ``[C]`` and query counts ``[C]``."""
    q = max((w.shape[1] for w in ws), default=0)
    l = max((w.shape[2] for w in ws), default=0)
    dtype = ws[0].dtype if ws else torch.float32
    out = torch.zeros(len(ws), h, q, l, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for i, w in enumerate(ws):
        out[i, :, : w.shape[1], : w.shape[2]] = w
    n = torch.tensor([w.shape[2] for w in ws], dtype=out.dtype)
    nq = torch.tensor([w.shape[1] for w in ws], dtype=torch.long)
    return out, n, nq


def summarize_module(name: str, calls: list[CallRecord], *, topk: int = 3, max_positions: int = 16,
                     bins: int = 10, uniform_entropy: float = 0.98, one_hot_weight: float = 0.9,
                     position_min_size: int = 3, num_examples: int = 4, chunk: int = 256,
                     skipped_sets: int = 0) -> ModuleSummary:
    """All the signals of one module's recorded calls (see :class:`ModuleSummary`).

    ``uniform_entropy`` and ``one_hot_weight`` decide which distributions count as near-uniform and near one-hot;
    ``position_min_size`` which sets count for the first/last position rates (smaller sets have a high chance rate).
    """
    sets = [(c, i, w) for c in calls for i, w in enumerate(c.weights)]
    heads = {int(w.shape[0]) for _, _, w in sets}
    if len(heads) > 1:
        raise ValueError(f"module {name!r}: recorded weights with different head counts {sorted(heads)}")
    h = heads.pop() if heads else 0
    s = len(sets)
    qmax = max((int(w.shape[1]) for _, _, w in sets), default=0)
    sizes = np.array([int(w.shape[2]) for _, _, w in sets], dtype=np.int64)

    # per distribution (set, head, query)
    keys = ("normalized_entropy", "effective_count", "effective_fraction", "max_weight", "topk_mass", "gini",
            "position_centroid", "argmax", "top_first", "top_last")
    dist = {k: np.full((s, h, qmax), np.nan) for k in keys}
    lift_sum = {"first": np.zeros(max_positions), "last": np.zeros(max_positions)}
    lift_cnt = {"first": np.zeros(max_positions), "last": np.zeros(max_positions)}
    rel_sum, rel_cnt = np.zeros(bins), np.zeros(bins)
    red_sum, red_cnt = np.zeros((h, h)), 0
    sens_set = np.full((s, h), np.nan)

    for start in range(0, s, chunk):
        part = [w for _, _, w in sets[start:start + chunk]]
        w, n, nq = _pad(part, h)
        c = w.shape[0]
        if w.shape[2] == 0:
            continue
        qvalid = torch.arange(w.shape[2]).unsqueeze(0) < nq.unsqueeze(1)  # [C, Q]
        valid = (qvalid & (n >= 1).unsqueeze(1)).unsqueeze(1).expand(c, h, -1)  # [C, H, Q]
        nn_ = n.view(c, 1, 1).expand(c, h, w.shape[2])
        sl = slice(start, start + c)
        qs = slice(0, w.shape[2])

        def put(key: str, value: Tensor, sl: slice = sl, qs: slice = qs, valid: Tensor = valid) -> None:
            v = value.double().numpy().copy()
            v[~valid.numpy()] = np.nan
            dist[key][sl, :, qs] = v

        put("normalized_entropy", sg.normalized_entropy(w, nn_))
        put("effective_count", sg.effective_count(w))
        put("effective_fraction", sg.effective_fraction(w, nn_))
        put("max_weight", sg.max_weight(w, nn_))
        put("topk_mass", sg.topk_mass(w, topk, nn_))
        put("gini", sg.gini(w, nn_))
        put("position_centroid", sg.position_centroid(w, nn_))
        if w.shape[-1]:
            arg = w.argmax(-1)
            put("argmax", arg.double())
            top = w.amax(-1)
            distinct = top >= 2.0 / nn_.clamp_min(1)  # a clear top, not a near-tie among near-uniform weights
            big = (nn_ >= position_min_size) & valid
            first = w[..., 0] >= top
            last = w.gather(-1, (nn_ - 1).clamp_min(0).long().unsqueeze(-1)).squeeze(-1) >= top
            put("top_first", (first & distinct).double(), valid=big)
            put("top_last", (last & distinct).double(), valid=big)

        flat_valid = valid.reshape(-1)
        fw = w.reshape(-1, w.shape[-1])[flat_valid]
        fn = nn_.reshape(-1)[flat_valid]
        for key, from_end in (("first", False), ("last", True)):
            lift, cnt = sg.position_lift(fw, fn, max_positions, from_end=from_end)
            got = cnt.numpy() > 0
            lift_sum[key][got] += lift.double().numpy()[got] * cnt.numpy()[got]
            lift_cnt[key] += cnt.numpy()
        rel = sg.relative_position_lift(fw, fn, bins, reduce=False).double().numpy()
        rel_sum += np.nansum(rel, 0)
        rel_cnt += (~np.isnan(rel)).sum(0)
        if h >= 2:
            hv = (qvalid & (n >= 2).unsqueeze(1))  # [C, Q]
            pairs = w.permute(0, 2, 1, 3)[hv]  # [M, H, L]
            if pairs.shape[0]:
                red_sum += sg.head_redundancy(pairs).double().numpy() * pairs.shape[0]
                red_cnt += pairs.shape[0]
        if w.shape[2] >= 2:
            sens = sg.query_sensitivity(w, qvalid.unsqueeze(1).expand(c, h, -1))  # [C, H]
            sens = torch.where((n >= 2).unsqueeze(1), sens, torch.full((), float("nan"), dtype=sens.dtype))
            sens_set[sl] = sens.double().numpy()

    # the same set (by id) pooled under other queries in other calls
    groups: dict[str, list[Tensor]] = {}
    for call, i, w in sets:
        if call.set_ids is not None:
            groups.setdefault(call.set_ids[i], []).append(w)
    group_sens = []
    for ws in groups.values():
        if len(ws) < 2 or len({tuple(w.shape[::2]) for w in ws}) != 1 or ws[0].shape[-1] < 2:
            continue
        stacked = torch.cat(ws, dim=1)  # [H, sum Q, L]
        group_sens.append(float(_nanmean(sg.query_sensitivity(stacked).double().numpy())))

    per_set = {k: _nanmean(dist[k].reshape(s, -1), axis=1) if s else np.zeros(0) for k in PER_SET}
    per_set["query_sensitivity"] = _nanmean(sens_set, axis=1) if s else np.zeros(0)
    means = {k: float(_nanmean(dist[k])) for k in PER_SET}
    means["mass_first"] = float(lift_sum["first"][0] / lift_cnt["first"][0]) if lift_cnt["first"][0] else math.nan
    uniform = dist["normalized_entropy"] >= uniform_entropy
    one_hot = dist["max_weight"] >= one_hot_weight
    informative = ~np.isnan(dist["normalized_entropy"])  # n >= 2

    def share(mask: np.ndarray, axis: Any = None) -> Any:
        num = (mask & informative).sum(axis=axis)
        den = informative.sum(axis=axis)
        with np.errstate(all="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    per_head = {
        "normalized_entropy": _nanmean(dist["normalized_entropy"].transpose(1, 0, 2).reshape(h, -1), 1).tolist()
        if s else [],
        "effective_fraction": _nanmean(dist["effective_fraction"].transpose(1, 0, 2).reshape(h, -1), 1).tolist()
        if s else [],
        "uniform_share": share(uniform, (0, 2)).tolist() if s else [],
        "one_hot_share": share(one_hot, (0, 2)).tolist() if s else [],
        "top_first_rate": _nanmean(dist["top_first"].transpose(1, 0, 2).reshape(h, -1), 1).tolist() if s else [],
        "top_last_rate": _nanmean(dist["top_last"].transpose(1, 0, 2).reshape(h, -1), 1).tolist() if s else [],
    }

    # near one-hot on the same index across inputs, per (head, query)
    same_index = []
    for hh in range(h):
        for qq in range(qmax):
            top_index = dist["argmax"][:, hh, qq]
            counted = ~np.isnan(dist["normalized_entropy"][:, hh, qq])
            total = int(counted.sum())
            if total == 0:
                continue
            values, counts = np.unique(top_index[counted].astype(np.int64), return_counts=True)
            same_index.append({"head": hh, "query": qq, "index": int(values[counts.argmax()]),
                               "share": float(counts.max() / total),
                               "one_hot_share": float((one_hot[:, hh, qq] & counted).sum() / total),
                               "sets": total})

    large = sizes >= position_min_size
    position = {
        "lift_first": _ratio(lift_sum["first"], lift_cnt["first"]),
        "lift_last": _ratio(lift_sum["last"], lift_cnt["last"]),
        "count_first": lift_cnt["first"].astype(int).tolist(),
        "relative_lift": _ratio(rel_sum, rel_cnt),
        "top_first_rate": float(_nanmean(dist["top_first"])),
        "top_last_rate": float(_nanmean(dist["top_last"])),
        "chance_rate": float(np.mean(1.0 / sizes[large])) if large.any() else math.nan,
        "centroid": means["position_centroid"],
    }
    collapse = {"uniform_share": float(share(uniform)) if s else math.nan,
                "one_hot_share": float(share(one_hot)) if s else math.nan,
                "same_index": same_index}
    sens_values = [v for v in _nanmean(sens_set, axis=1).tolist() if not math.isnan(v)] if s and qmax >= 2 else []
    query_sensitivity = {
        "within_call": float(np.mean(sens_values)) if sens_values else math.nan,
        "within_call_sets": len(sens_values),
        "across_calls": float(np.mean(group_sens)) if group_sens else math.nan,
        "across_call_sets": len(group_sens),
    }
    both = sens_values + group_sens
    query_sensitivity["mean"] = float(np.mean(both)) if both else math.nan
    leak = [c.leaked for c in calls]
    err = [c.sum_error for c in calls]
    leakage = {"max_masked_mass": float(torch.cat(leak).max()) if leak and s else 0.0,
               "max_sum_error": float(torch.cat(err).max()) if err and s else 0.0}

    labeled = [x for x in sets if x[0].labels is not None and x[2].shape[-1] >= 2]
    chosen = (labeled or [x for x in sets if x[2].shape[-1] >= 2])[:num_examples]
    examples = [Example(c.call, i, w, None if c.labels is None else c.labels[i]) for c, i, w in chosen]

    return ModuleSummary(
        name=name, module_type=calls[0].module_type if calls else "", layouts=sorted({c.layout for c in calls}),
        num_calls=len(calls), num_sets=s, num_heads=h, num_queries=qmax,
        self_attention=any(c.self_attention for c in calls), training_calls=sum(c.training for c in calls),
        skipped_sets=skipped_sets, topk=topk, sizes=sizes, means=means, per_set=per_set, per_head=per_head,
        position=position, collapse=collapse,
        redundancy=(red_sum / red_cnt).tolist() if red_cnt else np.full((h, h), np.nan).tolist(),
        query_sensitivity=query_sensitivity, leakage=leakage, examples=examples)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float]:
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan).tolist()


def summarize(recording: Recording, **options: Any) -> dict[str, ModuleSummary]:
    """:func:`summarize_module` for every module of ``recording``, in the order of their first call."""
    return {name: summarize_module(name, recording.calls_of(name),
                                   skipped_sets=recording.skipped_sets.get(name, 0), **options)
            for name in recording.module_names}
