"""attnpool repro kernel-regression: Nadaraya-Watson regression computed as attention pooling."""

from __future__ import annotations

import json

import pytest
import torch

from attnpool import cli
from attnpool.repro.kernel_regression import NadarayaWatson, make_data, nadaraya_watson_reference, train_width


@pytest.mark.parametrize("sigma", [1.0, 0.3, 2.5])
def test_attention_pooling_is_the_closed_form_estimate_float64(sigma):
    x_train, y_train, x_test, _ = make_data(50, seed=1)
    pred, w = NadarayaWatson(sigma)(x_test, x_train, y_train, return_weights=True)
    assert pred.dtype == torch.float64 and w.shape == (x_test.shape[0], 50)
    torch.testing.assert_close(pred, nadaraya_watson_reference(x_test, x_train, y_train, sigma),
                               rtol=1e-12, atol=1e-12)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(x_test.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_leave_one_out_never_sees_its_own_target():
    x_train, y_train, _, _ = make_data(20, seed=2)
    model = NadarayaWatson(0.5)
    pred, w = model(x_train, x_train, y_train, leave_one_out=True, return_weights=True)
    assert torch.equal(w.diagonal(), torch.zeros(20, dtype=torch.float64))
    torch.testing.assert_close(w.sum(-1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)
    for i in (0, 7, 19):
        keep = torch.arange(20) != i
        ref = nadaraya_watson_reference(x_train[i : i + 1], x_train[keep], y_train[keep], 0.5)
        torch.testing.assert_close(pred[i : i + 1], ref, rtol=1e-12, atol=1e-12)
    # a changed target moves every prediction but its own
    y2 = y_train.clone()
    y2[3] += 10.0
    pred2 = model(x_train, x_train, y2, leave_one_out=True)
    assert pred2[3] == pred[3] and (pred2 != pred).sum() == 19
    with pytest.raises(ValueError, match="x_query"):
        model(x_train[:5], x_train, y_train, leave_one_out=True)


def test_learned_width_lowers_the_training_loss():
    x_train, y_train, _, _ = make_data(50, seed=0)
    model = NadarayaWatson(1.0, learn_width=True)
    losses = train_width(model, x_train, y_train, steps=40, lr=0.05)
    assert losses[-1] < 0.9 * losses[0]
    assert model.sigma.item() < 1.0  # sigma = 1 oversmooths 2 sin(x): the fit narrows the kernel
    fixed = NadarayaWatson(1.0)
    assert list(fixed.parameters()) == []


def test_quick_run_through_the_cli(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "kr"
    assert cli.main(["repro", "kernel-regression", "--quick", "--out", str(out)]) == 0
    for f in ("results.md", "results.json", "kernel_regression.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    fixed, learned = res["fits"]
    assert fixed["sigma"] == 1.0 and learned["sigma"] != 1.0
    assert learned["loo_train_mse"] < fixed["loo_train_mse"]
