"""``torch.nn.MultiheadAttention`` used as a pooler (learned or given queries over a set) as an AttentionPool."""

from __future__ import annotations

from torch import Tensor, nn

from attnpool.convert._common import StateDict, check_heads, factory, load_exact, read_state_dict, reject_extra, require
from attnpool.nn.attention_pool import AttentionPool

__all__ = ["from_multihead_attention", "in_proj_chunks"]

_WHAT = "nn.MultiheadAttention"


def in_proj_chunks(sd: StateDict, dim: int, what: str) -> dict[str, Tensor]:
    """``W_q, W_k, W_v`` (and biases) of an ``nn.MultiheadAttention`` state dict, fused (``in_proj_weight``, rows
    ``[q; k; v]``) or separate (``q_proj_weight``... when ``kdim``/``vdim`` differ from ``embed_dim``), under
    attnpool's names ``query_proj.weight``, ``key_proj.weight``, ... ."""
    out: dict[str, Tensor] = {}
    if "in_proj_weight" in sd:
        w = sd["in_proj_weight"]
        if w.shape[0] != 3 * dim:
            raise ValueError(f"{what}: in_proj_weight has {w.shape[0]} rows, expected 3 * embed_dim = {3 * dim}")
        out.update({"query_proj.weight": w[:dim], "key_proj.weight": w[dim:2 * dim], "value_proj.weight": w[2 * dim:]})
    else:
        require(sd, ["q_proj_weight", "k_proj_weight", "v_proj_weight"], what)
        out.update({"query_proj.weight": sd["q_proj_weight"], "key_proj.weight": sd["k_proj_weight"],
                    "value_proj.weight": sd["v_proj_weight"]})
    if "in_proj_bias" in sd:
        b = sd["in_proj_bias"]
        out.update({"query_proj.bias": b[:dim], "key_proj.bias": b[dim:2 * dim], "value_proj.bias": b[2 * dim:]})
    return out


def from_multihead_attention(
    module_or_state_dict: nn.MultiheadAttention | StateDict,
    query: Tensor | None = None,
    *,
    num_heads: int | None = None,
    prefix: str = "",
) -> AttentionPool:
    r"""The :class:`~attnpool.nn.AttentionPool` that computes ``mha(query, x, x, key_padding_mask=~mask)[0]``.

    An ``nn.MultiheadAttention`` becomes a pooler when its queries are learned vectors (or a context vector per
    set) and its keys and values are the set: ``W_o [softmax(W_q q (W_k x)^T / sqrt(D/H)) W_v x]_heads``. That is
    an AttentionPool with all four projections; the weights move as the rows ``[q; k; v]`` of ``in_proj_weight``
    and ``in_proj_bias`` to ``query_proj``, ``key_proj``, ``value_proj``, and ``out_proj`` to ``out_proj``.

    With ``query`` (``[D]``, ``[Q, D]`` or ``[1, Q, D]``) the queries are learned: they become the AttentionPool's
    ``query`` parameter (a copy). Without it, the AttentionPool has no learned query and takes one at call time,
    ``pool(x, mask, query=q)``, which equals ``mha(q, x, x, key_padding_mask=~mask)`` (``q`` ``[B, Q, D]``).

    Differences of convention (not of results):

    * ``key_padding_mask`` is True where an element is **padding**; attnpool's ``mask`` is True where it is **kept**
      (Hugging Face's convention): pass ``mask=~key_padding_mask``.
    * with ``batch_first=False`` (its default) MHA takes ``[L, B, D]``; attnpool takes ``[B, L, D]``, packed
      ``[N, D]`` + offsets, or a list.
    * a set with every element masked: MHA gives NaN when it computes weights (``need_weights=True``, its
      default) and, through SDPA with ``need_weights=False``, zero attention and so ``out_proj.bias``;
      attnpool gives exactly 0, with finite gradients.
    * MHA reads the values at masked positions (a NaN in the padding makes the output NaN); attnpool never does.

    Args:
        module_or_state_dict: the ``nn.MultiheadAttention`` or its state dict (then give ``num_heads``).
        query: learned queries, or None for a module that takes its query at call time.
        num_heads: heads (state dict only).
        prefix: the layer's key prefix in a larger state dict.

    Raises:
        NotImplementedError: ``add_bias_kv=True`` or ``add_zero_attn=True`` (an extra key/value that every query
            attends to), or ``kdim``/``vdim`` other than ``embed_dim`` (AttentionPool's key and value projections
            keep the width).
    """
    if isinstance(module_or_state_dict, nn.MultiheadAttention):
        mha = module_or_state_dict
        if mha.add_zero_attn:
            raise NotImplementedError(f"{_WHAT}: add_zero_attn=True appends a zero key and value that every query "
                                      "attends to; attnpool pools the set's elements only")
        num_heads = mha.num_heads
    sd = read_state_dict(module_or_state_dict, prefix, _WHAT)
    if "bias_k" in sd or "bias_v" in sd:
        raise NotImplementedError(f"{_WHAT}: add_bias_kv=True appends a learned key and value that every query "
                                  "attends to; attnpool pools the set's elements only")
    require(sd, ["out_proj.weight"], _WHAT)
    dim = sd["out_proj.weight"].shape[0]
    if "in_proj_weight" not in sd:
        raise NotImplementedError(f"{_WHAT}: kdim/vdim differ from embed_dim = {dim}; AttentionPool's key and value "
                                  "projections map D -> D")
    num_heads = check_heads(num_heads, dim, _WHAT)
    bias = "in_proj_bias" in sd
    if bias != ("out_proj.bias" in sd):
        raise NotImplementedError(f"{_WHAT}: a bias on only some projections; AttentionPool's bias flag covers all")
    tensors = in_proj_chunks(sd, dim, _WHAT)
    tensors["out_proj.weight"] = sd["out_proj.weight"]
    if bias:
        tensors["out_proj.bias"] = sd["out_proj.bias"]
    reject_extra(sd, {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}, _WHAT)

    num_queries = 0
    if query is not None:
        if not isinstance(query, Tensor):
            raise TypeError(f"query: expected a tensor [D], [Q, D] or [1, Q, D], got {type(query).__name__}")
        q = query.detach()
        if q.dim() == 3 and q.shape[0] == 1:
            q = q[0]
        elif q.dim() == 1:
            q = q.unsqueeze(0)
        if q.dim() != 2 or q.shape[1] != dim:
            raise ValueError(f"query: expected shape [{dim}], [Q, {dim}] or [1, Q, {dim}], got {tuple(query.shape)}")
        num_queries = q.shape[0]
        tensors["query"] = q
    dropout = module_or_state_dict.dropout if isinstance(module_or_state_dict, nn.Module) else 0.0
    pool = AttentionPool(dim, num_queries, num_heads, query_proj=True, key_proj=True, value_proj=True, out_proj=True,
                         bias=bias, dropout=dropout, **factory(sd))
    load_exact(pool, tensors, _WHAT)
    return pool.eval()
