"""open_clip's ``AttentionalPooler`` (CoCa's attentional pooler) as an attnpool LatentCrossAttention."""

from __future__ import annotations

from torch import Tensor, nn

from attnpool.convert._common import StateDict, check_heads, factory, load_exact, read_state_dict, reject_extra, require
from attnpool.convert.multihead_attention import in_proj_chunks
from attnpool.nn.latent_cross_attention import LatentCrossAttention

__all__ = ["from_open_clip_attentional_pooler"]

_WHAT = "open_clip AttentionalPooler"

def from_open_clip_attentional_pooler(
    module_or_state_dict: nn.Module | StateDict,
    *,
    num_heads: int | None = None,
    norm_eps: float = 1e-5,
    prefix: str = "",
) -> LatentCrossAttention:
    r"""Build the attnpool module that computes what open_clip's ``AttentionalPooler`` computes, with its weights.

    open_clip's ``AttentionalPooler`` (``open_clip.transformer``; CoCa's attentional pooler, Yu et al. 2022) is

    .. math::
        \mathrm{out} = \mathrm{MHA}\big(\mathrm{LN}_q(Q),\ \mathrm{LN}_k(x),\ \mathrm{LN}_k(x)\big)

    with ``n_queries`` learned queries ``Q`` of width ``d_model``, elements of width ``context_dim`` and an
    ``nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)``. That is one block of
    :class:`~attnpool.nn.LatentCrossAttention` with its residual and feed-forward switched off
    (``residual=False, mlp_ratio=0``): ``latents <- query``, ``layers.0.norm_q <- ln_q``,
    ``layers.0.norm_kv <- ln_k``, ``layers.0.attn.{query,key,value}_proj <- attn.{q,k,v}_proj_weight`` (or the
    rows of ``in_proj_weight`` when ``context_dim == d_model``) and ``attn.in_proj_bias``,
    ``layers.0.attn.out_proj <- attn.out_proj``.

    Differences: open_clip's pooler takes no mask (every element of ``[B, N, context_dim]`` is pooled), so padded
    batches need it to be run set by set; the converted module takes ``mask``, packed or list input, and returns
    exactly 0 for an empty set. With one query open_clip returns ``[B, 1, D]`` and attnpool ``[B, D]``.

    Args:
        module_or_state_dict: an ``AttentionalPooler`` or its state dict (then give ``num_heads``).
        num_heads: heads (state dict only; open_clip's default is 8).
        norm_eps: the LayerNorms' epsilon (state dict only; open_clip's ``LayerNorm`` default is ``1e-5``).
        prefix: the layer's key prefix in a larger state dict, e.g. ``"visual.attn_pool."`` in a CoCa model.

    Raises:
        NotImplementedError: for LayerNorms of different epsilons, or a pooler without biases.
    """
    if isinstance(module_or_state_dict, nn.Module):
        m = module_or_state_dict
        attn = m.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"module_or_state_dict: expected an {_WHAT} (attn: nn.MultiheadAttention), got "
                            f"{type(m).__name__}")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise NotImplementedError(f"{_WHAT}: add_bias_kv / add_zero_attn have no attnpool equivalent")
        num_heads = attn.num_heads
        eps = {getattr(m.ln_q, "eps", None), getattr(m.ln_k, "eps", None)}
        if None in eps or len(eps) != 1:
            raise NotImplementedError(f"{_WHAT}: ln_q and ln_k must be LayerNorms of one epsilon, got "
                                      f"{type(m.ln_q).__name__}, {type(m.ln_k).__name__} with eps {eps}")
        norm_eps = eps.pop()  # type: ignore[assignment]
    sd = read_state_dict(module_or_state_dict, prefix, _WHAT)
    require(sd, ["query", "ln_q.weight", "ln_k.weight", "attn.out_proj.weight"], _WHAT)
    query = sd["query"]
    if query.dim() != 2:
        raise ValueError(f"module_or_state_dict: expected query [n_queries, d_model], got {tuple(query.shape)}")
    n_queries, dim = query.shape
    context_dim = sd["ln_k.weight"].shape[0]
    num_heads = check_heads(num_heads, dim, _WHAT)
    if not ("attn.in_proj_bias" in sd and "attn.out_proj.bias" in sd and "ln_q.bias" in sd and "ln_k.bias" in sd):
        raise NotImplementedError(f"{_WHAT}: projections or LayerNorms without biases; LatentCrossAttention's bias "
                                  "flag covers the projections only and its LayerNorms always have one")

    attn_sd = {k.removeprefix("attn."): v for k, v in sd.items() if k.startswith("attn.")}
    tensors: dict[str, Tensor] = {"latents": query}
    for name, t in in_proj_chunks(attn_sd, dim, _WHAT).items():
        tensors[f"layers.0.attn.{name}"] = t
    tensors.update({
        "layers.0.attn.out_proj.weight": sd["attn.out_proj.weight"], "layers.0.attn.out_proj.bias":
            sd["attn.out_proj.bias"],
        "layers.0.norm_q.weight": sd["ln_q.weight"], "layers.0.norm_q.bias": sd["ln_q.bias"],
        "layers.0.norm_kv.weight": sd["ln_k.weight"], "layers.0.norm_kv.bias": sd["ln_k.bias"],
    })
    reject_extra(sd, {"query", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias", "attn.in_proj_weight",
                      "attn.in_proj_bias", "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                      "attn.out_proj.weight", "attn.out_proj.bias"}, _WHAT)
    pool = LatentCrossAttention(dim, n_queries, num_heads, num_layers=1, kv_dim=context_dim, norm_eps=norm_eps,
                                residual=False, mlp_ratio=0, **factory(sd))  # type: ignore[call-arg]
    load_exact(pool, tensors, _WHAT)
    return pool.eval()
