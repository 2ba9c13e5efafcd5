"""Synthetic sets with known behaviour trigger the right alerts, and only those."""

import pytest
import torch

from attnpool.diagnostics import RULES, Thresholds, analyze, capture
from attnpool.nn import AttentionPool
from tests.conftest import batch_from_sets
from tests.diagnostics.scripted import ScriptedPool, content_softmax, random_sets


def run(rule, sets, layout="packed", **kw):
    pool = ScriptedPool(rule)
    batch = batch_from_sets(sets, sets[0].shape[1], fill=0.0)
    with capture(pool) as rec:
        for start in range(0, len(sets), 16):  # several batches
            part = batch_from_sets(sets[start:start + 16], sets[0].shape[1], fill=0.0)
            if layout == "packed":
                pool(part.packed, offsets=part.offsets)
            else:
                pool(part.padded, part.mask)
    del batch
    return analyze(rec, **kw)


def hq(*rows):
    return torch.stack(rows).unsqueeze(1)  # [H, 1, n]


def uniform(x):
    return torch.full((x.shape[0],), 1.0 / x.shape[0])


def first_biased(x, at_end=False):
    rest = 0.6 * content_softmax(x[1:] if not at_end else x[:-1], scale=1.0)
    head = torch.tensor([0.4])
    return torch.cat([rest, head]) if at_end else torch.cat([head, rest])


def fixed_index(x, index=2):
    w = torch.full((x.shape[0],), 0.03 / (x.shape[0] - 1))
    w[index] = 0.97
    return w


SETS = random_sets(48)

CASES = {
    "healthy": (lambda x: hq(content_softmax(x)), set()),
    "uniform": (lambda x: hq(uniform(x)), {"collapse.uniform"}),
    "same index": (lambda x: hq(fixed_index(x)), {"collapse.same_index"}),
    "always first": (lambda x: hq(first_biased(x)), {"position.first"}),
    "always last": (lambda x: hq(first_biased(x, at_end=True)), {"position.last"}),
    "one-hot, varying index": (lambda x: hq(content_softmax(x, scale=60.0)), {"concentration.one_hot"}),
    "redundant heads": (lambda x: hq(content_softmax(x), content_softmax(x), content_softmax(x, feature=1)),
                        {"heads.redundant"}),
    "dead head": (lambda x: hq(content_softmax(x), uniform(x)), {"heads.dead"}),
    "distinct heads": (lambda x: hq(content_softmax(x), content_softmax(x, feature=1)), set()),
    "query-insensitive": (lambda x: content_softmax(x).expand(1, 3, -1), {"queries.insensitive"}),
    "query-sensitive": (lambda x: torch.stack([content_softmax(x, feature=f) for f in range(3)]).unsqueeze(0),
                        set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_case_raises_exactly_its_alerts(case):
    rule, expected = CASES[case]
    report = run(rule, SETS)
    assert report.codes == expected, [str(a) for a in report.alerts]


@pytest.mark.parametrize("case", ["always first", "always last", "uniform"])
def test_padded_input_gives_the_same_alerts(case):
    rule, expected = CASES[case]
    assert run(rule, SETS, layout="padded").codes == expected


def test_alert_details_name_heads_and_thresholds():
    report = run(CASES["always first"][0], SETS)
    (alert,) = report.alerts
    assert alert.severity == "warning" and alert.threshold == 0.8 and alert.value >= 0.8 and alert.heads == [0]
    assert alert.rule is RULES["position.first"] and alert.to_dict()["fix"]
    same = run(CASES["same index"][0], SETS).alerts[0]
    assert "index 2" in same.message and same.value == 1.0
    redundant = run(CASES["redundant heads"][0], SETS).alerts[0]
    assert redundant.heads == [0, 1] and redundant.value < 1e-6
    dead = run(CASES["dead head"][0], SETS).alerts[0]
    assert dead.heads == [1]


def test_thresholds_are_configurable_and_few_sets_skip_dataset_alerts():
    rule = CASES["always first"][0]
    assert run(rule, SETS, thresholds=Thresholds(position_share=1.01)).codes == set()
    assert run(CASES["uniform"][0], SETS[:10]).codes == {"few_sets"}


def test_every_alert_has_a_documented_rule():
    for code, rule in RULES.items():
        assert rule.severity in ("critical", "warning", "info"), code
        assert rule.cause and rule.fix and rule.title, code
    import attnpool.diagnostics.alerts as alerts

    for code in RULES:
        assert f"``{code}``" in alerts.__doc__, code


def test_real_modules_untrained_query_collapses_to_the_mean_and_a_zero_head_is_dead():
    torch.manual_seed(0)
    sets = random_sets(40, dim=8)
    flat = AttentionPool(8)
    half = AttentionPool(8, num_heads=2)
    with torch.no_grad():
        flat.query.zero_()  # all scores 0: exactly uniform weights
        half.query[:, 4:] = 0  # head 1 scores all 0
        half.query[:, :4] *= 20  # head 0 sharp
    with torch.no_grad(), capture(torch.nn.ModuleDict({"flat": flat, "split": half})) as rec:
        flat(sets)
        half(sets)
    report = analyze(rec)
    assert {a.code for a in report.alerts_of("flat")} == {"collapse.uniform"}
    assert {(a.code, tuple(a.heads)) for a in report.alerts_of("split")} == {("heads.dead", (1,))}


def test_real_module_whose_query_projection_collapsed_is_query_insensitive_across_calls():
    torch.manual_seed(0)
    sets = random_sets(24, dim=8)
    ids = [f"set{i}" for i in range(len(sets))]
    healthy = AttentionPool(8, num_queries=0, query_proj=True, key_proj=True)
    broken = AttentionPool(8, num_queries=0, query_proj=True, key_proj=True)
    with torch.no_grad():
        healthy.query_proj.weight.mul_(10)
        broken.query_proj.weight.zero_()  # every query projects to the bias: the query is ignored
        broken.query_proj.bias.normal_(0, 3)
    model = torch.nn.ModuleDict({"healthy": healthy, "broken": broken})
    with torch.no_grad(), capture(model) as rec:
        for _ in range(3):  # the same sets, a new question each time
            question = torch.randn(8)
            rec.label(set_ids=ids)
            healthy(sets, query=question)
            broken(sets, query=question)
    report = analyze(rec)
    assert report.modules["broken"].query_sensitivity["across_call_sets"] == 24
    assert report.modules["broken"].query_sensitivity["mean"] < 1e-6
    assert report.modules["healthy"].query_sensitivity["mean"] > 0.1
    assert {a.code for a in report.alerts_of("broken")} == {"queries.insensitive"}
    assert "queries.insensitive" not in {a.code for a in report.alerts_of("healthy")}
