"""Token-aware chunking: windows of at most ``max_tokens`` tokenizer tokens that overlap by ``overlap`` tokens,
each with its character offsets into the source text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Chunk", "chunk_text"]


@dataclass(frozen=True)
class Chunk:
    """One window of a text: ``text == source[start:end]``; ``num_tokens`` excludes the model's special tokens."""

    text: str
    start: int
    end: int
    num_tokens: int


def chunk_text(text: str, tokenizer: Any, *, max_tokens: int = 256, overlap: int = 32) -> list[Chunk]:
    """Split ``text`` into overlapping windows of the tokenizer's tokens.

    Args:
        text: the source text.
        tokenizer: a Hugging Face *fast* tokenizer (it must return offset mappings).
        max_tokens: tokens per chunk, the model's special tokens ([CLS], [SEP]) included, so that a chunk of
            ``max_tokens`` fits a model whose ``max_seq_length`` is ``max_tokens``.
        overlap: tokens shared by consecutive chunks; ``0 <= overlap < max_tokens - specials``.

    Returns:
        The chunks in order, each a slice ``text[start:end]`` from the start of its first token to the end of its last
        one. Text with no tokens (empty or whitespace) gives no chunks. A chunk boundary falls between tokens, never
        inside one; a word split into several word pieces may be split across two chunks, and the overlap covers it.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer: expected a fast Hugging Face tokenizer (offset mappings), got "
                        f"{type(tokenizer).__name__}")
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    window = max_tokens - specials
    if window < 1:
        raise ValueError(f"max_tokens: expected more than the model's {specials} special tokens, got {max_tokens}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap: expected 0 <= overlap < {window} (max_tokens minus special tokens), got {overlap}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    truncation=False, verbose=False)
    spans: list[tuple[int, int]] = [(int(a), int(b)) for a, b in enc["offset_mapping"] if b > a]
    chunks: list[Chunk] = []
    step = window - overlap
    first = 0
    while first < len(spans):
        last = min(first + window, len(spans))
        start, end = spans[first][0], spans[last - 1][1]
        chunks.append(Chunk(text[start:end], start, end, last - first))
        if last == len(spans):
            break
        first += step
    return chunks
