"""attnpool pooling as a PyTorch Geometric aggregation: ``SAGEConv(..., aggr=AttnpoolAggregation(pool))``.

Importing this module imports ``torch_geometric``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn.aggr import Aggregation

from attnpool.nn.base import SetPool

__all__ = ["AttnpoolAggregation"]

_MULTI = ("concat", "mean")


class AttnpoolAggregation(Aggregation):
    r"""Any attnpool pooling module as a PyG :class:`~torch_geometric.nn.aggr.Aggregation`.

    Usable wherever PyG takes an aggregation: ``aggr=`` of a message-passing layer (``SAGEConv``, ``GraphConv``,
    ``GINConv`` ...), where each node pools the messages of its neighbours, or as a global readout
    ``aggr(x, batch)`` over the nodes of each graph:

    .. code-block:: python

        from attnpool.nn import AttentionPool
        from attnpool.integrations.pyg import AttnpoolAggregation

        conv = SAGEConv(64, 64, aggr=AttnpoolAggregation(AttentionPool(64, num_heads=4, key_proj=True)))
        readout = AttnpoolAggregation(AttentionPool(64, num_queries=2), multi_query="concat")  # [G, 128]
        graph_vectors = readout(conv(x, edge_index), batch)

    ``index`` need not be sorted: the elements are grouped by a stable sort first (pooling does not depend on their
    order), so unlike PyG's own ``SetTransformerAggregation`` this needs no sorted ``edge_index``. With ``ptr`` the
    elements must already be grouped. Groups with no element (isolated nodes, empty graphs) get exactly 0.

    Args:
        pool: the attnpool module that pools each group: any :class:`~attnpool.nn.SetPool`
            (``AttentionPool``, ``MAPHead``, ``PMA``, ``GatedAttentionPool``, ``MeanPool`` ...).
        encoders: set-to-set modules (:class:`~attnpool.nn.SAB`, :class:`~attnpool.nn.ISAB`) applied to each group
            before pooling, as in a Set Transformer's encoder.
        decoders: set-to-set modules applied to the ``Q`` pooled vectors of each group (the Set Transformer's
            decoder); their outputs for an empty group are set to 0.
        multi_query: how a pool with ``Q > 1`` outputs per group becomes one vector: ``"concat"`` (``[G, Q*D]``)
            or ``"mean"`` (``[G, D]``).

    Weights: the pool's attention weights reach diagnostics through :func:`attnpool.nn.register_weights_hook` as
    for any attnpool module, in the packed layout of the grouped (sorted) elements.
    """

    def __init__(self, pool: nn.Module, *, encoders: Sequence[nn.Module] = (), decoders: Sequence[nn.Module] = (),
                 multi_query: str = "concat") -> None:
        super().__init__()
        if not isinstance(pool, SetPool):
            raise TypeError(f"pool: expected an attnpool SetPool module (attnpool.nn.AttentionPool, ...), got "
                            f"{type(pool).__name__}")
        if multi_query not in _MULTI:
            raise ValueError(f"multi_query: expected one of {_MULTI}, got {multi_query!r}")
        self.pool = pool
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)
        self.multi_query = multi_query

    def reset_parameters(self) -> None:
        for m in (self.pool, *self.encoders, *self.decoders):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: Tensor, index: Tensor | None = None, ptr: Tensor | None = None,
                dim_size: int | None = None, dim: int = -2, max_num_elements: int | None = None) -> Tensor:
        if x.dim() != 2 or dim not in (0, -2):
            raise ValueError(f"x: {type(self).__name__} aggregates [N, F] inputs along dim 0, got shape "
                             f"{tuple(x.shape)} and dim={dim}")
        if ptr is not None:
            offsets = ptr.to(device=x.device, dtype=torch.long)
        else:
            if index is None:  # Aggregation.__call__ fills index and dim_size in; forward may be called directly
                index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            index = index.to(x.device)
            if dim_size is None:
                dim_size = int(index.max()) + 1 if index.numel() else 0
            if index.numel() > 1 and not bool((index[1:] >= index[:-1]).all()):
                order = torch.argsort(index, stable=True)
                x, index = x[order], index[order]
            counts = torch.bincount(index, minlength=dim_size)
            if counts.shape[0] > dim_size:
                raise ValueError(f"index: holds {int(index.max())}, not below dim_size = {dim_size}")
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        for encoder in self.encoders:
            x = encoder(x, offsets=offsets)
        out = self.pool(x, offsets=offsets)
        if self.decoders:
            single = out.dim() == 2
            h = out.unsqueeze(1) if single else out
            for decoder in self.decoders:
                h = decoder(h)
            nonempty = (offsets[1:] > offsets[:-1]).view(-1, 1, 1)
            h = torch.where(nonempty, h, torch.zeros((), dtype=h.dtype, device=h.device))
            out = h.squeeze(1) if single else h
        if out.dim() == 3:
            out = out.flatten(1) if self.multi_query == "concat" else out.mean(1)
        return out

    def attnpool_config(self) -> dict[str, Any]:
        """Constructor arguments, for :func:`attnpool.hub.save_pretrained`."""
        return {"pool": self.pool, "encoders": list(self.encoders), "decoders": list(self.decoders),
                "multi_query": self.multi_query}

    def extra_repr(self) -> str:
        return f"multi_query={self.multi_query!r}"

    def __repr__(self) -> str:  # PyG's Aggregation prints the class name only; show the modules inside
        return nn.Module.__repr__(self)
