"""The Set Transformer blocks of Lee et al. (2019): MAB, SAB, ISAB and PMA, for padded, packed and list input.

Lee, Lee, Kim, Kosiorek, Choi & Teh, *Set Transformer: A Framework for Attention-based Permutation-Invariant
Neural Networks*, ICML 2019.

The multihead attention inside every block is an :class:`~attnpool.nn.AttentionPool` (no learned queries, all
four projections), so the numerics policy of attnpool (softmax in fp32, masked positions never read) holds here
too; the output of an empty set (and, for SAB/ISAB, of a masked position) is exactly 0.

**The official reference code** (github.com/juho-lee/set_transformer, ``modules.py``) differs from the paper, and
the defaults here follow the paper. Each difference has a switch, so that its state dicts can be imported:

====================================  ==========================================  ================================
                                      paper (default here)                        reference code
====================================  ==========================================  ================================
attention scale                       ``1/sqrt(D/H)`` (per head)                  ``1/sqrt(D)``: ``scale=D**-0.5``
residual of the first sub-block       the query input ``X``                       the projected query ``X W_q``:
                                                                                  ``residual="projected_query"``
output projection ``W_O``             yes                                         none: ``out_proj=False``
rFF                                   any row-wise feed-forward                   ``relu(W h + b)`` (the default
                                                                                  ``ff_hidden_dim=None``)
rFF on the input of PMA               ``MAB(S, rFF(Z))``                          none: ``input_ff=False``
LayerNorm                             in every MAB                                optional, off by default
                                                                                  (``layer_norm=False``, kept here)
====================================  ==========================================  ================================

The reference names map to ours as ``fc_q, fc_k, fc_v -> attn.query_proj, attn.key_proj, attn.value_proj``,
``fc_o -> ff.0``, ``ln0, ln1 -> ln0, ln1``, PMA's ``S -> seeds`` and ISAB's ``I -> inducing`` (both ``[1, k, D]``
there, ``[k, D]`` here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnpool._sets import Sets, as_sets
from attnpool.functional.pool import attention_pool_sets, format_weights
from attnpool.nn.attention_pool import AttentionPool
from attnpool.nn.base import SetPool, call_weights_hooks, weights_hooks, zero_empty

__all__ = ["ISAB", "MAB", "PMA", "SAB", "SetToSet"]

Residual = Literal["query", "projected_query"]
_RESIDUALS = ("query", "projected_query")


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with latent_cross_attention.py and map_head.py.
# ---------------------------------------------------------------------------------------------------------------


class MultiheadCrossAttention(AttentionPool):
    r"""An :class:`~attnpool.nn.AttentionPool` with all four projections, keys and values of their own size, and
    a fixed score scale: ``W_o [softmax(W_q q (W_k x)^T * scale) W_v x]_heads``.

    Internal building block: the query is given at call time (``pool(sets, query [B|1, Q, query_dim], ...)``).
    With ``kv_dim == dim`` it is evaluated by :meth:`AttentionPool.pool` itself (and so gains whatever fast path
    that has); otherwise the elements are projected here and pooled by the functional engine.

    The attention of an **empty set** is only specified up to biases (zero attention, then ``b_o``, with or without
    ``W_o b_v`` depending on the evaluation path): callers that expose it must zero it.

    Args:
        dim: ``D``, the size of the projected queries, keys, values and of the output.
        num_heads: ``H``, dividing ``D``.
        query_dim: size of the queries before ``W_q``; default ``D``.
        kv_dim: size of the set elements before ``W_k`` and ``W_v``; default ``D``.
        scale: multiplies ``q·k``; default ``1/sqrt(D/H)``.
        qkv_bias, out_bias: biases of ``W_q, W_k, W_v`` and of ``W_o``.
        out_proj: use ``W_o``.
        dropout: attention dropout on the weights during training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        query_dim: int | None = None,
        kv_dim: int | None = None,
        scale: float | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        out_proj: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, 0, num_heads, query_dim=query_dim, query_proj=True, key_proj=True, value_proj=True,
                         out_proj=out_proj, bias=qkv_bias, dropout=dropout, device=device, dtype=dtype)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.kv_dim = dim if kv_dim is None else kv_dim
        if self.kv_dim != dim:  # AttentionPool projects D -> D; widen the key and value projections' inputs
            self.key_proj = nn.Linear(self.kv_dim, dim, bias=qkv_bias, **kw)
            self.value_proj = nn.Linear(self.kv_dim, dim, bias=qkv_bias, **kw)
        if out_proj and out_bias != qkv_bias:
            self.out_proj = nn.Linear(dim, dim, bias=out_bias, **kw)
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        self.scale = scale

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        assert query is not None and query.dim() == 3
        if self.kv_dim == self.dim:
            return super().pool(sets, query, need_weights)
        assert self.query_proj is not None and self.key_proj is not None and self.value_proj is not None
        q = self.query_proj(query)
        x = sets.values
        keys, values = self.key_proj(x), self.value_proj(x)
        out, weights = attention_pool_sets(sets, q, keys, values, num_heads=self.num_heads, scale=self.scale,
                                           dropout=self.dropout, training=self.training, need_weights=need_weights)
        out = out.to(values.dtype)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out, weights

    def project_query(self, query: Tensor) -> Tensor:
        """``W_q q``: the projected query, as the attention sees it."""
        assert self.query_proj is not None
        return self.query_proj(query)

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        if self.kv_dim != self.dim:
            parts.append(f"kv_dim={self.kv_dim}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:.6g}")
        return ", ".join(parts)


def with_values(sets: Sets, values: Tensor) -> Sets:
    """The same sets carrying other per-element values (in the same layout)."""
    return dataclasses.replace(sets, values=values)


def pad_packed(sets: Sets) -> tuple[Sets, Tensor, Tensor]:
    """Packed sets as padded ``[B, L_max, D]`` sets with a mask, and the ``(set, position)`` index of every packed
    row, so that ``padded_result[index]`` gives a per-element result back in packed form."""
    x = sets.values
    n, d = x.shape
    b = sets.batch_size
    assert sets.offsets is not None
    seg = sets.segment_ids()
    pos = torch.arange(n, device=x.device) - sets.offsets[:-1][seg]
    l_max = int(sets.lengths.max()) if b and n else 0
    padded = x.new_zeros(b, l_max, d).index_put((seg, pos), x)
    mask = torch.arange(l_max, device=x.device) < sets.lengths.unsqueeze(1)
    return Sets("padded", padded, mask, None, sets.lengths, all_nonempty=sets.all_nonempty), seg, pos


def dense_sets(values: Tensor) -> Sets:
    """``[B, M, D]`` with every position kept, as padded :class:`Sets`."""
    b, m = values.shape[:2]
    return Sets("padded", values, None, None, torch.full((b,), m, dtype=torch.long, device=values.device),
                all_nonempty=m > 0 or b == 0)


def check_query3(query: Tensor, sets: Sets, dim: int, name: str = "x") -> Tensor:
    if not isinstance(query, Tensor):
        raise TypeError(f"{name}: expected a tensor [B, Q, {dim}] or [1, Q, {dim}], got {type(query).__name__}")
    if query.dim() != 3 or query.shape[0] not in (1, sets.batch_size) or query.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [B, Q, {dim}] with B = {sets.batch_size} (or 1, shared by every "
                         f"set), got {tuple(query.shape)}")
    if query.device != sets.values.device:
        raise ValueError(f"{name}: expected device {sets.values.device}, got {query.device}")
    return query


# ---------------------------------------------------------------------------------------------------------------
# MAB
# ---------------------------------------------------------------------------------------------------------------


class MAB(nn.Module):
    r"""Multihead attention block (Lee et al. 2019, eq. 6-7): the rows of ``X`` attend over the set ``Y``.

    .. math::
        H = \mathrm{LN}\big(X + \mathrm{Multihead}(X, Y, Y)\big), \qquad
        \mathrm{MAB}(X, Y) = \mathrm{LN}\big(H + \mathrm{rFF}(H)\big)

    with :math:`\mathrm{Multihead}(X, Y, Y) = W_O [\mathrm{softmax}(X W_q^h (Y W_k^h)^\top \cdot s) Y W_v^h]_h`,
    ``s = scale`` (default ``1/sqrt(D/H)``) and a row-wise feed-forward
    :math:`\mathrm{rFF}(h) = \mathrm{relu}(W h + b)` (``ff_hidden_dim=None``) or
    :math:`W_2\,\mathrm{relu}(W_1 h + b_1) + b_2` (hidden size ``ff_hidden_dim``). The attention is an
    :class:`~attnpool.nn.AttentionPool` (``self.attn``).

    Args:
        dim: ``D``, the output size (and that of the projected queries, keys and values).
        num_heads: ``H``, dividing ``D``.
        query_dim: size of the rows of ``X``; default ``D``. With ``query_dim != D`` the paper's residual
            ``X + ...`` is undefined: use ``residual="projected_query"``.
        kv_dim: size of the elements of ``Y``; default ``D``.
        layer_norm: apply both LayerNorms. Off by default, as in the reference code (the paper writes them
            always); ``norm_eps`` is their epsilon.
        ff_hidden_dim: ``None`` for the one-layer rFF of the reference code, or the hidden size of a two-layer rFF.
        residual: ``"query"`` adds ``X`` (the paper), ``"projected_query"`` adds ``X W_q`` (the reference code).
        out_proj: use ``W_O`` (the paper); the reference code has none.
        scale: the score scale ``s``; ``D**-0.5`` reproduces the reference code, which divides by ``sqrt(D)``
            rather than by ``sqrt(D/H)``.
        bias: biases in every linear layer.
        dropout: attention dropout on the weights during training.

    Shapes (:meth:`forward`):
        * ``x``: ``[B, Q, query_dim]``, or ``[1, Q, query_dim]`` shared by every set;
        * ``y``: any input form of :mod:`attnpool._sets` with element size ``kv_dim``;
        * output: ``[B, Q, D]``; weights (``return_weights=True``) ``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed,
          or a list of ``[H, Q, L_i]``.

    An empty ``Y`` (no element, or all masked) gives output exactly 0 for its rows, as every attnpool module does
    for an empty set (the formula itself is undefined there), with weights 0 and finite gradients.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        query_dim: int | None = None,
        kv_dim: int | None = None,
        layer_norm: bool = False,
        norm_eps: float = 1e-5,
        ff_hidden_dim: int | None = None,
        residual: Residual = "query",
        out_proj: bool = True,
        scale: float | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        query_dim = dim if query_dim is None else query_dim
        kv_dim = dim if kv_dim is None else kv_dim
        if residual not in _RESIDUALS:
            raise ValueError(f"residual: expected one of {_RESIDUALS}, got {residual!r}")
        if residual == "query" and query_dim != dim:
            raise ValueError(f"residual: the paper's residual X + Multihead(X, Y, Y) needs query_dim == dim, got "
                             f"query_dim = {query_dim} and dim = {dim}; pass residual='projected_query' (as the "
                             "reference code does)")
        if ff_hidden_dim is not None and ff_hidden_dim < 1:
            raise ValueError(f"ff_hidden_dim: expected a positive int or None, got {ff_hidden_dim!r}")
        self.dim, self.num_heads, self.query_dim, self.kv_dim = dim, num_heads, query_dim, kv_dim
        self.layer_norm, self.norm_eps, self.ff_hidden_dim = layer_norm, norm_eps, ff_hidden_dim
        self.residual = residual
        self.attn = MultiheadCrossAttention(dim, num_heads, query_dim=query_dim, kv_dim=kv_dim, scale=scale,
                                            qkv_bias=bias, out_bias=bias, out_proj=out_proj, dropout=dropout, **kw)
        self.ln0 = nn.LayerNorm(dim, eps=norm_eps, bias=bias, **kw) if layer_norm else None
        self.ln1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias, **kw) if layer_norm else None
        self.ff = row_ff(dim, dim, ff_hidden_dim, bias=bias, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        for m in (self.ln0, self.ln1, *self.ff):
            if m is not None and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def attend(self, x: Tensor, sets: Sets, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``MAB(x, sets)`` on validated sets whose masked rows hold 0 (:meth:`Sets.zero_masked`).

        Args:
            x: ``[B or 1, Q, query_dim]``, finite.

        Returns:
            ``([B, Q, D]`` in the dtype of the set's values, weights in the internal layout of ``sets`` or None).
            The rows of an empty set are finite but unspecified (see :class:`MultiheadCrossAttention`).
        """
        if x.shape[1] == 0:  # no query rows (a batch of empty sets, padded internally to L = 0)
            return self._no_queries(x, sets, need_weights)
        a, weights = self.attn.pool(sets, x, need_weights)
        r = x if self.residual == "query" else self.attn.project_query(x)
        h = r.to(a.dtype) + a
        if self.ln0 is not None:
            h = self.ln0(h)
        out = h + self.ff(h)
        if self.ln1 is not None:
            out = self.ln1(out)
        return out, weights

    def _no_queries(self, x: Tensor, sets: Sets, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        # The engine cannot take Q = 0 (functional.pool.weighted_sum_sets reshapes a zero-size tensor with -1).
        b, h = sets.batch_size, self.num_heads
        out = sets.values.new_zeros(b, 0, self.dim) + x.sum() * 0  # stays on the graph of x
        if not need_weights:
            return out, None
        dtype = torch.promote_types(sets.values.dtype, torch.float32)
        shape = (b, h, 0, sets.values.shape[1]) if sets.is_padded else (sets.values.shape[0], h, 0)
        return out, torch.zeros(shape, dtype=dtype, device=sets.values.device)

    def forward(
        self,
        x: Tensor,
        y: Tensor | Sequence[Tensor],
        mask: Tensor | None = None,
        *,
        offsets: Tensor | None = None,
        lengths: Tensor | None = None,
        return_weights: bool = False,
    ) -> Any:
        sets = as_sets(y, mask=mask, offsets=offsets, lengths=lengths).zero_masked()
        q = check_query3(x, sets, self.query_dim)
        out, weights = self.attend(q, sets, return_weights or bool(weights_hooks(self)))
        out = zero_empty(out, sets)
        call_weights_hooks(self, weights, sets)
        if return_weights:
            assert weights is not None
            return out, format_weights(sets, weights)
        return out

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}"]
        if self.query_dim != self.dim:
            parts.append(f"query_dim={self.query_dim}")
        if self.kv_dim != self.dim:
            parts.append(f"kv_dim={self.kv_dim}")
        parts.append(f"layer_norm={self.layer_norm}")
        if self.layer_norm and self.norm_eps != 1e-5:
            parts.append(f"norm_eps={self.norm_eps}")
        if self.ff_hidden_dim is not None:
            parts.append(f"ff_hidden_dim={self.ff_hidden_dim}")
        parts.append(f"residual={self.residual}")
        return ", ".join(parts)


def row_ff(dim_in: int, dim_out: int, hidden_dim: int | None, *, bias: bool = True,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Sequential:
    """The row-wise feed-forward rFF: ``relu(W h + b)`` without a hidden size (the reference code's), else
    ``W_2 relu(W_1 h + b_1) + b_2``."""
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    if hidden_dim is None:
        return nn.Sequential(nn.Linear(dim_in, dim_out, bias=bias, **kw), nn.ReLU())
    return nn.Sequential(nn.Linear(dim_in, hidden_dim, bias=bias, **kw), nn.ReLU(),
                         nn.Linear(hidden_dim, dim_out, bias=bias, **kw))


# ---------------------------------------------------------------------------------------------------------------
# PMA
# ---------------------------------------------------------------------------------------------------------------


class PMA(SetPool):
    r"""Pooling by multihead attention (Lee et al. 2019, eq. 11): ``k`` learned seeds attend over the set.

    .. math::
        \mathrm{PMA}_k(Z) = \mathrm{MAB}\big(S, \mathrm{rFF}(Z)\big), \qquad S \in \mathbb{R}^{k \times D}

    with :class:`MAB` as documented there. ``input_ff=False`` drops the rFF on ``Z`` (``MAB(S, Z)``), as the
    reference code does; the paper has it. Seeds are initialized as in the reference code (Xavier uniform of a
    ``[1, k, D]`` tensor).

    Args:
        dim: ``D``, the element and output size.
        num_seeds: ``k``.
        num_heads: ``H``, dividing ``D``.
        input_ff: apply ``rFF`` to the elements first (the paper).
        layer_norm, norm_eps, ff_hidden_dim, residual, out_proj, scale, bias, dropout: those of :class:`MAB`;
            ``ff_hidden_dim`` also shapes the input rFF.

    Shapes:
        * input: ``[B, L, D]`` + ``mask [B, L]`` (True = keep), ``[N, D]`` + ``offsets [B+1]`` or
          ``lengths [B]``, or a list of ``[L_i, D]``;
        * output: ``[B, D]`` for ``k = 1``, else ``[B, k, D]``; exactly 0 for an empty set;
        * weights (``return_weights=True``): the seeds' attention, ``[B, H, k, L]`` padded, ``[N, H, k]`` packed,
          or a list of ``[H, k, L_i]``.

    Reference code equivalent: ``PMA(dim, k, H, input_ff=False, residual="projected_query", out_proj=False,
    scale=dim**-0.5, layer_norm=ln)``.
    """

    has_weights = True

    def __init__(
        self,
        dim: int,
        num_seeds: int = 1,
        num_heads: int = 1,
        *,
        input_ff: bool = True,
        layer_norm: bool = False,
        norm_eps: float = 1e-5,
        ff_hidden_dim: int | None = None,
        residual: Residual = "query",
        out_proj: bool = True,
        scale: float | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if num_seeds < 1:
            raise ValueError(f"num_seeds: expected >= 1, got {num_seeds}")
        self.dim, self.num_seeds, self.num_heads = dim, num_seeds, num_heads
        self.seeds = nn.Parameter(torch.empty(num_seeds, dim, **kw))
        self.input_ff = row_ff(dim, dim, ff_hidden_dim, bias=bias, **kw) if input_ff else None
        self.mab = MAB(dim, num_heads, layer_norm=layer_norm, norm_eps=norm_eps, ff_hidden_dim=ff_hidden_dim,
                       residual=residual, out_proj=out_proj, scale=scale, bias=bias, dropout=dropout, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.seeds.unsqueeze(0))  # the reference code's [1, k, D] fan
        if self.input_ff is not None:
            for m in self.input_ff:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.mab.reset_parameters()

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if self.input_ff is not None:
            sets = with_values(sets, self.input_ff(sets.values))
        out, weights = self.mab.attend(self.seeds.unsqueeze(0), sets, need_weights)
        return (out.squeeze(1) if self.num_seeds == 1 else out), weights

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_seeds={self.num_seeds}, num_heads={self.num_heads}, "
                f"input_ff={self.input_ff is not None}")


# ---------------------------------------------------------------------------------------------------------------
# Set-to-set modules
# ---------------------------------------------------------------------------------------------------------------


class SetToSet(nn.Module):
    """Base of the modules that map each set to a set of the same size: one output vector per element.

    ``forward(x, mask=None, *, offsets=None, lengths=None, return_weights=False)`` accepts every input form of
    :mod:`attnpool._sets`, validates it once, sets masked rows to 0 (so that NaN there never reaches the output or
    the gradients) and hands the :class:`~attnpool._sets.Sets` to the subclass's :meth:`transform`. The output
    follows the caller's form: padded ``[B, L, D]`` with masked rows exactly 0, packed ``[N, D]``, or a list of
    ``[L_i, D]``. Weights go to the hooks of :func:`~attnpool.nn.register_weights_hook` and, when
    ``return_weights``, back to the caller, formatted by :meth:`format_weights`.
    """

    #: whether weights can be returned for packed input
    packed_weights: bool = True

    def transform(self, sets: Sets, need_weights: bool) -> tuple[Tensor, Tensor | None, Sets]:
        """Map validated sets (masked rows hold 0). Returns the per-element output (``[B, L, D]`` padded or
        ``[N, D]`` packed), the weights or None, and the :class:`Sets` the weights' internal layout refers to."""
        raise NotImplementedError

    def format_weights(self, sets: Sets, weights: Tensor) -> Any:
        """Weights in the caller's form (``sets`` is the caller's input)."""
        return format_weights(sets, weights)

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        mask: Tensor | None = None,
        *,
        offsets: Tensor | None = None,
        lengths: Tensor | None = None,
        return_weights: bool = False,
    ) -> Any:
        sets = as_sets(x, mask=mask, offsets=offsets, lengths=lengths).zero_masked()
        if return_weights and sets.layout == "packed" and not self.packed_weights:
            raise TypeError(f"return_weights: {type(self).__name__} has no packed layout for its weights; pass the "
                            "sets as a list of tensors (weights: a list of [H, L_i, L_i]) or padded")
        out, weights, weight_sets = self.transform(sets, return_weights or bool(weights_hooks(self)))
        if sets.mask is not None:
            out = torch.where(sets.mask.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        call_weights_hooks(self, weights, weight_sets)
        result = sets.elementwise_output(out)
        if return_weights:
            assert weights is not None
            return result, self.format_weights(sets, weights)
        return result


class SAB(SetToSet):
    r"""Set attention block (Lee et al. 2019, eq. 8): self-attention among the elements of each set.

    .. math::
        \mathrm{SAB}(X) = \mathrm{MAB}(X, X)

    with :class:`MAB` as documented there. Permutation equivariant; cost ``O(L^2)`` per set. Packed and list input
    are padded internally to ``[B, L_max, D]`` (the query rows at padded positions see zeros and are dropped).

    Args:
        dim: ``D``, the output size.
        num_heads: ``H``, dividing ``D``.
        in_dim: the element size; default ``D``. With ``in_dim != D`` use ``residual="projected_query"``.
        layer_norm, norm_eps, ff_hidden_dim, residual, out_proj, scale, bias, dropout: those of :class:`MAB`.

    Shapes:
        * input: ``[B, L, in_dim]`` + ``mask [B, L]``, ``[N, in_dim]`` + ``offsets``/``lengths``, or a list of
          ``[L_i, in_dim]``;
        * output: the same form with size ``D``: ``[B, L, D]`` (masked rows exactly 0), ``[N, D]``, or a list of
          ``[L_i, D]``;
        * weights (``return_weights=True``): every element attending over its set: ``[B, H, L, L]`` (query, then
          key) padded, with rows and columns of masked positions exactly 0, or a list of ``[H, L_i, L_i]``.
          Packed input has no layout for them and raises TypeError. The hooks receive the ``[B, H, L, L]`` form
          and the padded :class:`Sets` it refers to.

    Reference code equivalent: ``SAB(dim, H, in_dim=d_in, residual="projected_query", out_proj=False,
    scale=dim**-0.5, layer_norm=ln)``.
    """

    packed_weights = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        in_dim: int | None = None,
        layer_norm: bool = False,
        norm_eps: float = 1e-5,
        ff_hidden_dim: int | None = None,
        residual: Residual = "query",
        out_proj: bool = True,
        scale: float | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.in_dim = dim if in_dim is None else in_dim
        self.mab = MAB(dim, num_heads, query_dim=self.in_dim, kv_dim=self.in_dim, layer_norm=layer_norm,
                       norm_eps=norm_eps, ff_hidden_dim=ff_hidden_dim, residual=residual, out_proj=out_proj,
                       scale=scale, bias=bias, dropout=dropout, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.mab.reset_parameters()

    def transform(self, sets: Sets, need_weights: bool) -> tuple[Tensor, Tensor | None, Sets]:
        if sets.is_padded:
            padded, index = sets, None
        else:
            padded, seg, pos = pad_packed(sets)
            index = (seg, pos)
        out, weights = self.mab.attend(padded.values, padded, need_weights)
        if weights is not None and padded.mask is not None:
            # rows of padded queries: they attended (to real keys) from a zero query; not part of any set
            weights = weights * padded.mask[:, None, :, None].to(weights.dtype)
        if index is not None:
            out = out[index]
        return out, weights, padded

    def format_weights(self, sets: Sets, weights: Tensor) -> Any:
        if sets.layout == "list":
            return [weights[b, :, :n, :n] for b, n in enumerate(sets.lengths.tolist())]
        return weights

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}" + (
            f", in_dim={self.in_dim}" if self.in_dim != self.dim else "")


class ISAB(SetToSet):
    r"""Induced set attention block (Lee et al. 2019, eq. 9-10): ``m`` learned inducing points summarize the set,
    and the elements attend over the summary, in ``O(L m)`` rather than ``O(L^2)``.

    .. math::
        \mathrm{ISAB}_m(X) = \mathrm{MAB}(X, H), \qquad H = \mathrm{MAB}(I, X), \qquad I \in \mathbb{R}^{m \times D}

    with :class:`MAB` as documented there (``mab0`` computes ``H``, ``mab1`` the output). Permutation
    equivariant. Inducing points are initialized as in the reference code (Xavier uniform of ``[1, m, D]``).

    Args:
        dim: ``D``, the output size and that of the inducing points.
        num_inducing: ``m``.
        num_heads: ``H``, dividing ``D``.
        in_dim: the element size; default ``D``. With ``in_dim != D`` use ``residual="projected_query"``.
        layer_norm, norm_eps, ff_hidden_dim, residual, out_proj, scale, bias, dropout: those of both :class:`MAB`.

    Shapes:
        * input and output: as :class:`SAB`;
        * weights (``return_weights=True``): those of ``mab0``, the inducing points attending over the set:
          ``[B, H, m, L]`` padded, ``[N, H, m]`` packed, or a list of ``[H, m, L_i]``.

    For an empty set ``H`` is unspecified; it is never seen, as the set has no element to query it. Reference
    code equivalent: ``ISAB(dim, m, H, in_dim=d_in, residual="projected_query", out_proj=False,
    scale=dim**-0.5, layer_norm=ln)``.
    """

    def __init__(
        self,
        dim: int,
        num_inducing: int,
        num_heads: int = 1,
        *,
        in_dim: int | None = None,
        layer_norm: bool = False,
        norm_eps: float = 1e-5,
        ff_hidden_dim: int | None = None,
        residual: Residual = "query",
        out_proj: bool = True,
        scale: float | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if num_inducing < 1:
            raise ValueError(f"num_inducing: expected >= 1, got {num_inducing}")
        self.dim, self.num_inducing, self.num_heads = dim, num_inducing, num_heads
        self.in_dim = dim if in_dim is None else in_dim
        common: dict[str, Any] = {"layer_norm": layer_norm, "norm_eps": norm_eps, "ff_hidden_dim": ff_hidden_dim,
                                  "residual": residual, "out_proj": out_proj, "scale": scale, "bias": bias,
                                  "dropout": dropout, **kw}
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim, **kw))
        self.mab0 = MAB(dim, num_heads, query_dim=dim, kv_dim=self.in_dim, **common)
        self.mab1 = MAB(dim, num_heads, query_dim=self.in_dim, kv_dim=dim, **common)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.inducing.unsqueeze(0))  # the reference code's [1, m, D] fan
        self.mab0.reset_parameters()
        self.mab1.reset_parameters()

    def transform(self, sets: Sets, need_weights: bool) -> tuple[Tensor, Tensor | None, Sets]:
        h, weights = self.mab0.attend(self.inducing.unsqueeze(0), sets, need_weights)  # [B, m, D]
        summary = dense_sets(h)
        if sets.is_padded:
            out, _ = self.mab1.attend(sets.values, summary)
        else:
            padded, seg, pos = pad_packed(sets)
            out = self.mab1.attend(padded.values, summary)[0][seg, pos]
        return out, weights, sets

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_inducing={self.num_inducing}, num_heads={self.num_heads}" + (
            f", in_dim={self.in_dim}" if self.in_dim != self.dim else "")
