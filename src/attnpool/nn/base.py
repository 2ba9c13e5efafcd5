"""The base class of every attnpool module, and the one hook that observers (diagnostics) listen to."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnpool._sets import Sets, as_sets
from attnpool.functional.pool import format_weights

__all__ = ["SetPool", "call_weights_hooks", "register_weights_hook", "weights_hooks"]

WeightsHook = Callable[[nn.Module, Tensor, Sets], None]
# key -> (hook, ids of the modules it watches, or None for every module)
_WEIGHTS_HOOKS: dict[int, tuple[WeightsHook, frozenset[int] | None]] = {}
_HOOK_KEYS = itertools.count()


class _HookHandle:
    def __init__(self, key: int) -> None:
        self.key = key

    def remove(self) -> None:
        _WEIGHTS_HOOKS.pop(self.key, None)

    def __enter__(self) -> _HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_weights_hook(hook: WeightsHook, modules: Iterable[nn.Module] | None = None) -> _HookHandle:
    """Call ``hook(module, weights, sets)`` after every forward of an attnpool attention module.

    ``weights`` is in the internal layout (``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed) and ``sets`` describes
    the batch (:class:`attnpool._sets.Sets`). With ``modules`` (e.g. ``model.modules()``), only those modules are
    watched; the others keep skipping the weights. A module with no hook watching it computes no weights at all.
    Returns a handle with ``remove()``, usable as a context manager.
    """
    key = next(_HOOK_KEYS)
    _WEIGHTS_HOOKS[key] = (hook, None if modules is None else frozenset(id(m) for m in modules))
    return _HookHandle(key)


def weights_hooks(module: nn.Module) -> list[WeightsHook]:
    """The hooks watching ``module`` (empty, and nearly free, when none is registered)."""
    if not _WEIGHTS_HOOKS:
        return []
    return [hook for hook, ids in list(_WEIGHTS_HOOKS.values()) if ids is None or id(module) in ids]


def call_weights_hooks(module: nn.Module, weights: Tensor | None, sets: Sets,
                       hooks: list[WeightsHook] | None = None) -> None:
    """Tell the hooks watching ``module`` about ``weights`` (internal layout of ``sets``)."""
    if weights is not None:
        for hook in weights_hooks(module) if hooks is None else hooks:
            hook(module, weights, sets)


def zero_empty(out: Tensor, sets: Sets) -> Tensor:
    """Rows of empty sets set to exactly 0 (biases and residuals would otherwise give them a value)."""
    if sets.all_nonempty:
        return out
    keep = sets.nonempty.view(-1, *([1] * (out.dim() - 1)))
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


class SetPool(nn.Module):
    """Base of the modules that pool each set of a batch into one or more vectors.

    ``forward(x, mask=None, *, offsets=None, lengths=None, query=None, return_weights=False)`` accepts every input
    form of :mod:`attnpool._sets` (padded + mask, packed + offsets or lengths, list of tensors), validates it once
    and hands a :class:`~attnpool._sets.Sets` to the subclass's :meth:`pool`. The base class then

    * zeroes masked positions before the subclass sees them, so padding never reaches a projection,
    * sets the output of empty sets to exactly 0,
    * formats the weights in the caller's layout (``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed, a list of
      ``[H, Q, L_i]``) when ``return_weights`` is True,
    * calls the hooks of :func:`register_weights_hook`.
    """

    #: whether :meth:`pool` produces attention weights
    has_weights: bool = False
    #: whether :meth:`pool` uses a call-time ``query``
    takes_query: bool = False

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Pool validated sets. Returns ``[B, D]`` or ``[B, Q, D]``, and weights in the internal layout when
        ``need_weights`` (or None)."""
        raise NotImplementedError

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        mask: Tensor | None = None,
        *,
        offsets: Tensor | None = None,
        lengths: Tensor | None = None,
        query: Tensor | None = None,
        return_weights: bool = False,
    ) -> Any:
        sets = as_sets(x, mask=mask, offsets=offsets, lengths=lengths).zero_masked()
        if query is not None and not self.takes_query:
            raise TypeError(f"query: {type(self).__name__} takes no call-time query")
        if return_weights and not self.has_weights:
            raise TypeError(f"return_weights: {type(self).__name__} computes no attention weights")
        hooks = weights_hooks(self) if self.has_weights else []
        out, weights = self.pool(sets, query, return_weights or bool(hooks))
        out = zero_empty(out, sets)
        call_weights_hooks(self, weights, sets, hooks)
        if return_weights:
            assert weights is not None
            return out, format_weights(sets, weights)
        return out


def per_set_query(query: Tensor, sets: Sets, dim: int) -> tuple[Tensor, bool]:
    """A module's call-time query as ``[B or 1, Q, dim]`` plus whether to drop the ``Q`` axis from the output.

    Modules read a 2-D query as one query **per set** (``[B, D]``), the common case of a context vector per
    example. ``[D]`` is shared by all sets and ``[B, Q, D]`` gives each set ``Q`` queries.
    """
    if not isinstance(query, Tensor):
        raise TypeError(f"query: expected a tensor [D], [B, D] or [B, Q, D], got {type(query).__name__}")
    if query.shape[-1:] != (dim,):
        raise ValueError(f"query: expected last dim {dim}, got shape {tuple(query.shape)}")
    squeeze = query.dim() < 3
    if query.dim() == 1:
        query = query.view(1, 1, -1)
    elif query.dim() == 2:
        if query.shape[0] != sets.batch_size:
            raise ValueError(f"query: a 2-D query is one per set, so expected shape [B, D] = [{sets.batch_size}, "
                             f"{dim}], got {tuple(query.shape)}")
        query = query.unsqueeze(1)
    elif query.dim() != 3:
        raise ValueError(f"query: expected shape [D], [B, D] or [B, Q, D], got {tuple(query.shape)}")
    if query.shape[0] not in (1, sets.batch_size):
        raise ValueError(f"query: expected a leading batch size of 1 or B = {sets.batch_size}, "
                         f"got {tuple(query.shape)}")
    return query, squeeze
