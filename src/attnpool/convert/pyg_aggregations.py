"""PyTorch Geometric's attention aggregations as attnpool modules inside an ``AttnpoolAggregation``.

Each converter returns an :class:`attnpool.integrations.pyg.AttnpoolAggregation`, a drop-in for the PyG module
(same call, ``aggr(x, index)`` or ``aggr(x, ptr=ptr)``, same outputs), whose ``.pool`` (and ``.encoders``,
``.decoders``) are plain attnpool modules usable without PyG on padded, packed or list input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnpool.convert._common import class_name, load_exact
from attnpool.convert.multihead_attention import in_proj_chunks
from attnpool.nn.attention_pool import AttentionPool
from attnpool.nn.channel_softmax_pool import ChannelSoftmaxPool
from attnpool.nn.gated_attention_pool import GatedAttentionPool
from attnpool.nn.set_transformer import PMA, SAB

__all__ = [
    "from_pyg_attentional_aggregation",
    "from_pyg_set_transformer_aggregation",
    "from_pyg_softmax_aggregation",
]


def _aggregation(pool: nn.Module, **kwargs: Any) -> nn.Module:
    from attnpool.integrations.pyg import AttnpoolAggregation

    return AttnpoolAggregation(pool, **kwargs).eval()


def _kw(t: Tensor) -> dict[str, Any]:
    return {"device": t.device, "dtype": t.dtype}


def from_pyg_attentional_aggregation(aggr: Any) -> nn.Module:
    r"""PyG's ``AttentionalAggregation`` (Li et al. 2019, "Graph Matching Networks") as attnpool pooling.

    PyG computes ``r = Σ_n softmax_n(gate_nn(x_n)) · nn(x_n)`` with any networks ``gate_nn`` and ``nn``. attnpool
    expresses the two gates that attention pooling uses, with ``nn=None``:

    * ``gate_nn = Linear(F, 1)``: the score ``w·x + c`` is a dot product with a learned query ``w``, the
      :class:`~attnpool.nn.AttentionPool` ``(F, score="dot")`` with ``query = w``;
    * ``gate_nn = Sequential(Linear(F, A), Tanh(), Linear(A, 1))``: the attention MIL score of Ilse et al. 2018,
      ``w^T tanh(V x + b) + c``, the :class:`~attnpool.nn.GatedAttentionPool` ``(F, A, gated=False)``.

    The gate's last bias ``c`` adds the same constant to every score of a group, which the softmax cancels: it is
    dropped (outputs agree to float32 rounding). Empty groups give 0 in both.

    Raises:
        NotImplementedError: another ``gate_nn`` (a PyG ``MLP``, other activations, a feature-level gate with more
            than one output), or an ``nn`` (a transform of the values that attnpool's gated pools do not have).
    """
    if class_name(aggr) != "AttentionalAggregation":
        raise TypeError(f"aggr: expected torch_geometric.nn.aggr.AttentionalAggregation, got {class_name(aggr)}")
    if aggr.nn is not None or aggr.mlp is not None:
        raise NotImplementedError("AttentionalAggregation: an `nn` transforming the values before the weighted sum "
                                  "has no place in attnpool's gated pools (which pool the inputs themselves)")
    gate = aggr.gate_nn
    if gate is None:
        raise NotImplementedError("AttentionalAggregation: a PyG MLP gate (with its norms and dropout) has no exact "
                                  "attnpool equivalent; use torch.nn.Linear / Sequential(Linear, Tanh, Linear)")
    layers: list[Any] = list(gate) if isinstance(gate, nn.Sequential) else [gate]
    kinds = [type(layer) for layer in layers]
    if kinds == [nn.Linear] and layers[0].out_features == 1:
        w = layers[0].weight.detach()
        pool: nn.Module = AttentionPool(w.shape[1], 1, 1, score="dot", **_kw(w))
        load_exact(pool, {"query": w}, "AttentionalAggregation")
    elif kinds == [nn.Linear, nn.Tanh, nn.Linear] and layers[2].out_features == 1:
        hidden, last = layers[0], layers[2]
        w = hidden.weight.detach()
        pool = GatedAttentionPool(w.shape[1], w.shape[0], gated=False, **_kw(w))
        bias = hidden.bias.detach() if hidden.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        load_exact(pool, {"tanh_layer.weight": w, "tanh_layer.bias": bias, "vector": last.weight.detach()},
                   "AttentionalAggregation")
    else:
        raise NotImplementedError(f"AttentionalAggregation: gate_nn {gate} is not Linear(F, 1) or "
                                  "Sequential(Linear(F, A), Tanh(), Linear(A, 1)); no attnpool module computes it")
    return _aggregation(pool)


def from_pyg_softmax_aggregation(aggr: Any, dim: int | None = None) -> nn.Module:
    r"""PyG's ``SoftmaxAggregation`` (Li et al. 2020, "DeeperGCN") as attnpool pooling.

    PyG computes, channel by channel, ``r_c = Σ_n softmax_n(t_c x_nc) x_nc``: every channel has its own softmax
    over the group. That is :class:`~attnpool.nn.ChannelSoftmaxPool` with the same ``t``, ``learn`` and
    ``channels``, so training ties the parameters as PyG does (one ``t`` for every channel when ``channels=1``).
    Outputs agree to float32 rounding; empty groups give 0 in both.

    Args:
        aggr: the ``SoftmaxAggregation``.
        dim: optional, the feature width ``F``; checked against ``t`` when PyG has one ``t`` per channel.

    Raises:
        NotImplementedError: ``semi_grad=True`` (PyG stops the gradient through the softmax; attnpool always
            differentiates it: forward outputs would agree, gradients not).
    """
    if class_name(aggr) != "SoftmaxAggregation":
        raise TypeError(f"aggr: expected torch_geometric.nn.aggr.SoftmaxAggregation, got {class_name(aggr)}")
    if aggr.semi_grad and not aggr.learn:
        raise NotImplementedError("SoftmaxAggregation: semi_grad=True blocks the gradient through the softmax, "
                                  "which attnpool's modules always differentiate")
    t = aggr.t
    t = t.detach().reshape(-1) if isinstance(t, Tensor) else torch.tensor([float(t)])
    channels = t.numel()
    if channels > 1 and dim is not None and dim != channels:
        raise ValueError(f"dim: expected {channels} (the number of channels of t), got {dim}")
    pool = ChannelSoftmaxPool(float(t[0]), learn=aggr.learn, channels=channels, **_kw(t))
    if aggr.learn:
        load_exact(pool, {"t": t}, "SoftmaxAggregation")
    return _aggregation(pool)


def _pyg_mab_tensors(mab: Any, dim: int) -> dict[str, Tensor]:
    """A PyG ``MultiheadAttentionBlock``'s weights under the names of attnpool's :class:`~attnpool.nn.MAB`."""
    sd = {k: v.detach() for k, v in mab.state_dict().items()}
    attn_sd = {k.removeprefix("attn."): v for k, v in sd.items() if k.startswith("attn.")}
    if "bias_k" in attn_sd or getattr(mab.attn, "add_zero_attn", False):
        raise NotImplementedError("SetTransformerAggregation: attention with add_bias_kv/add_zero_attn")
    out = {f"attn.{k}": v for k, v in in_proj_chunks(attn_sd, dim, "SetTransformerAggregation").items()}
    out.update({"attn.out_proj.weight": sd["attn.out_proj.weight"], "attn.out_proj.bias": sd["attn.out_proj.bias"],
                "ff.0.weight": sd["lin.weight"], "ff.0.bias": sd["lin.bias"]})
    for ours, theirs in (("ln0", "layer_norm1"), ("ln1", "layer_norm2")):
        if f"{theirs}.weight" in sd:
            out.update({f"{ours}.weight": sd[f"{theirs}.weight"], f"{ours}.bias": sd[f"{theirs}.bias"]})
    return out


def from_pyg_set_transformer_aggregation(aggr: Any) -> nn.Module:
    r"""PyG's ``SetTransformerAggregation`` (Buterez et al. 2022) as attnpool's Set Transformer blocks.

    PyG pads each group (``to_dense_batch``) and runs ``num_encoder_blocks`` SABs, a PMA with ``num_seed_points``
    seeds, ``num_decoder_blocks`` SABs over the seeds, then concatenates the seeds (``concat=True``, ``[G, k*F]``)
    or averages them. Its blocks follow the paper, not the reference code: residual ``X + Multihead(X, Y, Y)``, an
    output projection, scale ``1/sqrt(F/H)``, the rFF ``relu(lin(h))`` added to ``h``, PMA's rFF on its input, and
    LayerNorms when ``layer_norm=True`` (epsilon ``1e-5``). Those are the defaults of attnpool's
    :class:`~attnpool.nn.SAB` and :class:`~attnpool.nn.PMA`, so the conversion is ``encoders -> SAB``,
    ``pma -> PMA``, ``decoders -> SAB`` with weights ``attn.in_proj_* -> attn.{query,key,value}_proj``,
    ``attn.out_proj -> attn.out_proj``, ``lin -> ff.0``, ``layer_norm1/2 -> ln0/ln1``, ``pma.lin -> input_ff.0``,
    ``pma.seed -> seeds``.

    Differences: PyG needs ``index`` sorted (the converted aggregation does not); an empty group gets, in torch
    2.13, a non-zero vector from PyG (its attention over no element is 0 and the seeds, biases and LayerNorms
    make the rest; earlier torch versions gave NaN, which PyG's final ``nan_to_num`` turned into 0), and exactly 0
    from attnpool.

    Returns:
        an ``AttnpoolAggregation`` with ``pool`` (a PMA), ``encoders`` and ``decoders`` (SABs).
    """
    if class_name(aggr) != "SetTransformerAggregation":
        raise TypeError(f"aggr: expected torch_geometric.nn.aggr.SetTransformerAggregation, got {class_name(aggr)}")
    dim, heads, layer_norm = aggr.channels, aggr.heads, aggr.layer_norm
    seed = aggr.pma.seed.detach()
    kw: dict[str, Any] = {"layer_norm": layer_norm, "dropout": aggr.dropout, **_kw(seed)}

    def sab(block: Any) -> SAB:
        out = SAB(dim, heads, **kw)
        load_exact(out, {f"mab.{k}": v for k, v in _pyg_mab_tensors(block.mab, dim).items()},
                   "SetTransformerAggregation")
        return out

    pma = PMA(dim, seed.shape[1], heads, input_ff=True, **kw)
    tensors = {f"mab.{k}": v for k, v in _pyg_mab_tensors(aggr.pma.mab, dim).items()}
    tensors.update({"seeds": seed.reshape(seed.shape[1], dim), "input_ff.0.weight": aggr.pma.lin.weight.detach(),
                    "input_ff.0.bias": aggr.pma.lin.bias.detach()})
    load_exact(pma, tensors, "SetTransformerAggregation")
    return _aggregation(pma, encoders=[sab(b) for b in aggr.encoders], decoders=[sab(b) for b in aggr.decoders],
                        multi_query="concat" if aggr.concat else "mean")
