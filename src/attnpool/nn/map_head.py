"""The multihead attention pooling (MAP) head of SigLIP / big_vision, also timm's ``AttentionPoolLatent``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnpool._sets import Sets
from attnpool.nn.base import SetPool
from attnpool.nn.set_transformer import MultiheadCrossAttention

__all__ = ["MAPHead"]

_GELU_APPROX = ("none", "tanh")


class _Mlp(nn.Module):
    """``fc2(act(fc1(h)))``, with timm's ``Mlp`` names."""

    def __init__(self, dim: int, hidden_dim: int, gelu_approximate: str, kw: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, **kw)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden_dim, dim, **kw)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(h)))


class MAPHead(SetPool):
    r"""Multihead attention pooling: a learned probe attends over the set, then a residual MLP.

    .. math::
        a = W_o \big[\mathrm{softmax}\big(W_q^h p \, (W_k^h x)^\top / \sqrt{D/H}\big) \, W_v^h x\big]_h, \qquad
        \mathrm{out} = a + \mathrm{MLP}\big(\mathrm{LN}(a)\big)

    with a learned probe ``p`` (``num_probes`` of them) and ``MLP(h) = W_2 GELU(W_1 h + b_1) + b_2`` of hidden
    size ``mlp_ratio * D``. The attention is an :class:`~attnpool.nn.AttentionPool` (``self.attn``).

    Zhai, Mustafa, Kolesnikov & Beyer, *Sigmoid Loss for Language Image Pre-Training* (SigLIP), ICCV 2023, and
    big_vision's ``MAPHead``; the same design as Lee et al. 2019's PMA with one seed. timm's
    ``AttentionPoolLatent`` is this head: its defaults (``mlp_ratio=4.0``, exact GELU, ``qkv_bias=True``, a
    LayerNorm of eps ``1e-6`` as its vision transformers pass it) are ours. Its ``latent`` is our ``probe``, its
    ``q`` our ``attn.query_proj``, its fused ``kv`` our ``attn.key_proj`` and ``attn.value_proj`` (the first and
    second halves of its rows), its ``proj`` our ``attn.out_proj``, its ``norm`` our ``norm`` and its
    ``mlp.fc1``/``mlp.fc2`` ours. big_vision's flax ``nn.gelu`` is the tanh approximation:
    ``gelu_approximate="tanh"``. With several probes timm keeps only the first (``pool_type="token"``); we return
    them all.

    Args:
        dim: ``D``, the element and output size.
        num_heads: ``H``, dividing ``D``.
        num_probes: ``k``, learned probes.
        mlp_ratio: MLP hidden size over ``D``.
        norm_eps: the LayerNorm's epsilon.
        norm: use the LayerNorm before the MLP (timm's ``AttentionPoolLatent`` has none unless given a
            ``norm_layer``).
        qkv_bias: biases of the query, key and value projections (the output projection and MLP always have one).
        gelu_approximate: ``"none"`` (exact GELU, timm) or ``"tanh"`` (big_vision).
        dropout: attention dropout on the weights during training.

    Shapes:
        * input: ``[B, L, D]`` + ``mask [B, L]`` (True = keep), ``[N, D]`` + ``offsets [B+1]`` or ``lengths [B]``,
          or a list of ``[L_i, D]``;
        * output: ``[B, D]`` for one probe, else ``[B, k, D]``; exactly 0 for an empty set;
        * weights (``return_weights=True``): ``[B, H, k, L]`` padded, ``[N, H, k]`` packed, or a list of
          ``[H, k, L_i]``.
    """

    has_weights = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        num_probes: int = 1,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        norm: bool = True,
        qkv_bias: bool = True,
        gelu_approximate: str = "none",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if num_probes < 1:
            raise ValueError(f"num_probes: expected >= 1, got {num_probes}")
        if gelu_approximate not in _GELU_APPROX:
            raise ValueError(f"gelu_approximate: expected one of {_GELU_APPROX}, got {gelu_approximate!r}")
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio: expected a ratio giving a hidden size >= 1, got {mlp_ratio}")
        self.dim, self.num_heads, self.num_probes, self.mlp_ratio = dim, num_heads, num_probes, mlp_ratio
        self.norm_eps, self.gelu_approximate = norm_eps, gelu_approximate
        self.probe = nn.Parameter(torch.empty(num_probes, dim, **kw))
        self.attn = MultiheadCrossAttention(dim, num_heads, qkv_bias=qkv_bias, out_bias=True, dropout=dropout, **kw)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **kw) if norm else None
        self.mlp = _Mlp(dim, hidden, gelu_approximate, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.dim**-0.5  # timm: a normal of std D^-1/2 truncated at 2 std
        nn.init.trunc_normal_(self.probe, std=std, a=-2 * std, b=2 * std)
        self.attn.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        self.mlp.reset_parameters()

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        a, weights = self.attn.pool(sets, self.probe.unsqueeze(0), need_weights)
        out = a + self.mlp(a if self.norm is None else self.norm(a))
        return (out.squeeze(1) if self.num_probes == 1 else out), weights

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}"]
        if self.num_probes != 1:
            parts.append(f"num_probes={self.num_probes}")
        parts.append(f"mlp_ratio={self.mlp_ratio}")
        parts.append(f"norm_eps={self.norm_eps}" if self.norm is not None else "norm=False")
        if self.gelu_approximate != "none":
            parts.append(f"gelu_approximate={self.gelu_approximate}")
        return ", ".join(parts)
