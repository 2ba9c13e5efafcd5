"""The peers' layers, imported for parity tests, and faithful re-statements of those that may not import.

timm and open_clip import torchvision at module load (``from torchvision.ops.misc import FrozenBatchNorm2d``, for
their norm-layer tables), and PyPI's torchvision does not import beside torch 2.13.0. Their pooling layers use
nothing from it, so :func:`timm_attention_pool_latent` and :func:`open_clip_attentional_pooler` import the real
layers with a stand-in for that one class (removed from ``sys.modules`` right after), running the peers' own forward
code. Where the peer is not installed at all, the tests fall back to the re-statements below, written from the
peers' source (timm 1.0.31 ``timm/layers/attention_pool.py``, open_clip 3.3.0 ``open_clip/transformer.py``) and
checked against the real layers whenever those import.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")

    class FrozenBatchNorm2d(nn.Module):  # only named in timm's/open_clip's norm tables, never built here
        pass

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    tv.ops, ops.misc = ops, misc  # type: ignore[attr-defined]
    tv.__path__, ops.__path__ = [], []  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}


def _import_with_stand_in(fn: Any) -> Any:
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        return fn()
    added = {k: v for k, v in _torchvision_stand_in().items() if k not in sys.modules}
    sys.modules.update(added)
    try:
        return fn()
    finally:
        for k in added:
            sys.modules.pop(k, None)


def _import_submodule(package: str, submodule: str) -> types.ModuleType | None:
    """``package.submodule`` without running ``package/__init__.py`` (which loads the peer's whole model zoo and
    data pipeline, torchvision proper included): the submodule is imported under a bare package object that points
    at the installed directory. None when the package is not installed."""
    name = f"{package}.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None

    def load() -> types.ModuleType:
        if package not in sys.modules:
            pkg = types.ModuleType(package)
            pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
            sys.modules[package] = pkg
        return importlib.import_module(name)

    return _import_with_stand_in(load)


def timm_attention_pool_latent() -> type[nn.Module] | None:
    """timm's ``AttentionPoolLatent`` class (timm's own code), or None when timm is not installed."""
    module = _import_submodule("timm", "layers.attention_pool")
    return None if module is None else module.AttentionPoolLatent


def open_clip_attentional_pooler() -> type[nn.Module] | None:
    """open_clip's ``AttentionalPooler`` class (open_clip's own code), or None when open_clip is not installed."""
    module = _import_submodule("open_clip", "transformer")
    return None if module is None else module.AttentionalPooler


# ---------------------------------------------------------------------------------------------------------------
# Re-statements, from the peers' source.
# ---------------------------------------------------------------------------------------------------------------


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RestatedAttentionPoolLatent(nn.Module):
    """timm 1.0.31 ``AttentionPoolLatent`` (``in_features = embed_dim = latent_dim``, no pos_embed, no qk_norm),
    fused path: ``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)`` with the mask passed unchanged."""

    def __init__(self, dim: int, num_heads: int = 8, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 q_proj: bool = True, latent_len: int = 1, pool_type: str = "token", norm_eps: float | None = None,
                 out_features: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.pool, self.latent_len = num_heads, dim // num_heads, pool_type, latent_len
        self.latent = nn.Parameter(torch.randn(1, latent_len, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim, bias=qkv_bias) if q_proj else nn.Identity()
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if out_features == 0:
            self.proj, self.norm, self.mlp = nn.Identity(), nn.Identity(), None
        else:
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm_eps is not None else nn.Identity()
            self.mlp = _Mlp(dim, int(dim * mlp_ratio), nn.GELU())

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, self.latent_len, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.proj(x.transpose(1, 2).reshape(b, self.latent_len, c))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x


class RestatedAttentionalPooler(nn.Module):
    """open_clip 3.3.0 ``AttentionalPooler``: ``MHA(ln_q(query), ln_k(x), ln_k(x))`` with ``batch_first=True``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return self.attn(q.unsqueeze(0).expand(n, -1, -1), x, x, need_weights=False)[0]
