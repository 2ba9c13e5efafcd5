"""Perceiver-style pooling: learned latents cross-attend to the set, in a stack of pre-LN blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnpool._sets import Sets
from attnpool.nn.base import SetPool
from attnpool.nn.set_transformer import MultiheadCrossAttention, with_values

__all__ = ["LatentCrossAttention"]


class _LatentBlock(nn.Module):
    """One pre-LN block: ``z = z + CrossAttn(LN(z), LN(x)); z = z + FFN(LN(z))``."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, hidden_dim: int, norm_eps: float, bias: bool,
                 dropout: float, kw: dict[str, Any], residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps, **kw)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=norm_eps, **kw)
        self.attn = MultiheadCrossAttention(dim, num_heads, kv_dim=kv_dim, qkv_bias=bias, out_bias=bias,
                                            dropout=dropout, **kw)
        self.norm_mlp = nn.LayerNorm(dim, eps=norm_eps, **kw) if hidden_dim else None
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim, bias=bias, **kw), nn.GELU(),
                                 nn.Linear(hidden_dim, dim, bias=bias, **kw)) if hidden_dim else None

    def reset_parameters(self) -> None:
        for m in (self.norm_q, self.norm_kv, self.attn, self.norm_mlp, *(self.mlp or ())):
            if m is not None and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, z: Tensor, sets: Sets, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        kv = with_values(sets, self.norm_kv(sets.values))
        a, weights = self.attn.pool(kv, self.norm_q(z), need_weights)
        z = z + a if self.residual else a
        if self.mlp is None or self.norm_mlp is None:
            return z, weights
        return z + self.mlp(self.norm_mlp(z)), weights


class LatentCrossAttention(SetPool):
    r"""``k`` learned latents cross-attend to each set through ``num_layers`` pre-LN blocks (Perceiver).

    .. math::
        z^{(0)} = Z \in \mathbb{R}^{k \times D}, \qquad
        z' = z^{(l)} + \mathrm{CrossAttn}\big(\mathrm{LN}(z^{(l)}), \mathrm{LN}(x)\big), \qquad
        z^{(l+1)} = z' + \mathrm{FFN}\big(\mathrm{LN}(z')\big)

    ``CrossAttn`` is multihead attention with query, key, value and output projections (an
    :class:`~attnpool.nn.AttentionPool`, scale ``1/sqrt(D/H)``), the latents as queries and the set's elements as
    keys and values; ``FFN(h) = W_2 GELU(W_1 h + b_1) + b_2`` with hidden size ``mlp_ratio * D``. Every block has
    its own LayerNorms (on the latents, on the elements, before the FFN) and weights. ``final_norm`` applies one
    more LayerNorm to the output.

    Jaegle, Gimeno, Brock, Zisserman, Vinyals & Carreira, *Perceiver: General Perception with Iterative
    Attention*, ICML 2021. Unlike the Perceiver, there is no latent self-attention between the cross-attentions
    (each latent reads the set on its own: stack a :class:`~attnpool.nn.SAB` on the output for that), and the
    latents are initialized from a truncated normal of std 0.02, as there.

    Args:
        dim: ``D``, the latent and output size.
        num_latents: ``k``.
        num_heads: ``H``, dividing ``D``.
        num_layers: number of blocks.
        kv_dim: element size; default ``D``. The key and value projections map it to ``D``.
        mlp_ratio: FFN hidden size over ``D``.
        norm_eps: LayerNorm epsilon.
        final_norm: a LayerNorm on the output.
        bias: biases in every linear layer.
        dropout: attention dropout on the weights during training.

    Shapes:
        * input: ``[B, L, kv_dim]`` + ``mask [B, L]`` (True = keep), ``[N, kv_dim]`` + ``offsets [B+1]`` or
          ``lengths [B]``, or a list of ``[L_i, kv_dim]``;
        * output: ``[B, D]`` for ``k = 1``, else ``[B, k, D]``; exactly 0 for an empty set;
        * weights (``return_weights=True``): those of the **last** block's cross-attention, ``[B, H, k, L]``
          padded, ``[N, H, k]`` packed, or a list of ``[H, k, L_i]``.
    """

    has_weights = True

    def __init__(
        self,
        dim: int,
        num_latents: int = 1,
        num_heads: int = 1,
        *,
        num_layers: int = 1,
        kv_dim: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        final_norm: bool = False,
        residual: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if num_latents < 1:
            raise ValueError(f"num_latents: expected >= 1, got {num_latents}")
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        hidden = int(dim * mlp_ratio)
        if mlp_ratio != 0 and hidden < 1:
            raise ValueError(f"mlp_ratio: expected 0 (no FFN) or a ratio giving a hidden size >= 1, got {mlp_ratio}")
        self.dim, self.num_latents, self.num_heads, self.num_layers = dim, num_latents, num_heads, num_layers
        self.kv_dim = dim if kv_dim is None else kv_dim
        self.mlp_ratio, self.norm_eps, self.residual = mlp_ratio, norm_eps, residual
        self.latents = nn.Parameter(torch.empty(num_latents, dim, **kw))
        self.layers = nn.ModuleList(
            _LatentBlock(dim, self.kv_dim, num_heads, hidden, norm_eps, bias, dropout, kw, residual)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **kw) if final_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.latents, std=0.02, a=-0.04, b=0.04)
        for layer in self.layers:
            layer.reset_parameters()  # type: ignore[operator]
        if self.norm is not None:
            self.norm.reset_parameters()

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        z = self.latents.unsqueeze(0)
        weights = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z, weights = layer(z, sets, need_weights and i == last)
        if self.norm is not None:
            z = self.norm(z)
        return (z.squeeze(1) if self.num_latents == 1 else z), weights

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_latents={self.num_latents}", f"num_heads={self.num_heads}",
                 f"num_layers={self.num_layers}"]
        if self.kv_dim != self.dim:
            parts.append(f"kv_dim={self.kv_dim}")
        parts.append(f"mlp_ratio={self.mlp_ratio}")
        if not self.residual:
            parts.append("residual=False")
        if self.norm is not None:
            parts.append("final_norm=True")
        return ", ".join(parts)
