"""timm's ``AttentionPoolLatent`` (the SigLIP MAP head of timm's vision transformers) as an attnpool module."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnpool.convert._common import (
    StateDict,
    bias_or_zeros,
    check_heads,
    class_name,
    factory,
    load_exact,
    read_state_dict,
    reject_extra,
    require,
)
from attnpool.nn.attention_pool import AttentionPool
from attnpool.nn.map_head import MAPHead

__all__ = ["from_timm_attention_pool_latent", "keep_mask_from_sdpa_mask"]

_WHAT = "timm AttentionPoolLatent"


def _module_options(m: Any) -> dict[str, Any]:
    """The configuration of a live ``AttentionPoolLatent`` that its state dict does not hold."""
    if not all(hasattr(m, name) for name in ("latent", "kv", "norm", "num_heads", "pool")):
        raise TypeError(f"module_or_state_dict: expected a timm AttentionPoolLatent, got {class_name(m)} (for a whole "
                        "model, pass model.attn_pool, or its state_dict() with prefix=)")
    if getattr(m, "pos_embed", None) is not None:
        raise NotImplementedError(f"{_WHAT}: pos_embed='abs' adds a learned embedding per position, so the result "
                                  "depends on the order of the elements: not a set pooling. Add it to the input "
                                  "yourself (x + pos_embed) and convert a copy built without it")
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{_WHAT}: qk_norm=True normalizes each head's query and keys; attnpool's "
                                      "MAPHead has no per-head query/key normalization")
    norm = m.norm
    if isinstance(norm, nn.Identity):
        norm_eps = None
    elif type(norm) is nn.LayerNorm or (isinstance(norm, nn.LayerNorm) and type(norm).forward is nn.LayerNorm.forward):
        norm_eps = norm.eps
    else:
        raise NotImplementedError(f"{_WHAT}: norm layer {class_name(norm)} is not a LayerNorm; MAPHead's norm is one")
    gelu_approximate = None
    mlp = getattr(m, "mlp", None)
    if mlp is not None:
        act = mlp.act
        if type(act) is not nn.GELU:
            raise NotImplementedError(f"{_WHAT}: MLP activation {class_name(act)}; MAPHead's MLP uses nn.GELU "
                                      "(exact or tanh)")
        gelu_approximate = act.approximate
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{_WHAT}: a norm inside the MLP; MAPHead's MLP has none")
    return {"num_heads": m.num_heads, "pool_type": m.pool, "norm_eps": norm_eps, "gelu_approximate": gelu_approximate,
            "norm_affine": norm_eps is not None and getattr(norm, "weight", None) is not None}


def from_timm_attention_pool_latent(
    module_or_state_dict: nn.Module | StateDict,
    *,
    num_heads: int | None = None,
    pool_type: str | None = None,
    norm_eps: float = 1e-6,
    gelu_approximate: str = "none",
    prefix: str = "",
) -> MAPHead | AttentionPool:
    r"""Build the attnpool module that computes what timm's ``AttentionPoolLatent`` computes, with its weights.

    ``AttentionPoolLatent`` (``timm.layers.attention_pool``) is the multihead attention pooling head of SigLIP and
    of timm's vision transformers with ``global_pool="map"``: ``out = a + MLP(norm(a))`` with
    ``a = proj(MHA(q(latent), kv(x)))``. It becomes a :class:`~attnpool.nn.MAPHead` (or, for ``out_features=0``,
    which has no projection, norm or MLP, an :class:`~attnpool.nn.AttentionPool` with query, key and value
    projections) whose outputs match timm's to float32 rounding (tested to 1e-6 against timm itself).

    Weights move as ``latent -> probe``, ``q -> attn.query_proj`` (the identity when timm has ``q_proj=False``),
    the first and second halves of the rows of the fused ``kv`` to ``attn.key_proj`` and ``attn.value_proj``,
    ``proj -> attn.out_proj``, ``norm -> norm``, ``mlp.fc1/fc2 -> mlp.fc1/fc2``.

    **Which latents.** timm computes all ``latent_len`` latents and then keeps the first (``pool_type="token"``,
    its default), their mean (``"avg"``) or all (``""``). The latents never interact (each attends on its own and
    the MLP acts row by row), so ``"token"`` converts to a one-probe head holding the first latent, exactly and at
    a fraction of the cost; ``""`` keeps every latent (``[B, k, D]``; for ``k = 1`` attnpool returns ``[B, D]``
    where timm returns ``[B, 1, D]``); ``"avg"`` with several latents raises: convert with ``pool_type=""`` and take
    ``.mean(1)`` of the output.

    **The mask quirk.** timm passes ``attn_mask`` to ``F.scaled_dot_product_attention`` unchanged (or, on its
    non-fused path, adds it to the logits). What that means:

    * It is an SDPA mask, broadcast against the logits ``[B, H, latent_len, N]``. A **boolean** mask means
      True = attend, as attnpool's ``mask`` does, but it must be shaped ``[B, 1, 1, N]``: the ``[B, N]`` mask that
      attnpool and Hugging Face use broadcasts as ``[1, 1, B, N]``, an error for ``B > 1`` unless
      ``latent_len == B``, where it silently masks *latent* ``i`` with row ``i`` of the mask for every set instead.
      :func:`keep_mask_from_sdpa_mask` turns an SDPA mask into attnpool's ``[B, N]`` keep mask (and refuses one
      that varies across heads or latents).
    * A **float** mask is a bias added to the logits: ``0``/``-inf`` is a mask (converted as above); any other
      value re-weights elements, which attnpool's modules do not do.
    * On timm's **non-fused path** (``TIMM_FUSED_ATTN=0``, ``set_layer_config(exportable=True)``, or
      ``fused_attn=False``) a boolean mask is *added* to the logits: ``True`` adds 1 and ``False`` adds 0, so
      nothing is masked and the kept elements' logits grow by 1. The fused path (the default) masks.
    * Masked elements still go through ``kv``: a NaN or Inf in the padding turns the whole output NaN. A set with
      every element masked gives, in torch 2.13's SDPA on the CPU, zero attention and so the output
      ``proj.bias + MLP(norm(proj.bias))`` (other SDPA backends and torch versions give NaN).

    attnpool instead takes ``mask [B, N]`` (True = keep), never reads masked values (NaN in the padding is
    harmless), returns exactly 0 for an empty set, and accepts packed and list input too. The converted module
    matches timm's fused path given ``attn_mask=mask[:, None, None, :]`` on every non-empty set.

    Args:
        module_or_state_dict: an ``AttentionPoolLatent`` (its configuration is read from it) or its state dict
            (then give ``num_heads`` and, where they differ from the defaults, the options below).
        num_heads: heads (state dict only; timm's default is 8 but the state dict does not record it).
        pool_type: timm's ``pool_type`` (state dict only; default ``"token"``).
        norm_eps: the epsilon of the LayerNorm before the MLP, when the state dict has one (state dict only;
            timm's vision transformers use ``1e-6``).
        gelu_approximate: ``"none"`` (``nn.GELU``, timm's default) or ``"tanh"`` (state dict only).
        prefix: the layer's key prefix in a larger state dict, e.g. ``"head.attn_pool."`` for a whole ViT.

    Returns:
        a :class:`~attnpool.nn.MAPHead` in eval mode on the weights' device and dtype, or an
        :class:`~attnpool.nn.AttentionPool` for ``out_features=0``.

    Raises:
        NotImplementedError: ``pos_embed="abs"``, ``qk_norm=True``, ``latent_dim != embed_dim``, ``out_features``
            other than ``in_features`` or 0, a non-LayerNorm norm, an activation other than ``nn.GELU``, or
            ``pool_type="avg"`` with several latents: no attnpool module computes those exactly.
    """
    is_module = isinstance(module_or_state_dict, nn.Module)
    opts: dict[str, Any] = {}
    if isinstance(module_or_state_dict, nn.Module):
        opts = _module_options(module_or_state_dict)
        num_heads, pool_type = opts["num_heads"], opts["pool_type"]
    sd = read_state_dict(module_or_state_dict, prefix, _WHAT)
    require(sd, ["latent", "kv.weight"], _WHAT)
    if "pos_embed" in sd:
        raise NotImplementedError(f"{_WHAT}: pos_embed='abs' makes the pooling depend on the order of the elements")
    if "q_norm.weight" in sd or "k_norm.weight" in sd:
        raise NotImplementedError(f"{_WHAT}: qk_norm=True has no attnpool equivalent")
    if "mlp.norm.weight" in sd:
        raise NotImplementedError(f"{_WHAT}: a norm inside the MLP has no place in MAPHead")
    pool_type = "token" if pool_type is None else pool_type

    latent, kv_w = sd["latent"], sd["kv.weight"]
    dim = kv_w.shape[1]
    if kv_w.shape[0] != 2 * dim:
        raise NotImplementedError(f"{_WHAT}: embed_dim {kv_w.shape[0] // 2} differs from in_features {dim}")
    if latent.dim() != 3 or latent.shape[0] != 1:
        raise ValueError(f"module_or_state_dict: expected latent of shape [1, latent_len, latent_dim], got "
                         f"{tuple(latent.shape)}")
    if latent.shape[2] != dim:
        raise NotImplementedError(f"{_WHAT}: latent_dim {latent.shape[2]} differs from embed_dim {dim}; attnpool's "
                                  "probes have the width of the elements")
    num_heads = check_heads(num_heads, dim, _WHAT)
    k = latent.shape[1]
    if pool_type == "token":
        probes = latent[0, :1]
    elif pool_type == "avg" and k > 1:
        raise NotImplementedError(f"{_WHAT}: pool_type='avg' averages {k} latents; convert with pool_type='' and "
                                  "average the [B, k, D] output over dim 1")
    else:
        probes = latent[0]
    qkv_bias = "kv.bias" in sd
    kv_b = sd.get("kv.bias")
    q_w = sd.get("q.weight", torch.eye(dim, dtype=kv_w.dtype, device=kv_w.device))  # q_proj=False: identity
    used = {"latent", "kv.weight", "kv.bias", "q.weight", "q.bias"}

    tensors: dict[str, Tensor] = {
        "query_proj.weight": q_w,
        "key_proj.weight": kv_w[:dim],
        "value_proj.weight": kv_w[dim:],
    }
    if qkv_bias:
        assert kv_b is not None
        tensors.update({"query_proj.bias": bias_or_zeros(sd.get("q.bias"), dim, kv_w), "key_proj.bias": kv_b[:dim],
                        "value_proj.bias": kv_b[dim:]})

    kw = factory(sd)
    has_mlp = "mlp.fc1.weight" in sd
    if not has_mlp:  # out_features=0: attention only, no projection, norm or MLP
        reject_extra(sd, used, _WHAT)
        pool = AttentionPool(dim, probes.shape[0], num_heads, query_proj=True, key_proj=True, value_proj=True,
                             bias=qkv_bias, **kw)
        load_exact(pool, {"query": probes, **tensors}, _WHAT)
        return pool.eval()

    require(sd, ["proj.weight", "proj.bias", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"], _WHAT)
    if sd["proj.weight"].shape != (dim, dim):
        raise NotImplementedError(f"{_WHAT}: out_features {sd['proj.weight'].shape[0]} differs from in_features "
                                  f"{dim}; MAPHead keeps the width")
    hidden = sd["mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # float ratios that do not round-trip: find one that gives `hidden`
        mlp_ratio = math.nextafter(hidden / dim, math.inf)
    has_norm = "norm.weight" in sd or (is_module and opts["norm_eps"] is not None)
    if is_module and opts["norm_eps"] is not None:
        norm_eps = opts["norm_eps"]
    if is_module and opts["gelu_approximate"] is not None:
        gelu_approximate = opts["gelu_approximate"]
    head = MAPHead(dim, num_heads, num_probes=probes.shape[0], mlp_ratio=mlp_ratio, norm_eps=norm_eps, norm=has_norm,
                   qkv_bias=qkv_bias, gelu_approximate=gelu_approximate, **kw)
    tensors = {f"attn.{name}": t for name, t in tensors.items()}
    tensors.update({
        "probe": probes,
        "attn.out_proj.weight": sd["proj.weight"], "attn.out_proj.bias": sd["proj.bias"],
        "mlp.fc1.weight": sd["mlp.fc1.weight"], "mlp.fc1.bias": sd["mlp.fc1.bias"],
        "mlp.fc2.weight": sd["mlp.fc2.weight"], "mlp.fc2.bias": sd["mlp.fc2.bias"],
    })
    used |= {"proj.weight", "proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
             "norm.weight", "norm.bias"}
    if has_norm:  # a LayerNorm without affine weights is one with weight 1 and bias 0, exactly
        tensors["norm.weight"] = sd.get("norm.weight", torch.ones(dim, dtype=kv_w.dtype, device=kv_w.device))
        tensors["norm.bias"] = bias_or_zeros(sd.get("norm.bias"), dim, kv_w)
    reject_extra(sd, used, _WHAT)
    load_exact(head, tensors, _WHAT)
    return head.eval()


def keep_mask_from_sdpa_mask(attn_mask: Tensor, batch_size: int, num_elements: int) -> Tensor:
    """attnpool's ``[B, N]`` keep mask (True = keep) from a mask given to ``F.scaled_dot_product_attention``.

    ``attn_mask`` broadcasts against the logits ``[B, H, Q, N]`` (``[N]``, ``[B, 1, 1, N]``, ``[B, H, Q, N]`` ...).
    A boolean mask keeps True; a float mask keeps 0 and drops ``-inf``. attnpool masks per set and element, so
    the mask must be the same for every head and query.

    Raises:
        ValueError: a mask that does not broadcast to ``[B, *, *, N]``, differs across heads or queries, or is a
            float mask with values other than 0 and ``-inf`` (a bias that re-weights elements rather than a mask).
    """
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask: expected a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask: expected at most 4 dims (broadcasting to [B, H, Q, N]), got "
                         f"{tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[0] not in (1, batch_size) or m.shape[3] not in (1, num_elements):
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to [B, H, Q, N] with B = "
                         f"{batch_size} and N = {num_elements} (a [B, N] mask must be passed as [B, 1, 1, N])")
    if m.dtype == torch.bool:
        keep = m
    elif m.is_floating_point():
        finite = torch.isfinite(m)
        if bool((finite & (m != 0)).any()) or bool((~finite & (m != float("-inf"))).any()):
            raise ValueError("attn_mask: a float mask holding values other than 0 and -inf is an additive bias that "
                             "re-weights elements; attnpool's modules take a keep mask only")
        keep = m == 0
    else:
        raise TypeError(f"attn_mask: expected a bool or float tensor, got dtype {m.dtype}")
    if bool((keep != keep[:, :1, :1, :]).any()):
        hint = (" (SDPA reads a 2-D mask as [Q, N], one row per query: a per-set [B, N] mask must be passed as "
                "mask[:, None, None, :])") if attn_mask.dim() == 2 else ""
        raise ValueError(f"attn_mask: the mask differs across heads or queries; attnpool masks elements of a set{hint}")
    return keep[:, 0, 0, :].expand(batch_size, num_elements).clone()
