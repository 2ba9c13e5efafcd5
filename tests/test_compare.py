"""The comparison harness: bootstrap intervals that cover the truth, paired differences, resumable state."""

import json
import math
import os

import numpy as np
import pytest
import torch

from attnpool import compare as cmp
from attnpool.compare import POOLINGS, compare, load_runs, make_pooling, summarize_runs
from attnpool.nn import MeanPool


def simulated(n: int, data_seed: int, shift: float):
    """Per-example scores of two poolings sharing each example's difficulty z: baseline z + e, the other
    z + shift + e'. True means 0 and ``shift``; the paired difference has a tenth of the spread."""
    rng = np.random.default_rng(data_seed)
    z = rng.normal(0, 1, n)
    noise = {"mean": rng.normal(0, 0.1, n), "attention": rng.normal(0, 0.1, n)}

    def pipeline(pool, seed):
        name = "mean" if isinstance(pool, MeanPool) else "attention"
        return z + noise[name] + (shift if name == "attention" else 0.0)

    return pipeline


def test_intervals_cover_the_true_means_and_difference_at_their_nominal_rate():
    covered = {"mean": 0, "attention": 0, "diff": 0}
    reps = 150
    for rep in range(reps):
        res = compare(simulated(200, rep, 0.05), ["mean", "attention"], dim=4, n_boot=500, progress=False,
                      bootstrap_seed=rep)
        covered["mean"] += res.results["mean"].ci[0] <= 0.0 <= res.results["mean"].ci[1]
        covered["attention"] += res.results["attention"].ci[0] <= 0.05 <= res.results["attention"].ci[1]
        d = res.differences["attention"]
        covered["diff"] += d.ci[0] <= 0.05 <= d.ci[1]
    for key, hits in covered.items():
        assert 0.88 <= hits / reps <= 0.995, (key, hits / reps)


def test_pairing_cancels_the_shared_difficulty():
    res = compare(simulated(400, 0, 0.05), ["mean", "attention"], dim=4, n_boot=1000, progress=False)
    d = res.differences["attention"]
    width_diff = d.ci[1] - d.ci[0]
    width_each = res.results["mean"].ci[1] - res.results["mean"].ci[0]
    assert width_diff < width_each / 5  # unpaired, the difference would be wider than either interval
    assert d.significant and d.prob_better > 0.99 and d.value == pytest.approx(0.05, abs=0.02)
    assert res.baseline == "mean" and "attention" in res.to_markdown()


def counting_pipeline(log, stop_after=None):
    def pipeline(pool, seed):
        if stop_after is not None and len(log) == stop_after:
            raise KeyboardInterrupt
        log.append((type(pool).__name__, seed))
        g = np.random.default_rng(seed + 17 * len(type(pool).__name__))
        return (g.random(50) < 0.7).astype(float)

    return pipeline


def test_resumes_after_an_interruption_without_redoing_finished_runs(tmp_path):
    state = tmp_path / "runs.json"
    first: list = []
    with pytest.raises(KeyboardInterrupt):
        compare(counting_pipeline(first, stop_after=3), ["mean", "max", "attention"], dim=4, seeds=[0, 1],
                state=state, progress=False)
    assert len(first) == 3 and sorted(load_runs(state)) == ["max@0", "mean@0", "mean@1"]
    second: list = []
    resumed = compare(counting_pipeline(second), ["mean", "max", "attention"], dim=4, seeds=[0, 1], state=state,
                      progress=False)
    assert second == [("MaxPool", 1), ("AttentionPool", 0), ("AttentionPool", 1)]
    fresh = compare(counting_pipeline([]), ["mean", "max", "attention"], dim=4, seeds=[0, 1], progress=False)
    assert resumed.to_dict() | {"results": None} == fresh.to_dict() | {"results": None}
    assert {n: r.value for n, r in resumed.results.items()} == {n: r.value for n, r in fresh.results.items()}
    third: list = []
    compare(counting_pipeline(third), ["mean", "max", "attention"], dim=4, seeds=[0, 1], state=state, progress=False)
    assert third == []  # everything finished: nothing runs


def test_a_leftover_or_corrupted_temp_file_is_ignored(tmp_path):
    state = tmp_path / "runs.json"
    compare(counting_pipeline([]), ["mean"], dim=4, state=state, progress=False)
    garbage = tmp_path / ".runs.json.x1y2.tmp"
    garbage.write_bytes(b'{"format": "attnpool.compare/1", "runs": {"mean@0": {"val')  # a write cut short
    log: list = []
    compare(counting_pipeline(log), ["mean", "max"], dim=4, state=state, progress=False)
    assert log == [("MaxPool", 0)] and not garbage.exists()
    assert sorted(load_runs(state)) == ["max@0", "mean@0"]


def test_a_write_killed_midway_leaves_the_previous_state_intact(tmp_path, monkeypatch):
    state = tmp_path / "runs.json"
    compare(counting_pipeline([]), ["mean"], dim=4, state=state, progress=False)
    before = state.read_bytes()
    real_dump = json.dump

    def dump_then_die(obj, fh, **kw):
        fh.write(json.dumps(obj, **kw)[:40])  # part of the file reaches the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        compare(counting_pipeline([]), ["mean", "max"], dim=4, state=state, progress=False)
    monkeypatch.setattr(cmp.json, "dump", real_dump)
    assert state.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    log: list = []
    compare(counting_pipeline(log), ["mean", "max"], dim=4, state=state, progress=False)
    assert log == [("MaxPool", 0)]


def test_a_corrupted_state_file_is_reported_and_left_alone(tmp_path):
    state = tmp_path / "runs.json"
    state.write_text("{not json")
    with pytest.raises(ValueError, match=r"state: .* is not valid JSON"):
        compare(counting_pipeline([]), ["mean"], dim=4, state=state, progress=False)
    assert state.read_text() == "{not json"
    state.write_text(json.dumps({"format": "other", "runs": {}}))
    with pytest.raises(ValueError, match=r"not an attnpool\.compare state file"):
        load_runs(state)


def test_non_decomposable_metric_and_several_seeds():
    rng = np.random.default_rng(0)
    targets = (rng.random(300) < 0.5).astype(float)

    def pipeline(pool, seed):
        flip = np.random.default_rng(seed).random(300) < (0.2 if isinstance(pool, MeanPool) else 0.1)
        return targets, np.where(flip, 1 - targets, targets)

    def accuracy(t, p):
        return float(np.mean(t == p))

    res = compare(pipeline, ["mean", "max"], dim=4, seeds=[0, 1, 2], metric=accuracy, metric_name="accuracy",
                  n_boot=300, progress=False)
    assert res.results["mean"].value == pytest.approx(0.8, abs=0.04)
    assert res.results["max"].value == pytest.approx(0.9, abs=0.04)
    assert res.differences["max"].ci[0] > 0 and len(res.results["max"].per_seed) == 3
    json.loads(res.to_json())


def test_lower_is_better_flips_prob_better():
    res = compare(simulated(200, 1, 0.3), ["mean", "attention"], dim=4, higher_is_better=False, n_boot=300,
                  progress=False)
    assert res.differences["attention"].prob_better < 0.01


def test_every_named_pooling_pools_ragged_sets_to_vectors():
    sets = [torch.randn(n, 8) for n in (3, 1, 5)]
    for name in POOLINGS:
        out = make_pooling(name, 8)(sets)
        assert out.shape == (3, 8), name
    with pytest.raises(ValueError, match="name: expected one of"):
        make_pooling("median", 8)


def test_the_pooling_is_built_after_seeding():
    seen = []

    def pipeline(pool, seed):
        seen.append(pool.query.detach().clone())
        return [1.0, 0.0]

    compare(pipeline, ["attention"], dim=4, seeds=[3], progress=False)
    compare(pipeline, ["attention"], dim=4, seeds=[3], progress=False)
    assert torch.equal(seen[0], seen[1])


def test_progress_is_shown(capsys, monkeypatch):
    compare(counting_pipeline([]), ["mean", "max"], dim=4, progress=True)
    err = capsys.readouterr().err
    assert "max@0" in err or "2/2" in err
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)  # tqdm missing: plain lines
    compare(counting_pipeline([]), ["mean", "max"], dim=4, progress=True)
    assert "[2/2] max@0" in capsys.readouterr().err


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dim: naming poolings needs"):
        compare(counting_pipeline([]), ["mean"], progress=False)
    with pytest.raises(ValueError, match="poolings: unknown pooling 'median'"):
        compare(counting_pipeline([]), ["median"], dim=4, progress=False)
    with pytest.raises(ValueError, match="baseline: expected one of"):
        compare(counting_pipeline([]), ["mean"], dim=4, baseline="max", progress=False)
    with pytest.raises(ValueError, match="seeds: expected distinct seeds"):
        compare(counting_pipeline([]), ["mean"], dim=4, seeds=[1, 1], progress=False)
    with pytest.raises(ValueError, match="pipeline: expected finite per-example values"):
        compare(lambda pool, seed: [1.0, math.nan], ["mean"], dim=4, progress=False)
    with pytest.raises(ValueError, match="every run must evaluate the same examples"):
        compare(lambda pool, seed: [1.0] * (2 + seed), ["mean"], dim=4, seeds=[0, 1], progress=False)


def test_summarize_partial_runs_and_plot(tmp_path):
    state = tmp_path / "runs.json"
    with pytest.raises(KeyboardInterrupt):
        compare(counting_pipeline([], stop_after=3), ["mean", "max"], dim=4, seeds=[0, 1], state=state,
                progress=False)
    res = summarize_runs(load_runs(state), ["mean", "max"], seeds=[0, 1], baseline="mean")
    assert res.missing == ["max@1"] and res.results["max"].seeds == [0]
    assert "Not finished: max@1" in res.to_markdown()
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib")
    res.plot(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.getsize(tmp_path / "chart.png") > 1000
