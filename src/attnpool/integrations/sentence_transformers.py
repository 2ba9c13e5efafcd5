"""attnpool pooling as a sentence-transformers module, in place of ``sentence_transformers.models.Pooling``.

Importing this module imports ``sentence_transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules import Module
from torch import Tensor, nn

from attnpool.nn.base import SetPool

__all__ = ["AttnpoolPooling"]

OPTIONS_NAME = "attnpool_sentence_transformers.json"


class AttnpoolPooling(Module):
    """Pool token embeddings into the sentence embedding with any attnpool module.

    .. code-block:: python

        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Transformer

        word = Transformer(model_dir)
        model = SentenceTransformer(modules=[word, AttnpoolPooling(AttentionPool(384, num_heads=4, key_proj=True))])
        model.save(path)                     # this module goes to path/1_AttnpoolPooling/
        model = SentenceTransformer(path)    # and comes back through AttnpoolPooling.load

    Reads ``features["token_embeddings"]`` (``[B, L, D]``) and ``features["attention_mask"]`` (1 = token) and sets
    ``features["sentence_embedding"]``. The unpadded form that sentence-transformers uses with FlashAttention
    (``[1, N, D]`` with ``cu_seq_lens_q``) is pooled as packed sets, without re-padding. A pool with several
    queries gives their concatenation (``[B, Q*D]``).

    ``include_prompt=False`` drops the first ``prompt_length`` tokens of each text from the pooling, as
    sentence-transformers' ``Pooling`` does for instruction models.

    ``embedding_dimension`` is the output width that sentence-transformers reports; by default the pool's
    ``dim`` times its number of queries (pass it for pools that do not record a width, such as ``MeanPool``).

    Saved as :func:`attnpool.hub.save_pretrained` writes the pool (``config.json`` + ``model.safetensors``), with
    this module's own options in ``attnpool_sentence_transformers.json``.
    """

    save_in_root = False

    def __init__(self, pool: nn.Module, include_prompt: bool = True, embedding_dimension: int | None = None) -> None:
        super().__init__()
        if not isinstance(pool, SetPool):
            raise TypeError(f"pool: expected an attnpool SetPool module, got {type(pool).__name__}")
        self.pool = pool
        self.include_prompt = include_prompt
        self.embedding_dimension = embedding_dimension

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        tokens: Tensor = features["token_embeddings"]
        prompt_length = None
        if not self.include_prompt and "prompt_length" in features:
            pl = features["prompt_length"]
            prompt_length = int(pl.reshape(-1)[0]) if isinstance(pl, Tensor) else int(pl)
        if "cu_seq_lens_q" in features:  # unpadded: [1, N, D] with offsets
            x = tokens.reshape(-1, tokens.shape[-1])
            offsets = features["cu_seq_lens_q"].to(device=tokens.device, dtype=torch.long)
            if prompt_length:
                lengths = offsets[1:] - offsets[:-1]
                seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths)
                keep = torch.arange(x.shape[0], device=x.device) - offsets[:-1][seg] >= prompt_length
                x, lengths = x[keep], (lengths - prompt_length).clamp_min(0)
                offsets = torch.cat([offsets.new_zeros(1), lengths.cumsum(0)])
            out = self.pool(x, offsets=offsets)
        else:
            mask = features.get("attention_mask")
            if mask is None or mask.shape[-1] != tokens.shape[1]:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            else:
                mask = mask.bool()
            if prompt_length:  # drop the first `prompt_length` kept tokens of each row (left padding or not)
                mask = mask & (mask.cumsum(1) > prompt_length)
            out = self.pool(tokens, mask)
        features["sentence_embedding"] = out.flatten(1) if out.dim() == 3 else out
        return features

    def get_embedding_dimension(self) -> int:
        if self.embedding_dimension is not None:
            return self.embedding_dimension
        dim = getattr(self.pool, "dim", None)
        if dim is None:
            raise AttributeError(f"{type(self.pool).__name__} does not record its width: pass embedding_dimension=")
        queries = next((getattr(self.pool, n) for n in ("num_queries", "num_probes", "num_seeds", "num_latents")
                        if getattr(self.pool, n, None)), 1)
        return int(dim) * int(queries)

    def get_sentence_embedding_dimension(self) -> int:  # the name before sentence-transformers 6
        return self.get_embedding_dimension()

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        from attnpool.hub import save_pretrained

        save_pretrained(self.pool, output_path)
        options = {"include_prompt": self.include_prompt, "embedding_dimension": self.embedding_dimension}
        (Path(output_path) / OPTIONS_NAME).write_text(json.dumps(options) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             init_defaults: dict[str, Any] | None = None, **kwargs: Any) -> AttnpoolPooling:
        from attnpool.hub import from_pretrained

        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        if path is None:
            raise FileNotFoundError(f"model_name_or_path: no directory {subfolder!r} in {model_name_or_path}")
        options_path = Path(path) / OPTIONS_NAME
        options = json.loads(options_path.read_text(encoding="utf-8")) if options_path.is_file() else {}
        return cls(from_pretrained(path), **options)

    def attnpool_config(self) -> dict[str, Any]:
        return {"pool": self.pool, "include_prompt": self.include_prompt,
                "embedding_dimension": self.embedding_dimension}
