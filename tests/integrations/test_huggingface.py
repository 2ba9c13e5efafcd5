"""PoolingHead / PooledEncoder over a tiny randomly initialized BertModel (built from a BertConfig: no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the demo extra has it)")

from attnpool.integrations.huggingface import POOLING_DIR, PooledEncoder, PoolingHead  # noqa: E402
from attnpool.nn import AttentionPool, MAPHead, MeanPool  # noqa: E402

H = 32


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 10), generator=g)
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    ids[attention_mask == 0] = 0
    return ids, attention_mask


def test_head_pools_last_hidden_state_over_the_attention_mask(bert, batch):
    ids, attention_mask = batch
    pool = AttentionPool(H, num_heads=4, key_proj=True, value_proj=True)
    head = PoolingHead(pool)
    with torch.no_grad():
        outputs = bert(input_ids=ids, attention_mask=attention_mask)
        got = head(outputs, attention_mask)
        want = torch.stack([pool(outputs.last_hidden_state[i : i + 1, : int(attention_mask[i].sum())])[0]
                            for i in range(3)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # return_dict=False tuples and the bare tensor work the same
        as_tuple = bert(input_ids=ids, attention_mask=attention_mask, return_dict=False)
        assert torch.equal(head(as_tuple, attention_mask), got)
        assert torch.equal(head(outputs.last_hidden_state, attention_mask), got)
        _, weights = head(outputs, attention_mask, return_weights=True)
        assert weights.shape == (3, 4, 1, 10)
        assert torch.equal(weights[2, :, :, 3:], torch.zeros(4, 1, 7))


def test_a_sentence_pools_the_same_alone_or_in_a_padded_batch(bert, batch):
    ids, attention_mask = batch
    model = PooledEncoder(bert, MAPHead(H, 4)).eval()
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=attention_mask)
        for i in range(3):
            n = int(attention_mask[i].sum())
            alone = model(input_ids=ids[i : i + 1, :n], attention_mask=attention_mask[i : i + 1, :n])
            torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)


def test_call_time_query(bert, batch):
    ids, attention_mask = batch
    model = PooledEncoder(bert, AttentionPool(H, num_queries=0, key_proj=True)).eval()
    query = torch.randn(3, 2, H)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, query=query)
    assert out.shape == (3, 2, H)


def test_save_and_load(bert, batch, tmp_path):
    ids, attention_mask = batch
    model = PooledEncoder(bert, AttentionPool(H, num_queries=2, num_heads=4, key_proj=True, out_proj=True)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / POOLING_DIR / "model.safetensors").is_file()
    loaded = PooledEncoder.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=attention_mask),
                           model(input_ids=ids, attention_mask=attention_mask))


def test_bad_inputs_are_named(bert, batch):
    with pytest.raises(TypeError, match="pool"):
        PoolingHead(torch.nn.Linear(H, H))
    with pytest.raises(TypeError, match="last_hidden_state"):
        PoolingHead(MeanPool())({"logits": torch.zeros(1)})
    with pytest.raises(ValueError, match="attention_mask"):
        PoolingHead(MeanPool())(torch.zeros(2, 3, H), torch.ones(2, 1, 1, 3))
