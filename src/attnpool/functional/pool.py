"""Attention pooling and the baseline pools, for padded, packed and list input.

The public functions parse their input once into :class:`~attnpool._sets.Sets` and call the ``*_sets`` functions
below, which the modules in :mod:`attnpool.nn` call directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attnpool._sets import Sets, as_sets, lengths_to_offsets, segment_ids
from attnpool.functional.scores import dot_score
from attnpool.functional.softmax import compute_dtype, masked_softmax, segment_softmax
from attnpool.kernels import (
    KernelFn,
    get_kernel,
    kernel_choice,
    segment_channel_softmax_pool,
    segment_softmax_pool,
    under_functorch,
)

__all__ = [
    "attention_pool",
    "channel_softmax_pool",
    "max_pool",
    "mean_pool",
    "softmax_pool",
    "sum_pool",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Weights = Tensor | list[Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Engine: works on validated Sets.
# ---------------------------------------------------------------------------------------------------------------


def kept_elements(sets: Sets, x: Tensor) -> Tensor:
    """``x`` (per element, in the layout of ``sets``) cast to the compute dtype, with masked rows set to 0 so that
    whatever they held (NaN, Inf) can reach neither the result nor the gradient."""
    x = x.to(compute_dtype(x.dtype))
    if sets.mask is not None:
        x = torch.where(sets.mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x


def split_heads_query(query: Tensor, num_heads: int) -> Tensor:
    """``[G, Q, D]`` to ``[G, H, Q, D/H]``."""
    g, q, d = query.shape
    return query.reshape(g, q, num_heads, d // num_heads).transpose(1, 2)


def logits_sets(sets: Sets, keys: Tensor, query: Tensor, score: ScoreFn, num_heads: int) -> Tensor:
    """Scores of every element under every query and head, in the layout of ``sets``.

    Args:
        keys: kept elements, ``[B, L, Dk]`` padded or ``[N, Dk]`` packed.
        query: ``[B or 1, Q, Dq]``.

    Returns:
        ``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed.
    """
    q = split_heads_query(query, num_heads)
    h = num_heads
    if sets.is_padded:
        b, l, dk = keys.shape
        k = keys.reshape(b, l, h, dk // h).transpose(1, 2)
        return score(q, k)
    n, dk = keys.shape
    k = keys.reshape(n, h, dk // h)
    if q.shape[0] == 1:  # one set of queries shared by all sets: score every element at once
        return score(q, k.transpose(0, 1).unsqueeze(0))[0].permute(2, 0, 1)
    # a query per set: pair each element with its own set's query
    return score(q[sets.segment_ids()], k.unsqueeze(2)).squeeze(-1)


def softmax_sets(sets: Sets, logits: Tensor) -> Tensor:
    """Weights from logits in the layout of ``sets`` (``[B, *, L]`` padded, ``[N, *]`` packed)."""
    if sets.is_padded:
        mask = None if sets.mask is None else sets.mask.view(
            sets.mask.shape[0], *([1] * (logits.dim() - 2)), sets.mask.shape[-1])
        return masked_softmax(logits, mask, dim=-1)
    return segment_softmax(logits, segment_ids=sets.segment_ids(), num_segments=sets.batch_size)


def weighted_sum_sets(sets: Sets, weights: Tensor, values: Tensor) -> Tensor:
    """``Σ_i a_i v_i`` per set, query and head.

    Args:
        weights: ``[B, H, Q, L]`` padded or ``[N, H, Q]`` packed, in the compute dtype.
        values: kept elements, ``[B, L, Dv]`` padded or ``[N, Dv]`` packed, ``Dv`` divisible by ``H``.

    Returns:
        ``[B, Q, Dv]``, heads concatenated along the last dim.
    """
    values = values.to(weights.dtype)
    if sets.is_padded:
        b, h, q, l = weights.shape
        v = values.reshape(b, l, h, values.shape[-1] // h)
        return torch.einsum("bhql,blhd->bqhd", weights, v).reshape(b, q, values.shape[-1])
    n, h, q = weights.shape
    v = values.reshape(n, h, 1, values.shape[-1] // h)
    out = v.new_zeros(sets.batch_size, h, q, v.shape[-1])
    out = out.index_add(0, sets.segment_ids(), weights.unsqueeze(-1) * v)
    return out.transpose(1, 2).reshape(sets.batch_size, q, values.shape[-1])


def format_weights(sets: Sets, weights: Tensor) -> Weights:
    """Weights in the caller's form: ``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed, a list of ``[H, Q, L_i]``."""
    if sets.layout == "list":
        return [w.permute(1, 2, 0) for w in torch.split(weights, sets.lengths.tolist())]
    return weights


def check_query(query: Tensor, sets: Sets, name: str = "query") -> Tensor:
    """A 1-, 2- or 3-D query as ``[B or 1, Q, D]``, with the SDPA broadcasting convention: ``[D]`` and ``[Q, D]``
    are shared by every set, ``[B, Q, D]`` gives each set its own."""
    if not isinstance(query, Tensor):
        raise TypeError(f"{name}: expected a tensor [D], [Q, D] or [B, Q, D], got {type(query).__name__}")
    if query.dim() == 1:
        query = query.view(1, 1, -1)
    elif query.dim() == 2:
        query = query.unsqueeze(0)
    elif query.dim() != 3:
        raise ValueError(f"{name}: expected shape [D], [Q, D] or [B, Q, D], got rank {query.dim()} with shape "
                         f"{tuple(query.shape)}")
    if query.shape[0] not in (1, sets.batch_size):
        raise ValueError(f"{name}: expected a leading batch size of 1 or B = {sets.batch_size}, got shape "
                         f"{tuple(query.shape)}")
    if query.device != sets.values.device:
        raise ValueError(f"{name}: expected device {sets.values.device}, got {query.device}")
    return query


def check_heads(num_heads: int, **dims: int) -> None:
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    for name, d in dims.items():
        if d % num_heads:
            raise ValueError(f"num_heads: {name} dim {d} is not divisible by num_heads = {num_heads}")


def check_temperature(temperature: float | Tensor) -> None:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature: expected a scalar, got shape {tuple(temperature.shape)}")
    # `0 < T < inf` rather than math.isfinite: the same test (NaN fails it), and traceable when torch.compile
    # (dynamic=True) passes T as a symbolic float, on which math.isfinite breaks the graph.
    elif not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")


def _fused_kernel(sets: Sets, keys: Tensor, values: Tensor, score: ScoreFn, num_heads: int, dropout: float,
                  training: bool, need_weights: bool, query: Tensor) -> KernelFn | None:
    """The fused kernel to use, or None for the eager path: kernels cover packed sets, one head, a dot score over
    keys that are the values, and no dropout; weights that must carry gradients come from the eager path."""
    # Fused kernels are opaque calls that torch.compile and torch.export cannot trace: they keep the eager path.
    if (sets.is_padded or torch.compiler.is_compiling() or score is not dot_score or num_heads != 1
            or keys is not sets.values or values is not sets.values
            or (dropout > 0 and training) or sets.values.shape[0] == 0 or query.shape[1] == 0):
        return None
    if need_weights and torch.is_grad_enabled() and (values.requires_grad or query.requires_grad):
        return None
    if under_functorch(sets.values, query):
        return None
    name, fn = get_kernel(sets.values.device.type, sets.values.dtype)
    return None if name == "reference" else fn


def _use_sdpa(sets: Sets, keys: Tensor, values: Tensor, score: ScoreFn, dropout: float, training: bool,
              need_weights: bool, query: Tensor, temperature: float | Tensor) -> bool:
    """Whether padded sets go to ``F.scaled_dot_product_attention``: many queries (self-attention, SAB/ISAB), a dot
    score, no weights to return, no dropout, a temperature without gradient. With one or a few queries the eager
    path is as fast and keeps the fused-kernel dispatch; forcing a kernel (:func:`attnpool.kernels.use_kernel`)
    turns this path off, so that ``use_kernel("reference")`` always gives the readable eager evaluation."""
    return (sets.is_padded and kernel_choice() == "auto" and score is dot_score and not need_weights
            and not (dropout > 0 and training) and query.shape[1] >= _SDPA_MIN_QUERIES
            and keys.shape[1] > 0 and not (isinstance(temperature, Tensor) and temperature.requires_grad))


#: SDPA takes padded sets with at least this many queries. On [64, 256, 128] with 4 heads (1 thread, a busy machine)
#: it was 1.3-2.5x faster than the eager path from 4 queries up, and mixed below; pooling with a few queries, the
#: common case, keeps the eager path it had (tests compare some of its results with peers' bit for bit).
_SDPA_MIN_QUERIES = 8


def _pool_with_sdpa(sets: Sets, query: Tensor, keys: Tensor, values: Tensor, num_heads: int,
                    factor: float) -> Tensor:
    """Padded multi-query attention by one fused SDPA call, in the compute dtype (fp32 for half inputs).

    Masked rows are zeroed first (so NaN there cannot reach the sum through ``0 * NaN``) and excluded by a
    boolean mask. An empty set would make a row of SDPA's mask all False (NaN on some backends); such a set
    instead attends over its zeroed rows, which pools exactly 0 with finite gradients, as the eager path gives.
    """
    kept_values = kept_elements(sets, values)
    kept_keys = kept_values if keys is values else kept_elements(sets, keys)
    b = kept_keys.shape[0]
    nq = query.shape[1]
    q = split_heads_query(query.to(kept_keys.dtype), num_heads).expand(b, -1, -1, -1)
    k = split_heads_query(kept_keys, num_heads)
    v = split_heads_query(kept_values, num_heads)
    attn_mask = None
    if sets.mask is not None:
        empty = ~sets.mask.any(dim=1, keepdim=True)
        attn_mask = (sets.mask | empty)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=factor)
    return out.transpose(1, 2).reshape(b, nq, kept_values.shape[-1])


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``, or nothing when autocast is off already (entering and leaving
    an autocast context costs ~5 us per call on a 2-core VM, which small-batch callers pay on every pooling)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know: let torch.autocast say so, as before
        enabled = True
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _pool_with_kernel(kernel: KernelFn, sets: Sets, query: Tensor, factor: float | Tensor,
                      need_weights: bool) -> tuple[Tensor, Tensor | None]:
    assert sets.offsets is not None
    x = sets.values
    cdt = compute_dtype(x.dtype)
    q = query if query.dtype == cdt else query.to(cdt)
    if isinstance(factor, Tensor):
        # a learned temperature: scale the query, so that the temperature gets its gradient through it
        q, scale = q * factor, 1.0
    else:
        scale = float(factor)
    out, lse = kernel(x, sets.offsets, q, scale)
    if out.dtype != cdt:
        out = out.to(cdt)
    if not need_weights:
        return out, None
    with torch.no_grad():
        xc, seg = x.to(q.dtype), sets.segment_ids()
        logits = xc @ q[0].T if q.shape[0] == 1 else torch.einsum("nd,nmd->nm", xc, q[seg])
        weights = torch.exp(logits * scale - lse.to(q.dtype)[seg]).unsqueeze(1)
    return out, weights


def attention_pool_sets(
    sets: Sets,
    query: Tensor,
    keys: Tensor | None = None,
    values: Tensor | None = None,
    *,
    num_heads: int = 1,
    score: ScoreFn | None = None,
    scale: float | None = None,
    temperature: float | Tensor = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The engine behind :func:`attention_pool`, on validated sets.

    Args:
        query: ``[B or 1, Q, Dq]`` (see :func:`check_query`).
        keys, values: per element, in the layout of ``sets``; default to ``sets.values``.
        dropout, training: attention dropout on the weights, applied only when ``training``.

    Returns:
        ``([B, Q, Dv]`` in the compute dtype, weights in the internal layout or None).
    """
    values = sets.values if values is None else values
    keys = values if keys is None else keys
    dq, dk, dv = query.shape[-1], keys.shape[-1], values.shape[-1]
    check_heads(num_heads, query=dq, key=dk, value=dv)
    check_temperature(temperature)
    if score is None:
        if dq != dk:
            raise ValueError(f"query: expected last dim {dk} to match the keys' dim, got {dq} "
                             f"(query {tuple(query.shape)}, keys {tuple(keys.shape)})")
        score = dot_score
        if scale is None:
            scale = (dk // num_heads) ** -0.5
    elif scale is None:
        scale = 1.0

    device_type = sets.values.device.type
    if _use_sdpa(sets, keys, values, score, dropout, training, need_weights, query, temperature):
        with autocast_off(device_type):
            return _pool_with_sdpa(sets, query, keys, values, num_heads, scale / float(temperature)), None
    fused = _fused_kernel(sets, keys, values, score, num_heads, dropout, training, need_weights, query)
    with autocast_off(device_type):
        if fused is not None:
            return _pool_with_kernel(fused, sets, query, scale / temperature, need_weights)
        kept_values = kept_elements(sets, values)
        kept_keys = kept_values if keys is values else kept_elements(sets, keys)
        q = query.to(kept_keys.dtype)
        logits = logits_sets(sets, kept_keys, q, score, num_heads)
        logits = logits.to(compute_dtype(logits.dtype)) * (scale / temperature)
        weights = softmax_sets(sets, logits)
        # dropout acts on the weights used for the sum; the weights returned are the softmax's own
        dropped = torch.nn.functional.dropout(weights, dropout, training) if dropout > 0 else weights
        out = weighted_sum_sets(sets, dropped, kept_values)
    return out, weights if need_weights else None


def softmax_pool_sets(
    sets: Sets,
    scores: Tensor,
    values: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Pool with per-element scores ``[B, L, K]`` padded or ``[N, K]`` packed.

    Packed sets on the CPU go to the fused kernel (:func:`attnpool.kernels.segment_softmax_pool`: one pass, no
    ``[N, K, Dv]`` temporary) unless attention dropout is active or weights are asked for that must carry gradients;
    everything else takes the eager path (segment softmax, then a weighted sum).

    Returns:
        ``([B, K, Dv]`` in the compute dtype, weights ``[B, 1, K, L]`` padded or ``[N, 1, K]`` packed, or None when
        ``need_weights`` is False).
    """
    check_temperature(temperature)
    values = sets.values if values is None else values
    if _use_scores_kernel(sets, scores, values, dropout, training, need_weights):
        assert sets.offsets is not None
        with autocast_off(sets.values.device.type):
            s = scores.to(compute_dtype(scores.dtype))
            if isinstance(temperature, Tensor) or temperature != 1:  # x / 1 is x: no op and no backward node
                s = s / temperature
            out, lse = segment_softmax_pool(values, sets.offsets, s)
            out = out.to(compute_dtype(values.dtype))
            if not need_weights:
                return out, None
            with torch.no_grad():
                lse_of_row = lse.to(s.dtype)[sets.segment_ids()]
                # a set whose logits are all -inf has lse -inf and weights 0, as on the eager path (not exp(NaN))
                weights = torch.where(torch.isfinite(lse_of_row), torch.exp(s - lse_of_row), 0).unsqueeze(1)
        return out, weights
    with autocast_off(sets.values.device.type):
        s = kept_elements(sets, scores) / temperature
        logits = s.transpose(1, 2).unsqueeze(1) if sets.is_padded else s.unsqueeze(1)
        weights = softmax_sets(sets, logits)
        dropped = torch.nn.functional.dropout(weights, dropout, training) if dropout > 0 else weights
        out = weighted_sum_sets(sets, dropped, kept_elements(sets, values))
    return out, weights if need_weights else None


def _use_scores_kernel(sets: Sets, scores: Tensor, values: Tensor, dropout: float, training: bool,
                       need_weights: bool) -> bool:
    """Whether :func:`softmax_pool_sets` runs the fused given-logits kernel (see there)."""
    if (sets.is_padded or torch.compiler.is_compiling() or (dropout > 0 and training) or values.shape[0] == 0
            or values.dim() != 2 or scores.dim() != 2 or scores.shape[1] == 0):
        return False
    if need_weights and torch.is_grad_enabled() and (values.requires_grad or scores.requires_grad):
        return False
    return get_kernel(values.device.type, values.dtype)[0] == "cpu" and not under_functorch(values, scores)


def check_channel_t(t: float | Tensor, dim: int, like: Tensor) -> Tensor:
    """``t`` of :func:`channel_softmax_pool` as a tensor ``[]`` or ``[D]`` on ``like``'s device."""
    if isinstance(t, Tensor):
        if not t.is_floating_point() or t.dim() > 1 or t.numel() not in (1, dim):
            raise ValueError(f"t: expected a float, or a floating-point tensor [], [1] or [D] = [{dim}], got "
                             f"dtype {t.dtype} and shape {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"t: expected device {like.device}, got {t.device}")
        return t
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t: expected a finite number or a tensor, got {t!r}")
    return torch.tensor(float(t), dtype=compute_dtype(like.dtype), device=like.device)


def channel_softmax_pool_sets(sets: Sets, t: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Per-channel softmax pooling of validated sets. Returns ``[B, D]`` in the values' dtype and, when asked,
    weights in the internal layout with ``H = 1`` and one "query" per channel: ``[B, 1, D, L]`` padded,
    ``[N, 1, D]`` packed."""
    x = sets.values
    b, d = sets.batch_size, sets.dim
    if sets.is_padded:
        l = x.shape[1]
        rows = x.reshape(b * l, d) if sets.mask is None else x[sets.mask]  # masked rows are never read
        offsets = lengths_to_offsets(sets.lengths)
    else:
        assert sets.offsets is not None
        rows, offsets = x, sets.offsets
    out, lse = segment_channel_softmax_pool(rows, offsets, t)
    if not need_weights:
        return out, None
    cdt = compute_dtype(x.dtype)
    seg = segment_ids(offsets[1:] - offsets[:-1], rows.shape[0])
    z = rows.to(cdt) * t.to(cdt)
    lse = lse.detach()
    if torch.is_grad_enabled() and z.requires_grad:
        # the kernel's lse has no gradient; d lse_bc / d z_ic = a_ic, which this zero-valued term supplies
        s = z.new_zeros(b, d).index_add(0, seg, torch.exp(z - lse[seg]).detach() * z)
        lse = lse + (s - s.detach())
    w = torch.exp(z - lse[seg])  # [N, D]
    if not sets.is_padded:
        return out, w.unsqueeze(1)
    if sets.mask is None:
        dense = w.view(b, x.shape[1], d)
    else:
        dense = w.new_zeros(b, x.shape[1], d)
        dense[sets.mask] = w
    return out, dense.transpose(1, 2).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------------------------


def channel_softmax_pool(
    values: Tensor | Sequence[Tensor],
    t: float | Tensor = 1.0,
    *,
    mask: Tensor | None = None,
    offsets: Tensor | None = None,
    lengths: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Weights]:
    r"""Softmax pooling of every channel on its own (PyG's ``SoftmaxAggregation``):

    .. math::
        \mathrm{out}_{b,c} = \sum_{i \in S_b} \mathrm{softmax}_i(t_c\, x_{ic})\, x_{ic}

    ``t`` is an inverse temperature, shared (a float or a 0-d / ``[1]`` tensor) or one per channel (``[D]``); a
    tensor ``t`` that requires grad is learned. ``t = 0`` gives the mean, large ``t`` tends to the max, negative ``t``
    to the min (Li et al., *DeeperGCN*, 2020). Packed CPU input runs on the fused kernel of
    :mod:`attnpool.kernels.cpu` (one pass, no ``N x D`` temporary); other input goes through the reference ops.

    Args:
        values: ``[B, L, D]`` (+ ``mask`` or ``lengths``), ``[N, D]`` + ``offsets`` or ``lengths``, or a list of
            ``[L_i, D]``.

    Returns:
        ``[B, D]`` (0 for an empty set) and, with ``return_weights``, the weights of every element in every
        channel: ``[B, D, L]`` padded, ``[N, D]`` packed, or a list of ``[D, L_i]``; each channel's weights sum
        to 1 over a non-empty set.
    """
    sets = as_sets(values, mask=mask, offsets=offsets, lengths=lengths)
    tt = check_channel_t(t, sets.dim, sets.values)
    out, weights = channel_softmax_pool_sets(sets, tt, return_weights)
    if not return_weights:
        return out
    assert weights is not None
    formatted = format_weights(sets, weights)
    if isinstance(formatted, list):
        return out, [w[0] for w in formatted]
    return out, formatted.squeeze(1)


def attention_pool(
    values: Tensor | Sequence[Tensor],
    query: Tensor,
    keys: Tensor | Sequence[Tensor] | None = None,
    *,
    mask: Tensor | None = None,
    offsets: Tensor | None = None,
    lengths: Tensor | None = None,
    num_heads: int = 1,
    score: ScoreFn | None = None,
    scale: float | None = None,
    temperature: float | Tensor = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Weights]:
    r"""Pool each set of ``values`` into one vector per query:

    .. math::
        \mathrm{out}_{b,q} = \sum_{i \in S_b} a_{b,q,i} v_i, \qquad
        a_{b,q,\cdot} = \mathrm{softmax}_{i \in S_b}\big(\mathrm{score}(q_{b,q}, k_i) \cdot \mathrm{scale} / T\big)

    Args:
        values: padded ``[B, L, Dv]``, packed ``[N, Dv]``, or a list of ``[L_i, Dv]`` (see :mod:`attnpool._sets`).
        query: ``[Dq]`` (one query shared by every set; output ``[B, Dv]``), ``[Q, Dq]`` (``Q`` queries shared by
            every set) or ``[B, Q, Dq]`` (each set its own ``Q`` queries; ``[B, 1, Dq]`` for one per set). The last
            two give ``[B, Q, Dv]``. This is the broadcasting convention of
            :func:`torch.nn.functional.scaled_dot_product_attention`.
        keys: ``[..., Dk]`` in the same form as ``values``; defaults to ``values``.
        mask: padded only: ``[B, L]`` bool or 0/1 integer, **True (1) = keep**, as Hugging Face's
            ``attention_mask``.
        offsets: packed only: ``[B+1]``, from 0 to N, non-decreasing.
        lengths: ``[B]``: packed set sizes, or for padded input the number of leading positions kept.
        num_heads: ``H``; query, key and value dims are split into ``H`` heads, each with its own softmax, and
            the heads' outputs are concatenated.
        score: ``score(query [G|1, H, Q, dq], keys [G, H, L, dk]) -> [G, H, Q, L]``; see
            :mod:`attnpool.functional.scores`. Default: :func:`~attnpool.functional.scores.dot_score`.
        scale: multiplies the score; default ``1/sqrt(dk)`` (per head) for the dot score, else 1.
        temperature: ``T > 0`` divides the score. ``T -> inf`` gives mean pooling, ``T -> 0`` the argmax.
        return_weights: also return the normalized weights, ``[B, H, Q, L]`` padded, ``[N, H, Q]`` packed, or a
            list of ``[H, Q, L_i]``.

    Returns:
        ``out`` in the dtype of ``values``, or ``(out, weights)`` with ``weights`` in float32 (float64 for
        double input).

    Numerics: scores, softmax and the weighted sum run in float32 for half-precision input, with autocast off.
    A set with no element (or all masked) gives output 0 and weights 0, with finite gradients. Masked positions get
    weight exactly 0 and their values (even NaN) never reach the output or the gradients.
    """
    sets = as_sets(values, mask=mask, offsets=offsets, lengths=lengths)
    k = None if keys is None else sets.companion(keys, "keys")
    q = check_query(query, sets)
    out, weights = attention_pool_sets(
        sets, q, k, num_heads=num_heads, score=score, scale=scale, temperature=temperature,
        need_weights=return_weights,
    )
    out = out.to(sets.values.dtype)
    if query.dim() == 1:
        out = out.squeeze(1)
    if not return_weights:
        return out
    assert weights is not None
    return out, format_weights(sets, weights)


def softmax_pool(
    values: Tensor | Sequence[Tensor],
    scores: Tensor | Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    offsets: Tensor | None = None,
    lengths: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Weights]:
    r"""Pool with precomputed per-element scores (a gate network's output, say):
    ``out_{b,k} = Σ_i softmax_i(s_{i,k} / T) v_i``.

    Args:
        values: ``[B, L, D]``, ``[N, D]`` or a list of ``[L_i, D]``.
        scores: the same form with last dim ``K`` (one pooled vector per score column), or without it.

    Returns:
        ``[B, K, D]`` (``[B, D]`` when ``scores`` had no ``K`` dim) and, if asked, weights in the form of
        :func:`attention_pool` with ``H = 1`` and ``Q = K``.
    """
    sets = as_sets(values, mask=mask, offsets=offsets, lengths=lengths)
    single = (isinstance(scores, Tensor) and scores.dim() == sets.values.dim() - 1) or (
        isinstance(scores, (list, tuple)) and all(s.dim() == 1 for s in scores))
    if single:
        scores = scores.unsqueeze(-1) if isinstance(scores, Tensor) else [s.unsqueeze(-1) for s in scores]
    out, weights = softmax_pool_sets(sets, sets.companion(scores, "scores"), temperature=temperature,
                                     need_weights=return_weights)
    out = out.to(sets.values.dtype)
    if single:
        out = out.squeeze(1)
    if not return_weights:
        return out
    assert weights is not None
    return out, format_weights(sets, weights)


def mean_pool_sets(sets: Sets) -> Tensor:
    return sum_pool_sets(sets) / sets.lengths.clamp_min(1).unsqueeze(-1).to(compute_dtype(sets.values.dtype))


def sum_pool_sets(sets: Sets) -> Tensor:
    x = kept_elements(sets, sets.values)
    if sets.is_padded:
        return x.sum(1)
    return x.new_zeros(sets.batch_size, x.shape[-1]).index_add(0, sets.segment_ids(), x)


def max_pool_sets(sets: Sets) -> Tensor:
    x = sets.values.to(compute_dtype(sets.values.dtype))
    if sets.is_padded:
        if sets.mask is not None:
            x = torch.where(sets.mask.unsqueeze(-1), x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], x.shape[2])
        out = x.amax(1)
    else:
        index = sets.segment_ids().unsqueeze(-1).expand_as(x)
        out = x.new_full((sets.batch_size, x.shape[-1]), float("-inf"))
        out = out.scatter_reduce(0, index, x, reduce="amax", include_self=True)
    if sets.all_nonempty:
        return out
    return torch.where(sets.nonempty.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _baseline(fn: Callable[[Sets], Tensor], doc: str) -> Callable[..., Tensor]:
    def pool(
        values: Tensor | Sequence[Tensor],
        *,
        mask: Tensor | None = None,
        offsets: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        sets = as_sets(values, mask=mask, offsets=offsets, lengths=lengths)
        return fn(sets).to(sets.values.dtype)

    pool.__doc__ = doc + """

    Args: the input forms of :func:`attention_pool`. Returns ``[B, D]``; an empty set gives 0."""
    return pool


mean_pool = _baseline(mean_pool_sets, "Mean of each set's kept elements.")
sum_pool = _baseline(sum_pool_sets, "Sum of each set's kept elements.")
max_pool = _baseline(max_pool_sets, "Element-wise max of each set's kept elements.")
mean_pool.__name__, sum_pool.__name__, max_pool.__name__ = "mean_pool", "sum_pool", "max_pool"
