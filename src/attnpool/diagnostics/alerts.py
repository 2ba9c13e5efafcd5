"""Alerts: each a documented threshold on a signal, a severity, the likely cause and the usual fix.

Severities: ``critical`` (the weights are wrong: a correctness bug), ``warning`` (a failure mode of the pooling
that usually costs accuracy or makes the weights misleading), ``info`` (worth knowing, often intended).

A distribution (one set, head and query) is *near-uniform* when its normalized entropy is at least
``uniform_entropy`` (0.98), *near one-hot* when its largest weight is at least ``one_hot_weight`` (0.9). Shares
count only sets with at least two elements. Data-set level alerts need ``min_sets`` (20) such sets.

=======================  ========  ============================================================================
code                     severity  fires when (default thresholds, all in :class:`Thresholds`)
=======================  ========  ============================================================================
``leakage``              critical  some set puts more than ``leak_tolerance`` (0) of its mass on masked positions
``unnormalized``         critical  a non-empty set's weights sum to 1 ± more than ``sum_tolerance`` (1e-3)
``collapse.uniform``     warning   every head is near-uniform on at least ``uniform_share`` (90%) of the sets
``collapse.same_index``  warning   for some head and query, at least ``one_hot_share`` (90%) of the sets are near
                                   one-hot and at least ``same_index_share`` (90%) put their top on one index
``position.first``       warning   for some head, at least ``position_share`` (80%) of the sets with at least
                                   ``position_min_size`` (3) elements have their clear top (at least twice the
                                   uniform weight) on the first element
``position.last``        warning   the same on the last element (recency)
``heads.dead``           warning   some heads, not all, are near-uniform on at least ``uniform_share`` of the sets
``heads.redundant``      warning   two heads that are not near-uniform have a mean Jensen–Shannon divergence
                                   below ``redundant_jsd`` (0.02 bits)
``queries.insensitive``  warning   with several queries over the same sets (on at least ``min_query_sets`` (5)
                                   sets), the mean generalized JS divergence across queries is below
                                   ``insensitive_jsd`` (0.02 bits), and the pooling has not collapsed to the mean
``faithfulness.low``     warning   removing the top-weighted elements changes the output less than
                                   ``faithfulness_ratio`` (1.25) times as much as removing random ones
``concentration.one_hot``  info    at least ``one_hot_share`` of all distributions are near one-hot, on varying
                                   indices (hard selection)
``few_sets``             info      fewer than ``min_sets`` sets with two or more elements: the data-set level
                                   alerts above are skipped
=======================  ========  ============================================================================

:data:`RULES` holds each code's severity, cause and fix. ``collapse.same_index`` supersedes the position alerts
of the same module (a fixed first index is reported once, as a collapse that names the position).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnpool.diagnostics.analysis import ModuleSummary
    from attnpool.diagnostics.faithfulness import Faithfulness

__all__ = ["RULES", "Alert", "Rule", "Thresholds", "check"]

SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Rule:
    severity: str
    title: str
    cause: str
    fix: str


RULES: dict[str, Rule] = {
    "leakage": Rule(
        "critical", "mass on masked elements",
        "the mask is bypassed: a custom score or pooling ignores it, or the mask has the wrong polarity "
        "(attnpool's masks are True = keep)",
        "pass mask with True = keep and let attnpool apply it; in a custom SetPool, pool with "
        "attnpool.functional"),
    "unnormalized": Rule(
        "critical", "weights of a set do not sum to 1",
        "mass crosses set boundaries (offsets or lengths that do not match the packed rows) or the weights are not "
        "a per-set softmax",
        "check offsets/lengths against the data; normalize with attnpool.functional.segment_softmax"),
    "collapse.uniform": Rule(
        "warning", "collapsed to mean pooling (near-uniform weights)",
        "the scores are almost constant within a set: the query or keys are tiny, the temperature is too high, or "
        "the query never trained (no gradient, too low a learning rate)",
        "check the query gets gradients, lower or learn the temperature; if it stays uniform, MeanPool does the "
        "same for less"),
    "collapse.same_index": Rule(
        "warning", "near one-hot on the same index for every input",
        "the scores are dominated by a position (a position embedding, a [CLS]/BOS token, an attention sink), not "
        "by content: the pooling copies one element",
        "mask special tokens out of the set, check position embeddings; compare with ClsPool/LastTokenPool"),
    "position.first": Rule(
        "warning", "always the first element",
        "a [CLS]/BOS token or the first position's embedding outscores the content (attention sink)",
        "mask the special token out of the set or pool it separately; compare with ClsPool"),
    "position.last": Rule(
        "warning", "always the last element (recency)",
        "an EOS token or the latest turn outscores the rest (recency bias)",
        "mask the EOS token; if recency is intended, compare with LastTokenPool"),
    "heads.dead": Rule(
        "warning", "dead heads (near-uniform while others are not)",
        "some heads' scores stay flat: more heads than the signal needs, or heads that get no gradient",
        "use fewer heads; check the per-head scale (1/sqrt(D/H)) and the query initialization"),
    "heads.redundant": Rule(
        "warning", "redundant heads (attend alike)",
        "more heads than distinct patterns in the data, or tied query/key slices",
        "reduce num_heads, or make the heads differ (separate projections, a diversity penalty)"),
    "queries.insensitive": Rule(
        "warning", "query-insensitive: the weights barely change across queries",
        "the keys decide the score alone (a key-only bias or a shared key component), or the query projection "
        "collapsed: context-sensitive pooling is wasted",
        "check the query reaches the score (query_proj gradients, normalization); if intended, one learned query "
        "costs less"),
    "faithfulness.low": Rule(
        "warning", "attention does not predict importance",
        "removing the most-attended elements changes the output no more than removing random ones: residual paths, "
        "later layers or near-equal values carry the prediction",
        "do not read these weights as explanations; verify with ablations, or pool without residual paths around "
        "the attention"),
    "concentration.one_hot": Rule(
        "info", "hard selection (near one-hot weights)",
        "one element per set carries the weight: often intended (key-instance MIL), but few elements get gradient",
        "if training stalls or overfits, raise or learn the temperature, or add an entropy bonus"),
    "few_sets": Rule(
        "info", "too few sets for data-set level alerts",
        "fewer sets with two or more elements were recorded than the alerts need to be reliable",
        "capture more batches (or lower Thresholds.min_sets)"),
}


@dataclass
class Thresholds:
    """The numbers behind the alerts; see the module docstring for what each one decides."""

    uniform_entropy: float = 0.98
    uniform_share: float = 0.9
    one_hot_weight: float = 0.9
    one_hot_share: float = 0.9
    same_index_share: float = 0.9
    position_share: float = 0.8
    position_min_size: int = 3
    redundant_jsd: float = 0.02
    insensitive_jsd: float = 0.02
    min_query_sets: int = 5
    leak_tolerance: float = 0.0
    sum_tolerance: float = 1e-3
    faithfulness_ratio: float = 1.25
    min_sets: int = 20


@dataclass
class Alert:
    code: str
    severity: str
    module: str
    message: str
    value: float | None = None
    threshold: float | None = None
    heads: list[int] = field(default_factory=list)

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(title=self.rule.title, cause=self.rule.cause, fix=self.rule.fix)
        return d

    def __str__(self) -> str:
        return f"[{self.severity}] {self.module}: {self.code}: {self.message}"


def _alert(code: str, module: str, message: str, value: float | None = None, threshold: float | None = None,
           heads: list[int] | None = None) -> Alert:
    return Alert(code, RULES[code].severity, module, message, value, threshold, heads or [])


def check(summary: ModuleSummary, thresholds: Thresholds | None = None,
          faithfulness: list[Faithfulness] | None = None) -> list[Alert]:
    """The alerts of one module's summary (and of its faithfulness results), most severe first."""
    t = thresholds or Thresholds()
    m = summary.name
    alerts: list[Alert] = []
    leak = summary.leakage["max_masked_mass"]
    if leak > t.leak_tolerance:
        alerts.append(_alert("leakage", m, f"up to {leak:.3g} of a set's weight sits on masked positions",
                             leak, t.leak_tolerance))
    err = summary.leakage["max_sum_error"]
    if err > t.sum_tolerance:
        alerts.append(_alert("unnormalized", m, f"a set's weights sum to 1 ± {err:.3g}", err, t.sum_tolerance))
    for f in faithfulness or []:
        if f.module == m and f.ratio == f.ratio and f.ratio < t.faithfulness_ratio:
            alerts.append(_alert(
                "faithfulness.low", m,
                f"removing the top-{f.k} elements changes the output {f.ratio:.2f}x as much as removing {f.k} "
                f"random ones (95% CI {f.ratio_ci[0]:.2f}-{f.ratio_ci[1]:.2f}, {f.num_sets} sets)",
                f.ratio, t.faithfulness_ratio))

    if summary.informative_sets < t.min_sets:
        alerts.append(_alert("few_sets", m, f"{summary.informative_sets} sets with two or more elements "
                                            f"(< {t.min_sets}): data-set level alerts skipped",
                             summary.informative_sets, t.min_sets))
        return _sorted(alerts)

    uniform_heads = [h for h, v in enumerate(summary.per_head["uniform_share"]) if v == v and v >= t.uniform_share]
    h_all = summary.num_heads
    collapsed = len(uniform_heads) == h_all and h_all > 0
    if collapsed:
        share = summary.collapse["uniform_share"]
        ent = summary.means["normalized_entropy"]
        alerts.append(_alert("collapse.uniform", m, f"{share:.0%} of the sets have near-uniform weights (mean "
                                                    f"normalized entropy {ent:.3f})", share, t.uniform_share,
                             uniform_heads))
    elif uniform_heads:
        alerts.append(_alert("heads.dead", m, f"head(s) {uniform_heads} of {h_all} are near-uniform",
                             len(uniform_heads), t.uniform_share, uniform_heads))

    fixed = [x for x in summary.collapse["same_index"]
             if x["one_hot_share"] >= t.one_hot_share and x["share"] >= t.same_index_share]
    if fixed:
        worst = max(fixed, key=lambda x: x["share"])
        where = {0: "the first element"}.get(worst["index"], f"index {worst['index']}")
        alerts.append(_alert("collapse.same_index", m,
                             f"{worst['share']:.0%} of the sets put a near one-hot weight on {where} (head "
                             f"{worst['head']}, query {worst['query']}; {len(fixed)} head/query pair(s) affected)",
                             worst["share"], t.same_index_share, sorted({x["head"] for x in fixed})))
    elif not collapsed:
        for code, key, what in (("position.first", "top_first_rate", "first"),
                                ("position.last", "top_last_rate", "last")):
            rates = summary.per_head[key]
            heads = [h for h, r in enumerate(rates) if r == r and r >= t.position_share]
            if heads:
                worst = max(rates[h] for h in heads)
                alerts.append(_alert(code, m, f"{worst:.0%} of the sets have their top weight on the {what} element "
                                              f"(chance {summary.position['chance_rate']:.0%}; head(s) {heads})",
                                     worst, t.position_share, heads))
        if summary.collapse["one_hot_share"] >= t.one_hot_share:
            share = summary.collapse["one_hot_share"]
            alerts.append(_alert("concentration.one_hot", m, f"{share:.0%} of the weight distributions are near "
                                                             "one-hot", share, t.one_hot_share))

    if h_all >= 2:
        live = [h for h in range(h_all) if h not in uniform_heads]
        red = summary.redundancy
        pairs = [(i, j, red[i][j]) for a, i in enumerate(live) for j in live[a + 1:]
                 if red[i][j] == red[i][j] and red[i][j] < t.redundant_jsd]
        if pairs:
            i, j, d = min(pairs, key=lambda p: p[2])
            alerts.append(_alert("heads.redundant", m, f"{len(pairs)} pair(s) of heads attend alike (heads {i} and "
                                                       f"{j}: JS divergence {d:.4f} bits)",
                                 d, t.redundant_jsd, sorted({x for p in pairs for x in p[:2]})))

    qs = summary.query_sensitivity
    measured = qs["within_call_sets"] + qs["across_call_sets"]
    if not collapsed and measured >= t.min_query_sets and qs["mean"] == qs["mean"] and qs["mean"] < t.insensitive_jsd:
        alerts.append(_alert("queries.insensitive", m, f"the weights over a set change by {qs['mean']:.4f} bits "
                                                       f"(generalized JS divergence) across queries ({measured} sets)",
                             qs["mean"], t.insensitive_jsd))
    return _sorted(alerts)


def _sorted(alerts: list[Alert]) -> list[Alert]:
    return sorted(alerts, key=lambda a: SEVERITIES.index(a.severity))
