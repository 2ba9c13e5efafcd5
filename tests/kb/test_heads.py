import pytest
import torch

from attnpool.kb.heads import HEAD_KINDS, build_head, doc_vectors, load_head, save_head, train_head
from attnpool.kb.methods import ChunkMatrix, mean_vectors


def toy(seed=0, docs=24, dim=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (docs,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    vectors = torch.nn.functional.normalize(torch.randn(int(offsets[-1]), dim, generator=g), dim=-1)
    chunks = ChunkMatrix(vectors, offsets)
    # each query is one (noisy) chunk of its document: the right pooling must favour that chunk over the mean
    positives = torch.randint(0, docs, (200,), generator=g)
    picks = offsets[positives] + (torch.rand(200, generator=g) * lengths[positives]).long()
    queries = torch.nn.functional.normalize(vectors[picks] + 0.3 * torch.randn(200, dim, generator=g), dim=-1)
    return chunks, queries, positives


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_heads_start_as_mean_pooling(kind):
    chunks, _, _ = toy()
    d = doc_vectors(build_head(kind, 16), chunks)
    mean = mean_vectors(chunks)
    if kind == "learned":
        torch.testing.assert_close(d, mean, atol=1e-6, rtol=0)
    else:  # the seeds (0.01-scale) break the symmetry between the k vectors: close to, not equal to, the mean
        assert (d - mean[:, None]).norm(dim=-1).max() < 0.2


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("hard_negatives", [False, True])
def test_training_leaves_the_mean_and_lowers_the_loss(kind, hard_negatives):
    chunks, queries, positives = toy()
    head = build_head(kind, 16)
    before = doc_vectors(head, chunks).detach()
    result = train_head(head, chunks, queries, positives, steps=60, batch_size=32, lr=1e-2, seed=0,
                        hard_negatives=hard_negatives)
    after = doc_vectors(head, chunks).detach()
    assert (after - before).abs().max() > 1e-2, "training did not move the document vectors"
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10


def test_save_and_load_round_trip(tmp_path):
    chunks, queries, positives = toy()
    head = build_head("multi", 16)
    train_head(head, chunks, queries, positives, steps=5)
    save_head(head, tmp_path / "heads" / "multi", model_id="m")
    save_head(head, tmp_path / "heads" / "multi", model_id="m")  # replacing an existing head
    loaded, meta = load_head(tmp_path / "heads" / "multi")
    assert meta["model_id"] == "m"
    torch.testing.assert_close(doc_vectors(loaded, chunks), doc_vectors(head.eval(), chunks))
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["multi"]


def test_bad_pairs_are_refused():
    chunks, queries, positives = toy()
    with pytest.raises(ValueError, match="expected the same number"):
        train_head(build_head("learned", 16), chunks, queries, positives[:5])
    with pytest.raises(ValueError, match="kind: expected one of"):
        build_head("median", 16)
