"""Text: a sentence-transformers encoder loaded offline, token-aware chunking with character offsets, and
attention pooling from tokens to sentences.

Importing this package is light; the encoder imports sentence-transformers only when it is built.
"""

from attnpool.text.chunking import Chunk, chunk_text
from attnpool.text.encoder import Encoder, default_model_dir

__all__ = ["Chunk", "Encoder", "chunk_text", "default_model_dir"]
