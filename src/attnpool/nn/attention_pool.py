"""Attention pooling with learned or call-time queries."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnpool._sets import Sets
from attnpool.functional.pool import attention_pool_sets
from attnpool.nn.base import SetPool, per_set_query
from attnpool.nn.scores import AdditiveScore, BilinearScore

__all__ = ["AttentionPool"]

ScoreSpec = str | Callable[[Tensor, Tensor], Tensor]
_SCORES = ("scaled_dot", "dot", "additive", "bilinear")


class AttentionPool(SetPool):
    r"""Attention pooling of each set into ``Q`` vectors, with learned queries or a query given at call time.

    .. math::
        \mathrm{out}_{q} = W_o \Big[\sum_{i} \mathrm{softmax}_i\big(\mathrm{score}(W_q q, W_k x_i) / T\big)
        \, W_v x_i\Big]_{\text{heads}}

    Each of ``W_q, W_k, W_v, W_o`` is an optional linear layer (identity when off). With ``H`` heads the
    projected query, keys and values are split into ``H`` slices, each head with its own softmax.

    Args:
        dim: ``D``, the element size.
        num_queries: ``Q`` learned queries. ``0`` learns none: a ``query`` must then be passed at call time.
            A call-time query always takes precedence over the learned ones (context-sensitive pooling: the same
            set pooled differently for different queries).
        num_heads: ``H``, dividing ``D`` (and the projected query dim).
        query_dim: size of the (learned or call-time) queries before ``W_q``; default ``D``.
        query_proj, key_proj, value_proj, out_proj: use ``W_q: query_dim -> D``, ``W_k, W_v, W_o: D -> D``.
        bias: biases in those projections.
        score: ``"scaled_dot"`` (``q·k / sqrt(D/H)``, the default), ``"dot"``, ``"additive"`` (Bahdanau),
            ``"bilinear"``, or a callable/module ``(query [G|1,H,Q,dq], keys [G,H,L,dk]) -> [G,H,Q,L]``.
        score_hidden: hidden width of the additive score; default ``D/H``.
        temperature: ``T``. learn_temperature: learn ``log T``.
        dropout: attention dropout on the weights during training.
        fold: evaluate the key and value projections folded onto the query and the pooled output (below).
            ``None`` (default) folds whenever it is exact and cheaper: a dot score, a key or value projection,
            and ``H * Q <= D``.

    Folded evaluation: with a dot score, ``q_h · (W_k,h x_i + b_k,h) = (W_k,hᵀ q_h) · x_i + q_h · b_k,h``, and the
    softmax cancels the constant; and ``Σ_i a_i (W_v,h x_i + b_v,h) = W_v,h (Σ_i a_i x_i) + b_v,h`` because the
    weights of a non-empty set sum to 1. So pooling costs ``O(N·D·H·Q)`` instead of the ``O(N·D²)`` of projecting
    every element, and packed input runs on the fused kernels of :mod:`attnpool.kernels`. Both paths agree to
    float64 precision, gradients included.

    Shapes:
        * input: ``[B, L, D]`` + ``mask [B, L]`` (True = keep), ``[N, D]`` + ``offsets [B+1]`` or ``lengths [B]``,
          or a list of ``[L_i, D]``;
        * ``query`` (optional): ``[query_dim]`` shared, ``[B, query_dim]`` one per set, ``[B, Q, query_dim]``;
        * output: ``[B, D]`` for one learned query or a ``[D]``/``[B, D]`` query, else ``[B, Q, D]``;
        * weights (``return_weights=True``): ``[B, H, Q, L]``, ``[N, H, Q]``, or a list of ``[H, Q, L_i]``.

    An empty set gives 0 (after ``W_o``), with weights 0.

    References: Bahdanau et al. 2015 (additive attention); Vaswani et al. 2017 (scaled dot product, heads);
    Lee et al. 2019 (pooling by multihead attention with learned seeds).
    """

    has_weights = True
    takes_query = True

    def __init__(
        self,
        dim: int,
        num_queries: int = 1,
        num_heads: int = 1,
        *,
        query_dim: int | None = None,
        query_proj: bool = False,
        key_proj: bool = False,
        value_proj: bool = False,
        out_proj: bool = False,
        bias: bool = True,
        score: ScoreSpec = "scaled_dot",
        score_hidden: int | None = None,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        dropout: float = 0.0,
        fold: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        query_dim = dim if query_dim is None else query_dim
        if dim % num_heads:
            raise ValueError(f"num_heads: dim {dim} is not divisible by num_heads = {num_heads}")
        if num_queries < 0:
            raise ValueError(f"num_queries: expected >= 0, got {num_queries}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if isinstance(score, str) and score not in _SCORES:
            raise ValueError(f"score: expected one of {_SCORES} or a callable, got {score!r}")
        q_out = dim if query_proj else query_dim
        if score in ("scaled_dot", "dot") and q_out != dim:
            raise ValueError(f"query_dim: a dot score needs queries of size dim = {dim}; got query_dim = "
                             f"{query_dim} without query_proj")
        if q_out % num_heads:
            raise ValueError(f"num_heads: query dim {q_out} is not divisible by num_heads = {num_heads}")

        self.dim, self.num_queries, self.num_heads, self.query_dim = dim, num_queries, num_heads, query_dim
        self.dropout = dropout
        if fold and (not isinstance(score, str) or score not in ("scaled_dot", "dot")):
            raise ValueError(f"fold: folding the projections onto the query needs a dot score, got score={score!r}")
        self.fold = fold
        self.query = nn.Parameter(torch.empty(num_queries, query_dim, **kw)) if num_queries else None
        self.query_proj = nn.Linear(query_dim, dim, bias=bias, **kw) if query_proj else None
        self.key_proj = nn.Linear(dim, dim, bias=bias, **kw) if key_proj else None
        self.value_proj = nn.Linear(dim, dim, bias=bias, **kw) if value_proj else None
        self.out_proj = nn.Linear(dim, dim, bias=bias, **kw) if out_proj else None

        self.score_name = score if isinstance(score, str) else type(score).__name__
        self.score: Callable[[Tensor, Tensor], Tensor] | None
        self.scale: float | None = None
        if score == "scaled_dot":
            self.score = None
        elif score == "dot":
            self.score, self.scale = None, 1.0
        elif score == "additive":
            self.score = AdditiveScore(q_out // num_heads, dim // num_heads, score_hidden or dim // num_heads, **kw)
        elif score == "bilinear":
            self.score = BilinearScore(q_out // num_heads, dim // num_heads, **kw)
        else:
            self.score = score  # type: ignore[assignment]

        self.initial_temperature = temperature
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.empty((), **kw))
        else:
            self.register_buffer("log_temperature", torch.empty((), **kw), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query is not None:
            nn.init.normal_(self.query, std=self.query_dim**-0.5)
        for layer in (self.query_proj, self.key_proj, self.value_proj, self.out_proj):
            if layer is not None:
                layer.reset_parameters()
        if isinstance(self.score, nn.Module) and hasattr(self.score, "reset_parameters"):
            self.score.reset_parameters()
        with torch.no_grad():
            self.log_temperature.fill_(math.log(self.initial_temperature))

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if query is not None:
            q, squeeze = per_set_query(query, sets, self.query_dim)
        elif self.query is not None:
            q, squeeze = self.query.unsqueeze(0), self.num_queries == 1
        else:
            raise ValueError(f"query: {type(self).__name__}(num_queries=0) needs a query at call time")
        if self.query_proj is not None:
            q = self.query_proj(q)
        temperature = self.temperature if isinstance(self.log_temperature, nn.Parameter) else self.initial_temperature
        out_projected = False
        if self._use_folded(q.shape[1]):
            out, weights, out_projected = self._pool_folded(sets, q, temperature, need_weights)
        else:
            x = sets.values
            keys = self.key_proj(x) if self.key_proj is not None else x
            values = self.value_proj(x) if self.value_proj is not None else x
            out, weights = attention_pool_sets(
                sets, q, keys, values, num_heads=self.num_heads, score=self.score, scale=self.scale,
                temperature=temperature, dropout=self.dropout, training=self.training, need_weights=need_weights,
            )
            out = out.to(values.dtype)
        if self.out_proj is not None and not out_projected:
            out = self.out_proj(out)
        return (out.squeeze(1) if squeeze else out), weights

    def _use_folded(self, num_queries: int) -> bool:
        if self.fold is not None:
            return self.fold
        if self.training and self.dropout > 0:
            # dropped weights no longer sum to 1, so b_v would not factor out of the sum exactly
            return False
        projected = self.key_proj is not None or self.value_proj is not None
        return self.score is None and projected and self.num_heads * num_queries <= self.dim

    def _pool_folded(self, sets: Sets, q: Tensor, temperature: float | Tensor,
                     need_weights: bool) -> tuple[Tensor, Tensor | None, bool]:
        """Pool without projecting a single element (exact; see the class docstring).

        Each (head, query) becomes one full-width query ``W_k,hᵀ q_h`` over the raw elements; the pooled raw
        vectors ``z_hq = Σ_i a_hqi x_i`` are then projected once: ``W_v,h z_hq + b_v,h``. With one head and both
        ``W_v`` and ``W_o``, the two projections are applied as one, ``(W_o W_v) z + (W_o b_v + b_o)``, when that is
        cheaper (more pooled vectors than ``D``); the last value returned says whether ``W_o`` was applied.
        """
        g, nq, _ = q.shape
        h, dh, d = self.num_heads, self.dim // self.num_heads, self.dim
        qh = q.reshape(g, nq, h, dh)
        if self.key_proj is not None:
            # q_h · (W_k,h x + b_k,h) = (W_k,hᵀ q_h) · x + const; the softmax cancels the constant.
            folded = torch.einsum("gqhe,hed->ghqd", qh, self.key_proj.weight.view(h, dh, d))
        else:
            folded = torch.zeros(g, h, nq, h, dh, dtype=q.dtype, device=q.device)
            folded[:, torch.arange(h), :, torch.arange(h)] = qh.permute(2, 0, 1, 3)
            folded = folded.reshape(g, h, nq, d)
        scale = self.scale if self.scale is not None else dh**-0.5
        z, weights = attention_pool_sets(
            sets, folded.reshape(g, h * nq, d), num_heads=1, scale=scale, temperature=temperature,
            dropout=self.dropout, training=self.training, need_weights=need_weights,
        )
        b = sets.batch_size
        z = z.to(q.dtype).view(b, h, nq, d)
        if weights is not None:
            # [B, 1, H*Q, L] -> [B, H, Q, L] padded; [N, 1, H*Q] -> [N, H, Q] packed
            weights = weights.view(weights.shape[0], h, nq, *weights.shape[3:])
        # Σ a_i (W_v x_i + b_v) = W_v Σ a_i x_i + b_v, as the weights of a non-empty set sum to 1; the base class
        # zeroes empty sets afterwards.
        if self.value_proj is not None and h == 1:
            weight: Tensor = self.value_proj.weight
            bias: Tensor | None = self.value_proj.bias
            # B*Q*D^2 + D^3 multiply-adds instead of 2*B*Q*D^2; only for a plain Linear without hooks, so that a
            # wrapped (e.g. LoRA) or hooked output projection is always called as a module
            out_proj = self.out_proj
            compose = (out_proj is not None and b * nq > d and type(out_proj) is nn.Linear
                       and not out_proj._forward_hooks and not out_proj._forward_pre_hooks)
            if compose:
                assert self.out_proj is not None
                bias = F.linear(bias, self.out_proj.weight, self.out_proj.bias) if bias is not None \
                    else self.out_proj.bias
                weight = self.out_proj.weight @ weight
            return F.linear(z.reshape(b * nq, d), weight, bias).view(b, nq, d), weights, compose
        if self.value_proj is not None:
            out = torch.einsum("bhqd,hed->bqhe", z, self.value_proj.weight.view(h, dh, d))
            if self.value_proj.bias is not None:
                out = out + self.value_proj.bias.view(h, dh)
        else:
            out = z.view(b, h, nq, h, dh).diagonal(dim1=1, dim2=3).permute(0, 1, 3, 2)
        return out.reshape(b, nq, d), weights, False

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_queries={self.num_queries}", f"num_heads={self.num_heads}"]
        if self.query_dim != self.dim:
            parts.append(f"query_dim={self.query_dim}")
        projs = [n for n in ("query_proj", "key_proj", "value_proj", "out_proj") if getattr(self, n) is not None]
        if projs:
            parts.append("proj=" + "+".join(p.split("_")[0] for p in projs))
        parts.append(f"score={self.score_name}")
        if isinstance(self.log_temperature, nn.Parameter):
            parts.append(f"temperature=learned(init={self.initial_temperature})")
        elif self.initial_temperature != 1.0:
            parts.append(f"temperature={self.initial_temperature}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return ", ".join(parts)
