"""Recording the attention weights of every attnpool module inside a model, through the weights hook only.

    with attnpool.diagnostics.capture(model) as rec:
        for batch, tokens in loader:
            rec.label(tokens)          # optional: the element labels of the next forward
            model(batch)
    report = attnpool.diagnostics.analyze(rec)

The recording listens to :func:`attnpool.nn.register_weights_hook`: modules know nothing about it, and while no
recording is active the modules compute no weights at all (the base class skips that work), so the fast paths stay
fast. Weights are copied to the CPU, one ``[H, Q, L_i]`` tensor per set (``H`` heads, ``Q`` queries, the ``L_i``
kept elements in their order), for padded, packed and list input alike. For self-attention (:class:`~attnpool.nn.SAB`)
the queries are the set's own elements: ``[H, L_i, L_i]``.

Capture under ``torch.no_grad()`` where you can: outputs are then bit for bit those of an uncaptured run. With
autograd on, modules whose fast path is a fused kernel take the eager path to give weights that carry gradients,
which is slower and rounds differently (float32: within 1e-6).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnpool._sets import Sets
from attnpool.nn.base import register_weights_hook
from attnpool.nn.set_transformer import SAB

__all__ = ["CallRecord", "Recording", "capture"]

FORMAT = "attnpool.capture/1"


@dataclass
class CallRecord:
    """The weights of one forward call of one module.

    Attributes:
        module: the module's qualified name in the captured model (``""`` for the model itself).
        module_type: its class name.
        call: the index of this call in the recording (all modules counted together).
        layout: ``"padded"``, ``"packed"`` or ``"list"``, as the module received its sets.
        self_attention: whether the queries are the set's own elements (``Q = L_i``).
        training: whether the module was in training mode (dropout, if any, does not act on recorded weights).
        weights: one ``[H, Q, L_i]`` tensor per set (float32, float64 for double input), on the CPU.
        leaked: ``[B]``, for each set the largest total weight that any head and query put on masked positions
            (exactly 0 when masking holds; always 0 for packed input, which has no masked positions).
        sum_error: ``[B]``, for each non-empty set the largest ``|sum(a) - 1|`` over heads and queries (0 for an
            empty set whose weights are all 0): mass leaking across sets shows here.
        labels: one list of element labels per set, or None.
        set_ids: one id per set (to find the same set pooled under other queries in other calls), or None.
    """

    module: str
    module_type: str
    call: int
    layout: str
    self_attention: bool
    training: bool
    weights: list[Tensor]
    leaked: Tensor
    sum_error: Tensor
    labels: list[list[str]] | None = None
    set_ids: list[str] | None = None

    @property
    def lengths(self) -> list[int]:
        return [int(w.shape[-1]) for w in self.weights]

    def to_state(self) -> dict[str, Any]:
        return {"module": self.module, "module_type": self.module_type, "call": self.call, "layout": self.layout,
                "self_attention": self.self_attention, "training": self.training, "weights": self.weights,
                "leaked": self.leaked, "sum_error": self.sum_error, "labels": self.labels, "set_ids": self.set_ids}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CallRecord:
        return cls(**state)


@dataclass
class _PendingLabels:
    labels: Any
    set_ids: Sequence[Any] | None
    module: str | None
    used_by: set[str] = field(default_factory=set)


def _as_label_list(labels: Any, name: str) -> list[Any]:
    if isinstance(labels, Tensor):
        return [row for row in labels] if labels.dim() >= 1 else [labels]
    if isinstance(labels, (list, tuple)):
        return list(labels)
    raise TypeError(f"{name}: expected one sequence of element labels per set (a list of lists, a list of 1-D "
                    f"tensors or a [B, L] tensor), got {type(labels).__name__}")


def _label_text(x: Any) -> str:
    if isinstance(x, Tensor):
        x = x.item()
    return str(x)


class Recording:
    """The weights recorded while a :func:`capture` is active. Iterate over :attr:`calls`, or hand it to
    :func:`attnpool.diagnostics.analyze`.

    Args:
        model: only modules inside it are recorded (any ``nn.Module``); ``None`` records every attnpool module.
        modules: only these (qualified names, or module classes); default all.
        max_sets: stop storing weights of a module after this many sets (calls still counted); default no limit.
    """

    def __init__(self, model: nn.Module | None = None, *, modules: Sequence[str | type] | None = None,
                 max_sets: int | None = None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module or None, got {type(model).__name__}")
        if max_sets is not None and max_sets < 0:
            raise ValueError(f"max_sets: expected a non-negative int or None, got {max_sets!r}")
        self.model = model
        self.modules = None if modules is None else list(modules)
        self.max_sets = max_sets
        self.calls: list[CallRecord] = []
        self.skipped_sets: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._handle: Any = None
        self._num_calls = 0
        self._stored: dict[str, int] = {}
        self._pending: _PendingLabels | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> Recording:
        """Begin listening (what entering the context manager does)."""
        if self._handle is not None:
            raise RuntimeError("Recording.start: this recording is already active")
        self._names = {} if self.model is None else {id(m): n for n, m in self.model.named_modules()}
        self._handle = register_weights_hook(self._hook, None if self.model is None else self.model.modules())
        return self

    def stop(self) -> None:
        """Stop listening: the modules go back to computing no weights (when no other hook is registered)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def active(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> Recording:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- labels ---------------------------------------------------------------------------------------------------

    def label(self, labels: Any = None, *, set_ids: Sequence[Any] | None = None, module: str | None = None) -> None:
        """Give the element labels (and optionally an id per set) of the **next** forward call.

        Each recorded module takes them once, on its next call; the labels then lapse, so a batch without a
        ``label()`` call is recorded without labels rather than with stale ones.

        Args:
            labels: one sequence per set with one label per element (tokens, chunk titles, instance ids): a list of
                lists of str or int, a list of 1-D tensors, or a ``[B, L]`` tensor. For padded input a sequence may
                also have the padded length ``L``; the labels of masked positions are then dropped.
            set_ids: one hashable id per set: the same id in several calls marks the same set pooled under other
                queries, which :func:`attnpool.diagnostics.analyze` uses for query sensitivity.
            module: give them only to the module of this qualified name (a model with several attnpool modules
                over sets of different sizes needs this).

        A module whose batch does not match the labels raises ValueError at its forward.
        """
        if labels is None and set_ids is None:
            self._pending = None
            return
        if labels is not None:
            _as_label_list(labels, "labels")
        if set_ids is not None and not isinstance(set_ids, (list, tuple, Tensor)):
            raise TypeError(f"set_ids: expected a sequence with one id per set, got {type(set_ids).__name__}")
        self._pending = _PendingLabels(labels, set_ids, module)

    # -- the hook -------------------------------------------------------------------------------------------------

    def _name(self, module: nn.Module) -> str | None:
        if self.model is None:
            key = id(module)
            if key not in self._names:
                self._names[key] = f"{type(module).__name__}#{len(self._names)}"
            return self._names[key]
        return self._names.get(id(module))

    def _wanted(self, name: str, module: nn.Module) -> bool:
        if self.modules is None:
            return True
        return any(m == name if isinstance(m, str) else isinstance(module, m) for m in self.modules)

    def _hook(self, module: nn.Module, weights: Tensor, sets: Sets) -> None:
        name = self._name(module)
        if name is None or not self._wanted(name, module):
            return
        call = self._num_calls
        self._num_calls += 1
        self_attention = isinstance(module, SAB)
        per_set, leaked, sum_error = _split_weights(weights.detach(), sets, self_attention)
        labels, set_ids = self._take_labels(name, sets)
        stored = self._stored.get(name, 0)
        if self.max_sets is not None and stored + len(per_set) > self.max_sets:
            room = max(self.max_sets - stored, 0)
            self.skipped_sets[name] = self.skipped_sets.get(name, 0) + len(per_set) - room
            if room == 0:
                return
            per_set, leaked, sum_error = per_set[:room], leaked[:room], sum_error[:room]
            labels = None if labels is None else labels[:room]
            set_ids = None if set_ids is None else set_ids[:room]
        self._stored[name] = stored + len(per_set)
        self.calls.append(CallRecord(name, type(module).__name__, call, sets.layout, self_attention, module.training,
                                     per_set, leaked, sum_error, labels, set_ids))

    def _take_labels(self, name: str, sets: Sets) -> tuple[list[list[str]] | None, list[str] | None]:
        p = self._pending
        if p is None or name in p.used_by or (p.module is not None and p.module != name):
            return None, None
        p.used_by.add(name)
        lengths = sets.lengths.tolist()
        labels = None
        if p.labels is not None:
            rows = _as_label_list(p.labels, "labels")
            if len(rows) != len(lengths):
                raise ValueError(f"labels: module {name!r} pooled {len(lengths)} sets, but the labels given to "
                                 f"Recording.label hold {len(rows)} (pass module= to label one module only)")
            keep = sets.keep_mask().cpu() if sets.is_padded else None
            labels = []
            for b, (row, n) in enumerate(zip(rows, lengths)):
                row = list(row)
                if keep is not None and len(row) == keep.shape[1] and len(row) != n:
                    row = [x for x, k in zip(row, keep[b].tolist()) if k]
                if len(row) != n:
                    raise ValueError(f"labels: set {b} of module {name!r} has {n} kept elements, but its labels "
                                     f"hold {len(row)}")
                labels.append([_label_text(x) for x in row])
        set_ids = None
        if p.set_ids is not None:
            ids = list(p.set_ids)
            if len(ids) != len(lengths):
                raise ValueError(f"set_ids: module {name!r} pooled {len(lengths)} sets, got {len(ids)} ids")
            set_ids = [_label_text(i) for i in ids]
        return labels, set_ids

    # -- access ---------------------------------------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """The recorded modules, in the order of their first call."""
        return list(dict.fromkeys(c.module for c in self.calls))

    def calls_of(self, module: str) -> list[CallRecord]:
        return [c for c in self.calls if c.module == module]

    def sets(self, module: str) -> Iterator[tuple[CallRecord, int, Tensor]]:
        """``(call, index in the batch, weights [H, Q, L_i])`` for every recorded set of ``module``."""
        for c in self.calls_of(module):
            for i, w in enumerate(c.weights):
                yield c, i, w

    def clear(self) -> None:
        self.calls.clear()
        self.skipped_sets.clear()
        self._stored.clear()
        self._num_calls = 0

    def __len__(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        n = sum(len(c.weights) for c in self.calls)
        return (f"Recording({len(self.calls)} calls, {n} sets, modules={self.module_names}, "
                f"{'active' if self.active else 'stopped'})")

    # -- persistence ----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the recorded calls (weights, labels, ids) to ``path`` with :func:`torch.save`, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {"format": FORMAT, "calls": [c.to_state() for c in self.calls], "skipped_sets": self.skipped_sets}
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """A stopped recording from a file written by :meth:`save` (loaded with ``weights_only=True``)."""
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"path: {path} is not an attnpool capture (expected format {FORMAT!r})")
        rec = cls()
        rec.calls = [CallRecord.from_state(c) for c in state["calls"]]
        rec.skipped_sets = dict(state.get("skipped_sets", {}))
        rec._num_calls = 1 + max((c.call for c in rec.calls), default=-1)
        return rec


def _split_weights(weights: Tensor, sets: Sets, self_attention: bool) -> tuple[list[Tensor], Tensor, Tensor]:
    """Internal-layout weights as one ``[H, Q, L_i]`` CPU tensor per set, plus each set's masked mass and sum
    error (NaN counts as infinite: a NaN weight is a leak)."""
    store = torch.float64 if weights.dtype == torch.float64 else torch.float32
    w = weights.to(device="cpu", dtype=store)
    lengths = sets.lengths.cpu()
    b = lengths.shape[0]
    leaked = torch.zeros(b, dtype=store)
    zero = torch.zeros((), dtype=store)
    if sets.is_padded:  # [B, H, Q, L]
        keep = sets.keep_mask().cpu()
        rows = keep[:, None, :, None] if self_attention else torch.ones((), dtype=torch.bool)
        if sets.mask is not None and w.numel():
            masked = torch.where(keep[:, None, None, :], zero, w.abs().nan_to_num(math.inf))
            # only the rows of real queries belong to a self-attending set
            leaked = _set_max(torch.where(rows, masked, zero).sum(-1))
        sums = torch.where(keep[:, None, None, :], w, zero).sum(-1)  # [B, H, Q]
        real_rows = keep[:, None, :] if self_attention else torch.ones((), dtype=torch.bool)
        err = torch.where(real_rows, (sums - 1).abs().nan_to_num(math.inf), zero)
        if sets.mask is None:
            per_set = list(w.unbind(0))
        else:
            per_set = []
            for i in range(b):
                wi = w[i][..., keep[i]]
                per_set.append(wi[:, keep[i]].contiguous() if self_attention else wi)
    else:  # [N, H, Q]
        seg = sets.segment_ids().cpu()
        sums = torch.zeros(b, *w.shape[1:], dtype=store).index_add(0, seg, w)
        err = (sums - 1).abs().nan_to_num(math.inf)
        per_set = list(torch.split(w.permute(1, 2, 0).contiguous(), lengths.tolist(), dim=-1))
    # an empty set has no weight to sum; a set without queries has nothing to check
    nonempty = (lengths > 0).view(b, *([1] * (err.dim() - 1)))
    err = torch.where(nonempty, err, zero)
    return per_set, leaked, _set_max(err)


def _set_max(x: Tensor) -> Tensor:
    """``[B, ...]`` to ``[B]``: the largest value of each set, 0 when a set has none (no query)."""
    if x[0:1].numel() == 0:
        return torch.zeros(x.shape[0], dtype=x.dtype)
    return x.flatten(1).amax(1)


def capture(model: nn.Module | None = None, *, labels: Any = None, set_ids: Sequence[Any] | None = None,
            modules: Sequence[str | type] | None = None, max_sets: int | None = None) -> Recording:
    """Record the attention weights of every attnpool module inside ``model`` while the context is active.

    ``with capture(model, labels=tokens) as rec: model(batch)`` gives a :class:`Recording`. ``labels`` and
    ``set_ids`` label the first forward call (see :meth:`Recording.label` for later ones); ``modules`` and
    ``max_sets`` as in :class:`Recording`. Only weights are recorded: the modules' outputs are unchanged, and once
    the context exits no attnpool module computes weights any more.
    """
    rec = Recording(model, modules=modules, max_sets=max_sets)
    if labels is not None or set_ids is not None:
        rec.label(labels, set_ids=set_ids)
    return rec
