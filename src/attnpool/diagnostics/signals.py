r"""Signals of attention weights, as pure functions of weight tensors.

Every function takes weights ``w [..., L]`` over the last dim, one distribution per leading index, and optionally
``lengths`` (broadcastable to ``w.shape[:-1]``): the number of real elements ``n``, which sit at positions
``0 .. n-1`` (left-aligned; the positions ``>= n`` are padding and must hold weight 0). Without ``lengths``,
``n = L``. Values that are undefined (the entropy of a set of fewer than two elements, anything of an empty set) are
NaN, so that callers average them with ``nanmean``.

For a distribution ``a`` over ``n`` elements:

=============================  ======================================  =========================  =====================
signal                         formula                                 uniform                    one-hot
=============================  ======================================  =========================  =====================
normalized entropy             :math:`-\sum a_i \log a_i / \log n`      1                          0
effective count                :math:`1 / \sum a_i^2`                   n                          1
effective fraction             effective count / n                     1                          1/n
max weight                     :math:`\max_i a_i`                       1/n                        1
top-k mass                     sum of the k largest weights            min(k, n)/n                1
Gini coefficient               :math:`\sum_{ij}|a_i - a_j| / (2n)`      0                          1 - 1/n
=============================  ======================================  =========================  =====================

Two distributions are compared with the Jensen–Shannon divergence in bits (0 for identical, 1 for disjoint
support); several (the queries over one set) with its generalization ``H(mean) - mean(H)``, in bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "effective_count",
    "effective_fraction",
    "entropy",
    "gini",
    "head_redundancy",
    "js_divergence",
    "max_weight",
    "normalized_entropy",
    "position_centroid",
    "position_lift",
    "query_sensitivity",
    "relative_position_lift",
    "set_sizes",
    "topk_mass",
]

_LN2 = math.log(2.0)


def set_sizes(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    """``n`` for every distribution of ``w [..., L]``, as a float tensor of shape ``w.shape[:-1]``."""
    if lengths is None:
        return torch.full(w.shape[:-1], float(w.shape[-1]), dtype=w.dtype, device=w.device)
    n = torch.as_tensor(lengths, device=w.device).to(w.dtype)
    return n.expand(w.shape[:-1]) if n.dim() <= w.dim() - 1 else n


def _nan(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, torch.full((), float("nan"), dtype=x.dtype, device=x.device))


def entropy(w: Tensor) -> Tensor:
    """Shannon entropy in nats, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(w, w).sum(-1)


def normalized_entropy(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    """Entropy over ``log n``: 1 for uniform weights, 0 for one-hot; NaN for ``n < 2``."""
    n = set_sizes(w, lengths)
    return _nan(entropy(w) / n.clamp_min(2).log(), n >= 2)


def effective_count(w: Tensor) -> Tensor:
    """``1 / sum(a^2)``, the number of elements that carry the mass (the inverse Simpson index); NaN when empty."""
    s = (w * w).sum(-1)
    return _nan(1.0 / s.clamp_min(torch.finfo(w.dtype).tiny), s > 0)


def effective_fraction(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    """:func:`effective_count` over the set size ``n``: 1 for uniform weights, ``1/n`` for one-hot."""
    n = set_sizes(w, lengths)
    return effective_count(w) / n


def max_weight(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    """The largest weight; NaN for an empty set."""
    n = set_sizes(w, lengths)
    if w.shape[-1] == 0:
        return torch.full(w.shape[:-1], float("nan"), dtype=w.dtype, device=w.device)
    return _nan(w.amax(-1), n >= 1)


def topk_mass(w: Tensor, k: int, lengths: Tensor | int | None = None) -> Tensor:
    """The total weight of the ``k`` largest weights (all of it when ``n <= k``); NaN for an empty set."""
    if k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    n = set_sizes(w, lengths)
    k = min(k, w.shape[-1])
    mass = w.topk(k, dim=-1).values.sum(-1) if k else w.sum(-1)
    return _nan(mass, n >= 1)


def gini(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    r"""The Gini coefficient of the ``n`` real weights, :math:`\sum_{i,j} |a_i - a_j| / (2 n \sum_i a_i)`.

    0 for uniform weights, ``1 - 1/n`` for one-hot (the usual finite-sample definition); NaN for an empty set.
    Computed from the sorted weights: :math:`G = \frac{2 \sum_r r\, a_{(r)}}{n \sum a} - \frac{n + 1}{n}`.
    """
    n = set_sizes(w, lengths)
    pos = torch.arange(w.shape[-1], device=w.device)
    real = pos < n.unsqueeze(-1)
    # padding goes last in the ascending sort, and is then set back to 0 so that it adds nothing
    ordered = torch.where(real, w, torch.full((), float("inf"), dtype=w.dtype, device=w.device)).sort(-1).values
    ordered = torch.where(torch.isinf(ordered), torch.zeros((), dtype=w.dtype, device=w.device), ordered)
    ranks = torch.arange(1, w.shape[-1] + 1, dtype=w.dtype, device=w.device)
    total = ordered.sum(-1)
    g = 2 * (ranks * ordered).sum(-1) / (n.clamp_min(1) * total.clamp_min(torch.finfo(w.dtype).tiny)) - (n + 1) / n
    return _nan(g, (n >= 1) & (total > 0))


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence in bits between distributions over the last dim: 0 identical, 1 disjoint."""
    m = 0.5 * (p + q)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / _LN2).clamp_min(0)


def query_sensitivity(w: Tensor, valid: Tensor | None = None) -> Tensor:
    """How much the weights over one set change across queries: the generalized Jensen–Shannon divergence
    ``H(mean_q a_q) - mean_q H(a_q)`` in bits over the query dim (``w [..., Q, L]``, result ``[...]``).

    0 when every query gives the same weights; for two queries it is :func:`js_divergence`. ``valid [..., Q]``
    leaves out some queries; NaN where fewer than two are valid.
    """
    if valid is None:
        valid = torch.ones(w.shape[:-1], dtype=torch.bool, device=w.device)
    v = valid.to(w.dtype)
    count = v.sum(-1)
    mean = (w * v.unsqueeze(-1)).sum(-2) / count.clamp_min(1).unsqueeze(-1)
    mean_h = (entropy(w) * v).sum(-1) / count.clamp_min(1)
    return _nan(((entropy(mean) - mean_h) / _LN2).clamp_min(0), count >= 2)


def head_redundancy(w: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean Jensen–Shannon divergence (bits) between every pair of heads: ``w [..., H, L]`` gives ``[H, H]``,
    averaged over the leading dims (where ``valid [...]``, if given). 0 on the diagonal; a small off-diagonal value
    means two heads attend alike."""
    h = w.shape[-2]
    out = torch.zeros(h, h, dtype=w.dtype, device=w.device)
    keep = None if valid is None else valid.reshape(-1)
    flat = w.reshape(-1, h, w.shape[-1])
    if keep is not None:
        flat = flat[keep]
    for i in range(h):
        for j in range(i + 1, h):
            d = js_divergence(flat[:, i], flat[:, j])
            out[i, j] = out[j, i] = d.mean() if d.numel() else float("nan")
    return out


def position_lift(w: Tensor, lengths: Tensor | int | None = None, max_positions: int = 16,
                  from_end: bool = False) -> tuple[Tensor, Tensor]:
    """Mass at each absolute position relative to uniform weights: ``E[n · a_k]`` over the distributions whose set
    has a position ``k``, for ``k < max_positions`` (from the end when ``from_end``: recency).

    1 means no bias; ``n`` at ``k = 0`` means all the mass on the first element. Returns ``(lift [K], count [K])``,
    the lift NaN where no set reaches position ``k``.
    """
    n = set_sizes(w, lengths).reshape(-1)
    flat = w.reshape(-1, w.shape[-1])
    k = min(max_positions, flat.shape[-1])
    lift = torch.full((max_positions,), float("nan"), dtype=w.dtype, device=w.device)
    count = torch.zeros(max_positions, dtype=torch.long, device=w.device)
    for pos in range(k):
        has = n > pos
        if not bool(has.any()):
            continue
        idx = (n[has] - 1 - pos).long() if from_end else torch.full_like(n[has], pos).long()
        a = flat[has].gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        lift[pos] = (a * n[has]).mean()
        count[pos] = int(has.sum())
    return lift, count


def relative_position_lift(w: Tensor, lengths: Tensor | int | None = None, bins: int = 10,
                           reduce: bool = True) -> Tensor:
    """Mass in each of ``bins`` equal slices of relative position ``i / n`` over its share of the elements, for the
    distributions of sets with ``n >= 2``: 1 everywhere for uniform weights.

    Returns the mean over those distributions, ``[bins]`` (a bin no set reaches is NaN), or with ``reduce=False``
    one row per such distribution, ``[M, bins]`` (NaN where a set has no element in a bin).
    """
    n = set_sizes(w, lengths).reshape(-1)
    flat = w.reshape(-1, w.shape[-1])
    keep = n >= 2
    flat, n = flat[keep], n[keep]
    nan = torch.full((), float("nan"), dtype=w.dtype, device=w.device)
    pos = torch.arange(flat.shape[-1], dtype=w.dtype, device=w.device)
    b = (pos.unsqueeze(0) * bins / n.unsqueeze(-1)).floor().long().clamp_max(bins - 1)  # [M, L]
    real = (pos.unsqueeze(0) < n.unsqueeze(-1)).to(w.dtype)
    mass = torch.zeros(flat.shape[0], bins, dtype=w.dtype, device=w.device).scatter_add(1, b, flat * real)
    share = torch.zeros_like(mass).scatter_add(1, b, real) / n.unsqueeze(-1)
    rows = torch.where(share > 0, mass / share.clamp_min(1e-12), nan)
    if not reduce:
        return rows
    if rows.shape[0] == 0:
        return nan.expand(bins).clone()
    counts = (~rows.isnan()).sum(0)
    return torch.where(counts > 0, rows.nan_to_num(0.0).sum(0) / counts.clamp_min(1), nan)


def position_centroid(w: Tensor, lengths: Tensor | int | None = None) -> Tensor:
    """The weighted mean relative position ``sum_i a_i · i / (n - 1)``: 0.5 for uniform weights, 0 for all the
    mass on the first element, 1 on the last; NaN for ``n < 2``."""
    n = set_sizes(w, lengths)
    pos = torch.arange(w.shape[-1], dtype=w.dtype, device=w.device)
    c = (w * pos).sum(-1) / (n - 1).clamp_min(1)
    return _nan(c, n >= 2)
