"""attnpool pooling over Hugging Face ``AutoModel`` outputs (``last_hidden_state`` + ``attention_mask``).

This module imports nothing from ``transformers`` until :meth:`PooledEncoder.from_pretrained` needs ``AutoModel``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from attnpool.nn.base import SetPool

__all__ = ["PooledEncoder", "PoolingHead"]

POOLING_DIR = "attnpool_pooling"


def _hidden_states(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        hidden = outputs[0]  # return_dict=False: the first element is the last hidden state
    if hidden is None and isinstance(outputs, dict):
        hidden = outputs.get("last_hidden_state")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"outputs: expected a model output with last_hidden_state, a tuple starting with it, or a "
                        f"tensor [B, L, D]; got {type(outputs).__name__}")
    return hidden


class PoolingHead(nn.Module):
    """Pool the token states of a Hugging Face encoder with an attnpool module.

    ``head(model(**batch), batch["attention_mask"])`` pools ``last_hidden_state [B, L, D]`` over the tokens that
    ``attention_mask`` keeps (1 = token, 0 = padding, the tokenizer's convention and attnpool's): padding never
    reaches the result, left or right padding alike, so a sentence pools to the same vector whatever batch it is in.

    Args:
        pool: any :class:`~attnpool.nn.SetPool` over ``D``-wide tokens (``AttentionPool``, ``MAPHead``,
            ``GatedAttentionPool``, ``MeanPool``, ``ClsPool`` ...).

    ``forward(outputs, attention_mask=None, *, query=None, return_weights=False)``: ``outputs`` is the model's
    output (``BaseModelOutput``, a ``return_dict=False`` tuple) or ``last_hidden_state`` itself; ``query`` and
    ``return_weights`` go to the pool. Returns ``[B, D]`` (``[B, Q, D]`` for several queries) and, if asked, the
    weights ``[B, H, Q, L]``.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        if not isinstance(pool, SetPool):
            raise TypeError(f"pool: expected an attnpool SetPool module, got {type(pool).__name__}")
        self.pool = pool

    def forward(self, outputs: Any, attention_mask: Tensor | None = None, *, query: Tensor | None = None,
                return_weights: bool = False) -> Any:
        hidden = _hidden_states(outputs)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: expected the tokenizer's [B, L] mask (1 = token), got shape "
                             f"{tuple(attention_mask.shape)}")
        kwargs: dict[str, Any] = {"return_weights": return_weights}
        if query is not None:
            kwargs["query"] = query
        return self.pool(hidden, attention_mask, **kwargs)

    def attnpool_config(self) -> dict[str, Any]:
        return {"pool": self.pool}


class PooledEncoder(nn.Module):
    """A Hugging Face encoder followed by a :class:`PoolingHead`: ``model(**tokenizer(texts, ...))`` gives vectors.

    .. code-block:: python

        encoder = AutoModel.from_pretrained(name)
        model = PooledEncoder(encoder, AttentionPool(encoder.config.hidden_size, num_heads=4, key_proj=True))
        vectors = model(**tokenizer(texts, padding=True, return_tensors="pt"))   # [B, D]
        model.save_pretrained(path)          # the encoder's files + attnpool_pooling/{config.json, model.safetensors}
        model = PooledEncoder.from_pretrained(path)

    ``forward(input_ids=None, attention_mask=None, *, query=None, return_weights=False, **model_kwargs)`` runs the
    encoder with ``attention_mask`` and ``model_kwargs`` (``token_type_ids``, ``inputs_embeds`` ...) and pools
    its ``last_hidden_state`` over the same mask.
    """

    def __init__(self, encoder: nn.Module, pool: nn.Module | PoolingHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = pool if isinstance(pool, PoolingHead) else PoolingHead(pool)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                query: Tensor | None = None, return_weights: bool = False, **model_kwargs: Any) -> Any:
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **model_kwargs)
        return self.head(outputs, attention_mask, query=query, return_weights=return_weights)

    def save_pretrained(self, path: str | os.PathLike[str], **encoder_kwargs: Any) -> Path:
        """The encoder's ``save_pretrained(path)`` and the pooling head in ``path/attnpool_pooling``."""
        from attnpool.hub import save_pretrained

        out = Path(path)
        save = getattr(self.encoder, "save_pretrained", None)
        if save is None:
            raise TypeError(f"encoder: {type(self.encoder).__name__} has no save_pretrained (not a transformers "
                            "PreTrainedModel)")
        save(str(out), **encoder_kwargs)
        save_pretrained(self.head.pool, out / POOLING_DIR)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **encoder_kwargs: Any) -> PooledEncoder:
        """Load what :meth:`save_pretrained` wrote: ``AutoModel.from_pretrained(path, **encoder_kwargs)`` and the
        attnpool head, in eval mode."""
        from transformers import AutoModel

        from attnpool.hub import from_pretrained

        encoder = AutoModel.from_pretrained(str(path), **encoder_kwargs)
        pool = from_pretrained(Path(path) / POOLING_DIR)
        return cls(encoder, pool).eval()
