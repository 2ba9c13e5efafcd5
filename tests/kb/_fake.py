"""A fast, deterministic stand-in for the text encoder: the real tokenizer (for chunking) and hashed bag-of-words
vectors, so that store, crash and CLI tests run in seconds without the model."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np


def _tokenizer():
    from transformers import AutoTokenizer

    from attnpool.text.encoder import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


class HashEncoder:
    """``encode`` maps each word to a seeded random direction and sums them; unit norm. ``delay`` seconds per call and
    a ``progress_file`` (one line per call) let a test kill a run midway."""

    def __init__(self, dim: int = 16, *, delay: float = 0.0, progress_file: str | None = None,
                 model_id: str = "hash-encoder") -> None:
        self.dim = dim
        self.tokenizer = _tokenizer()
        self.max_seq_length = 256
        self.model_id = f"{model_id}-{dim}"
        self.path = Path(os.devnull)
        self.delay = delay
        self.progress_file = progress_file
        self.calls = 0

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(w.lower().encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts, **_: object) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i] += self._word(w.strip(".,;:!?\"'()"))
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if self.delay:
            time.sleep(self.delay)
        if self.progress_file:
            with open(self.progress_file, "a") as f:
                f.write(f"{self.calls}\n")
        return out
