"""One description of a batch of sets, whatever form the caller used.

Three input forms are accepted everywhere in attnpool, and all of them are turned into a :class:`Sets` here, with
all validation done once:

* **padded**: ``values`` ``[B, L, D]`` with an optional ``mask`` ``[B, L]``. ``True`` (or ``1``) means *keep*,
  as in Hugging Face's ``attention_mask``. ``lengths`` ``[B]`` may stand in for the mask when the sets are
  left-aligned. Without either, every position is kept.
* **packed**: ``values`` ``[N, D]`` with ``offsets`` ``[B+1]`` (set ``b`` is ``values[offsets[b]:offsets[b+1]]``)
  or ``lengths`` ``[B]``.
* **list**: a list or tuple of ``[L_i, D]`` tensors. It is packed internally; results follow the list form.

Nothing downstream re-validates or re-derives lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Layout = Literal["padded", "packed", "list"]

__all__ = ["Sets", "as_sets", "check_offsets", "lengths_to_offsets", "offsets_to_lengths", "segment_ids"]


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return f"{type(t).__name__}"


def lengths_to_offsets(lengths: Tensor) -> Tensor:
    """``[B]`` lengths to ``[B+1]`` offsets starting at 0."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def offsets_to_lengths(offsets: Tensor) -> Tensor:
    """``[B+1]`` offsets to ``[B]`` lengths."""
    return offsets[1:] - offsets[:-1]


@dataclass(frozen=True, eq=False)
class Sets:
    """A validated batch of ``B`` sets.

    Attributes:
        layout: the form the caller used: ``"padded"``, ``"packed"`` or ``"list"`` (stored packed).
        values: ``[B, L, D]`` when padded, ``[N, D]`` otherwise.
        mask: padded only: ``[B, L]`` bool, True = keep; ``None`` when every position is kept.
        offsets: packed and list only: ``[B+1]`` int64.
        lengths: ``[B]`` int64, the number of kept elements of each set.
        all_nonempty: True when validation established, with no extra host sync, that no set is empty (a list, an
            unmasked padded batch, or lengths and offsets read on the host for their checks); False when some set
            is empty *or it is not known* (a padded mask is never read on the host, nor is anything under
            ``torch.compile`` or ``torch.export``). Modules use it to skip zeroing the outputs of empty sets.
    """

    layout: Layout
    values: Tensor
    mask: Tensor | None
    offsets: Tensor | None
    lengths: Tensor
    all_nonempty: bool = False

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[-1]

    @property
    def is_padded(self) -> bool:
        return self.layout == "padded"

    @property
    def nonempty(self) -> Tensor:
        """``[B]`` bool: which sets have at least one element."""
        return self.lengths > 0

    def segment_ids(self) -> Tensor:
        """Packed only: ``[N]`` int64, the set each element belongs to."""
        assert self.offsets is not None
        cached = self.__dict__.get("_segment_ids")
        if cached is None:
            cached = segment_ids(self.lengths, self.values.shape[0])
            object.__setattr__(self, "_segment_ids", cached)  # frozen dataclass: a memo, not state
        return cached

    def keep_mask(self) -> Tensor:
        """Padded only: ``[B, L]`` bool, all True when the caller gave no mask."""
        if self.mask is not None:
            return self.mask
        b, l = self.values.shape[:2]
        return torch.ones(b, l, dtype=torch.bool, device=self.values.device)

    def zero_masked(self) -> Sets:
        """These sets with every masked position of the values set to 0.

        Modules call this before any per-element layer (a projection, a LayerNorm), so that whatever padding holds
        (NaN, Inf, garbage from ``torch.empty``) reaches neither their outputs nor their parameters' gradients.
        """
        if self.mask is None:
            return self
        zero = torch.zeros((), dtype=self.values.dtype, device=self.values.device)
        return replace(self, values=torch.where(self.mask.unsqueeze(-1), self.values, zero))

    def companion(self, other: Tensor | Sequence[Tensor], name: str) -> Tensor:
        """Validate a second per-element tensor (``keys``) against these sets and return it in the same layout."""
        if self.layout == "list":
            if not isinstance(other, (list, tuple)):
                raise TypeError(f"{name}: values were given as a list of tensors, so {name} must be a list too; "
                                f"got {_describe(other)}")
            got = [tuple(t.shape[:1]) for t in other]
            want = [(int(n),) for n in self.lengths.tolist()]
            if got != want or any(t.dim() != 2 for t in other):
                raise ValueError(f"{name}: expected {len(want)} tensors of shape [L_i, D] with L_i = {want}, "
                                 f"got shapes {[tuple(t.shape) for t in other]}")
            return torch.cat(list(other)) if other else self.values.new_zeros(0, 0)
        if not isinstance(other, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {_describe(other)}")
        lead = self.values.shape[:-1]
        if other.dim() != self.values.dim() or other.shape[:-1] != lead:
            raise ValueError(f"{name}: expected shape [{', '.join(map(str, lead))}, D_k] to match the values, "
                             f"got {tuple(other.shape)}")
        if other.device != self.values.device:
            raise ValueError(f"{name}: expected device {self.values.device}, got {other.device}")
        return other

    def elementwise_output(self, out: Tensor) -> Tensor | list[Tensor]:
        """Give a per-element result (``[B, L, *]`` padded or ``[N, *]`` packed) back in the caller's form."""
        if self.layout == "list":
            return list(torch.split(out, self.lengths.tolist()))
        return out


def _holds(cond: Tensor, what: str) -> bool:
    """Whether the 0-d bool tensor ``cond`` is True. The checks below read tensor values on the host, in eager mode
    and under ``torch.compile`` (where the read is one graph break). ``torch.export`` cannot read a value it traces,
    so there the check becomes a run-time assertion in the exported program (which raises ``RuntimeError: what``
    rather than the detailed ``ValueError``)."""
    if torch.compiler.is_exporting():
        torch._assert_async(cond, what)
        return True
    return bool(cond)


def _holds_and_nonempty(cond: Tensor, lengths: Tensor, what: str) -> tuple[bool, bool]:
    """:func:`_holds` plus whether every one of ``lengths`` is positive, both read in the same host sync. Under
    ``torch.compile`` and ``torch.export`` the second is not read (False): a compiled graph would be specialized on it
    and recompiled whenever a batch with an empty set came, to save a ``where`` that the compiler fuses anyway."""
    if torch.compiler.is_compiling():
        return _holds(cond, what), False
    if lengths.shape[0] == 0:
        return bool(cond), True
    ok, nonempty = torch.stack([cond, (lengths > 0).all()]).tolist()
    return bool(ok), bool(nonempty)


def _check_mask(mask: Tensor, values: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor [B, L] (True = keep), got {_describe(mask)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask: expected a bool or 0/1 integer tensor (True = keep), got dtype {mask.dtype}. A float mask is "
            "ambiguous (an additive bias of 0/-inf, or a 0/1 keep mask?); pass `mask > 0` or `mask.bool()`."
        )
    if mask.shape != values.shape[:2]:
        raise ValueError(f"mask: expected shape [B, L] = {tuple(values.shape[:2])} to match values "
                         f"{tuple(values.shape)}, got {tuple(mask.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask: expected device {values.device}, got {mask.device}")
    if mask.dtype != torch.bool:
        if not _holds(((mask == 0) | (mask == 1)).all(), "mask: an integer mask must hold only 0 and 1"):
            raise ValueError("mask: an integer mask must hold only 0 and 1 (1 = keep); got other values")
        mask = mask.bool()
    return mask


def _check_lengths(lengths: Tensor, name: str, device: torch.device) -> Tensor:
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"{name}: expected a 1-D integer tensor, got {_describe(lengths)}")
    if lengths.device != device:
        raise ValueError(f"{name}: expected device {device}, got {lengths.device}")
    return lengths.long()



def check_offsets(offsets: Tensor, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Validate ``[B+1]`` offsets over ``n`` packed rows; return them as int64 with the ``[B]`` lengths."""
    offs, lens, _ = _check_offsets(offsets, n, device)
    return offs, lens


def _host_view(t: Tensor) -> np.ndarray | None:
    """``t`` as a NumPy view when it can be read on the host for free: a plain CPU tensor, outside ``torch.compile``,
    ``torch.export``, tracing (what NumPy computes would enter a traced graph as a constant) and ``torch.func``
    transforms. Checks then cost a few NumPy calls instead of a dozen small aten ops, each of which costs 3-5 us
    here and several times that right after a kernel has streamed a large input through the caches
    (benchmarks/cpu_kernel_notes.md, 2026-12-06)."""
    if (t.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.is_functorch_wrapped_tensor(t)):
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # a tensor subclass or another form NumPy cannot view
        return None


def _check_offsets(offsets: Tensor, n: int, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """:func:`check_offsets`, plus whether every set is known to be nonempty (read in the same host sync)."""
    offs = _check_lengths(offsets, "offsets", device)
    if offs.shape[0] < 1:
        raise ValueError("offsets: expected shape [B+1] with B >= 0, got an empty tensor")
    host = _host_view(offs)
    if host is not None:
        diffs = host[1:] - host[:-1]
        smallest = int(diffs.min()) if diffs.shape[0] else 1
        if host[0] == 0 and host[-1] == n and smallest >= 0:
            return offs, torch.from_numpy(diffs), smallest > 0
    lens = offsets_to_lengths(offs)
    # One host sync for the three checks (and one graph break under torch.compile, not three); the values that the
    # messages quote are read only on failure.
    ok, nonempty = _holds_and_nonempty((offs[0] == 0) & (offs[-1] == n) & (lens >= 0).all(), lens,
                                       "offsets: expected 0 = offsets[0] <= ... <= offsets[-1] = N")
    if not ok:
        if int(offs[0]) != 0:
            raise ValueError(f"offsets: expected offsets[0] == 0, got {int(offs[0])}")
        if int(offs[-1]) != n:
            raise ValueError(f"offsets: expected offsets[-1] == N = {n} (the number of packed rows), "
                             f"got {int(offs[-1])}")
        raise ValueError(f"offsets: expected non-decreasing offsets, got {offs.tolist()}")
    return offs, lens, nonempty


def segment_ids(lengths: Tensor, n: int) -> Tensor:
    """``[N]`` int64: the set each packed row belongs to, from ``[B]`` lengths summing to ``n``."""
    if torch.compiler.is_exporting():
        # ONNX has no repeat_interleave with output_size: count, for every row, the set ends at or before it.
        ends = torch.cumsum(lengths, 0)
        marks = torch.zeros(n + 1, dtype=torch.long, device=lengths.device).index_add(0, ends, torch.ones_like(ends))
        return marks[:n].cumsum(0)
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=n)


def as_sets(
    values: Tensor | Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    offsets: Tensor | None = None,
    lengths: Tensor | None = None,
) -> Sets:
    """Validate one of the three input forms and describe it as :class:`Sets`.

    Raises:
        TypeError: a wrong type or dtype (a float mask, float offsets, a non-tensor).
        ValueError: a wrong rank or shape, inconsistent offsets or lengths, or conflicting arguments.
    """
    if isinstance(values, (list, tuple)):
        if mask is not None or offsets is not None or lengths is not None:
            raise ValueError("values: a list of tensors carries its own lengths; do not pass mask, offsets or lengths")
        if not all(isinstance(t, Tensor) for t in values):
            raise TypeError(f"values: expected a list of tensors, got a list holding "
                            f"{sorted({type(t).__name__ for t in values})}")
        if len(values) == 0:
            raise ValueError("values: expected at least one set in the list, got an empty list")
        bad = [tuple(t.shape) for t in values if t.dim() != 2]
        if bad:
            raise ValueError(f"values: expected every list element to have shape [L_i, D], got shapes {bad}")
        dims = {t.shape[1] for t in values}
        if len(dims) != 1:
            raise ValueError(f"values: expected one feature size D across the list, got {sorted(dims)}")
        dtypes = {t.dtype for t in values}
        if len(dtypes) != 1:
            raise TypeError(f"values: expected one dtype across the list, got {sorted(map(str, dtypes))}")
        packed = torch.cat(list(values))
        lens = torch.tensor([t.shape[0] for t in values], dtype=torch.long, device=packed.device)
        return Sets("list", packed, None, lengths_to_offsets(lens), lens,
                    all_nonempty=not torch.compiler.is_compiling() and all(t.shape[0] > 0 for t in values))

    if not isinstance(values, Tensor):
        raise TypeError(f"values: expected a tensor or a list of tensors, got {_describe(values)}")
    if not (values.is_floating_point() or values.is_complex()):
        raise TypeError(f"values: expected a floating-point tensor, got dtype {values.dtype}")

    if values.dim() == 3:
        if offsets is not None:
            raise ValueError(f"offsets: only packed values [N, D] take offsets; got padded values "
                             f"{tuple(values.shape)} (use mask or lengths)")
        b, l = values.shape[:2]
        if mask is not None and lengths is not None:
            raise ValueError("mask, lengths: pass one of them for padded values, not both")
        if lengths is not None:
            lens = _check_lengths(lengths, "lengths", values.device)
            if lens.shape[0] != b:
                raise ValueError(f"lengths: expected shape [B] = [{b}], got {tuple(lens.shape)}")
            ok, nonempty = _holds_and_nonempty(((lens >= 0) & (lens <= l)).all(), lens,
                                               "lengths: expected values in [0, L]")
            if not ok:
                raise ValueError(f"lengths: expected values in [0, L] = [0, {l}], got {lens.tolist()}")
            keep = torch.arange(l, device=values.device) < lens[:, None]
            return Sets("padded", values, keep, None, lens, all_nonempty=nonempty)
        if mask is None:
            return Sets("padded", values, None, None, torch.full((b,), l, dtype=torch.long, device=values.device),
                        all_nonempty=l > 0 or b == 0)
        keep = _check_mask(mask, values)
        return Sets("padded", values, keep, None, keep.sum(1))

    if values.dim() == 2:
        if mask is not None:
            raise ValueError(f"mask: packed values {tuple(values.shape)} take offsets or lengths, not a mask")
        n = values.shape[0]
        if (offsets is None) == (lengths is None):
            raise ValueError(f"offsets, lengths: packed values [N, D] = {tuple(values.shape)} need exactly one of "
                             "offsets [B+1] or lengths [B]")
        if lengths is not None:
            lens = _check_lengths(lengths, "lengths", values.device)
            host = _host_view(lens)
            smallest = (int(host.min()) if host.shape[0] else 1) if host is not None else -1
            if host is not None and smallest >= 0 and int(host.sum()) == n:
                host_offsets = np.zeros(host.shape[0] + 1, dtype=np.int64)
                np.cumsum(host, out=host_offsets[1:])
                return Sets("packed", values, None, torch.from_numpy(host_offsets), lens, all_nonempty=smallest > 0)
            # one host sync (one graph break) for both checks and the emptiness
            ok, nonempty = _holds_and_nonempty((lens >= 0).all() & (lens.sum() == n), lens,
                                               "lengths: expected lengths >= 0 that sum to N")
            if not ok:
                if bool((lens < 0).any()):
                    raise ValueError(f"lengths: expected non-negative lengths, got {lens.tolist()}")
                raise ValueError(f"lengths: expected lengths that sum to N = {n}, got a sum of {int(lens.sum())}")
            return Sets("packed", values, None, lengths_to_offsets(lens), lens, all_nonempty=nonempty)
        assert offsets is not None
        offs, lens, nonempty = _check_offsets(offsets, n, values.device)
        return Sets("packed", values, None, offs, lens, all_nonempty=nonempty)

    raise ValueError(f"values: expected padded [B, L, D] or packed [N, D] (or a list of [L_i, D]), "
                     f"got rank {values.dim()} with shape {tuple(values.shape)}")
