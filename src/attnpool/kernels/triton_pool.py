"""Triton kernels for :func:`attnpool.kernels.reference.segment_attention_pool`, forward and backward.

Same contract as the reference (see :mod:`attnpool.kernels.reference`)::

    out[b, m] = sum_{i in set b} softmax_i(scale * x_i . q[g(b), m]) * x_i      (0 for an empty set)
    lse[b, m] = log sum_{i in set b} exp(scale * x_i . q[g(b), m])              (-inf for an empty set)

``x [N, D]`` float32/float16/bfloat16, ``offsets [B+1]`` int64, ``query [1 or B, M, D]`` -> ``out [B, M, D]`` in
``x.dtype`` and ``lse [B, M]`` float32. Every softmax statistic and sum is kept in float32. Gradients flow to ``x``
and ``query`` from both ``out`` and ``lse``.

Work decomposition (no padding, no host synchronisation, no ``N x D`` temporaries):

* A *head* program per set ``b`` (times the blocks of queries) streams rows ``[start_b, start_b + chunk)`` of its
  set in ``BLOCK_N`` tiles with an online softmax and, when the set has no more rows, writes ``out`` and ``lse``.
* The packed rows are also cut into ``T = cdiv(N, chunk)`` global *tiles* of ``chunk`` rows, with a *tail* program
  each. Because every set's first ``chunk`` rows belong to its head, at most one set has rows past its head inside
  any tile: the tail program finds it (a binary search of ``offsets``) and streams those rows. So one set of 1M
  rows beside 10k tiny sets is spread over ``1M / chunk`` programs instead of one.
* Programs of a split set write ``(max, sum, acc)`` partials to a workspace of ``2 T`` slots (the tail of tile
  ``t`` in slot ``2t``, the head of the set whose rows past the head start in tile ``t`` in slot ``2t + 1``), and a
  merge kernel of ``T`` programs combines them in a fixed order (deterministic, no atomics).

``chunk`` defaults to about ``N / (4 * #SMs)`` rows (at least 256), so no program streams more than about a quarter
of an SM's fair share of the rows. ``T`` and the grid depend on the shapes only, never on the lengths, so nothing
waits on the device. The forward is one launch, plus the merge launch when ``N > chunk``.

The backward pass uses the same decomposition. With ``a_i = exp(scale x_i.q - lse)`` and
``ds_i = a_i (g.x_i - g.out + g_lse)``, each program writes ``dx_i = sum_m a_im g_m + scale ds_im q_m`` for its own
rows (every row has exactly one owner) and a ``dq`` partial ``scale * sum_i ds_i x_i``; the partials are then
reduced per set (a merge kernel) or over the whole batch for a shared query (a plain sum). ``g.out`` is taken from
the returned ``out`` (rounded to ``x.dtype``), as FlashAttention does.

With ``TRITON_INTERPRET=1`` set before triton is first imported, the kernels run in Triton's interpreter (CPU tensors
work, slowly); otherwise they are compiled for the GPU. The kernels follow whatever triton itself decided at its
import (see ``_triton_interprets``), so importing this module before or after setting the variable is the same.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # triton is optional: the package works without it, and is_available() says whether this module can run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["is_available", "segment_attention_pool"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_CHUNK = 256  # the fewest rows a program streams before a set is split (default chunk)


def _triton_interprets() -> bool:
    """Whether this process runs Triton in its interpreter.

    Triton decides once, when it is first imported: ``TRITON_INTERPRET=1`` at that moment turns its own library
    (``tl.zeros``, ``tl.sum``, ...) into interpreted functions, and kernels of the other kind cannot call them. So
    the kernels here follow that decision, not the variable's value now."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other triton layouts
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(tl.zeros, InterpretedFunction)


_INTERPRETED = _triton_interprets()


def _jit(fn):
    if triton is None:
        return fn
    if _INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def is_available() -> bool:
    """True when triton imports and there is something to run it on: a CUDA device, or Triton's interpreter
    (``TRITON_INTERPRET=1`` set before triton was first imported)."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@_jit
def _locate(off_ptr, B, row):
    # The largest b in [0, B) with offsets[b] <= row, for 0 <= row < offsets[B]: the set holding packed row `row`
    # (empty sets share their offset with the next set, and the largest index is the non-empty one).
    lo = tl.program_id(0) * 0
    hi = lo + B
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go = tl.load(off_ptr + mid) <= row
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@_jit
def _item_rows(off_ptr, item, B, chunk):
    # Work item -> (set, its first and end row, the rows this item streams, head?, whole set in the head?).
    # Items [0, B) are the heads of the sets; item B + t is the tail program of global tile t.
    head = item < B
    r0 = (item - B).to(tl.int64) * chunk
    if item < B:
        b = item
    else:
        b = _locate(off_ptr, B, r0)
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1)
    lo_row = tl.where(head, start, tl.maximum(start + chunk, r0))
    hi_row = tl.where(head, tl.minimum(end, start + chunk), tl.minimum(end, r0 + chunk))
    whole = end - start <= chunk  # the head streams the whole set
    return b, start, end, lo_row, hi_row, head, whole


@_jit
def _fwd_kernel(x_ptr, off_ptr, q_ptr, out_ptr, lse_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr,
                B, M, num_mb, q_set_stride, chunk, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    item = pid // num_mb
    mb = pid % num_mb
    b, start, end, lo_row, hi_row, head, whole = _item_rows(off_ptr, item, B, chunk)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q_base = b.to(tl.int64) * q_set_stride
    q = tl.load(q_ptr + q_base + offs_m[:, None] * D + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    q = q * qk_scale  # logits in log2 units: exp2 below

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")  # running max, in log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(tl.maximum(hi_row - lo_row, 0), BLOCK_N).to(tl.int32)
    for i in range(0, n_tiles):
        rows = lo_row + i * BLOCK_N + offs_n
        r_ok = rows < hi_row
        xt = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        if BLOCK_M == 1:  # 2-d products: fewer registers than the general 3-d form for the common single query
            s = tl.sum(xt * q, axis=1)[:, None]  # [BLOCK_N, 1]
        else:
            s = tl.sum(xt[:, None, :] * q[None, :, :], axis=2)  # [BLOCK_N, BLOCK_M]
        s = tl.where(r_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: any finite shift gives exp = 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if BLOCK_M == 1:
            acc = acc * alpha[:, None] + tl.sum(p * xt, axis=0)[None, :]
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * xt[:, None, :], axis=0)
        m_i = m_new

    # Scalar conditions enter the masks through the bound on offs_m (`mask & scalar` misbehaves in the interpreter).
    final_m = offs_m < tl.where(head & whole, M, 0)
    o_ptrs = out_ptr + (b.to(tl.int64) * M + offs_m[:, None]) * D + offs_d[None, :]
    denom = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=final_m[:, None] & d_ok[None, :])
    lse = tl.where(l_i > 0, (m_i + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b.to(tl.int64) * M + offs_m, lse, mask=final_m)

    partial_m = offs_m < tl.where(tl.where(head, end - start > chunk, hi_row > lo_row), M, 0)
    slot = tl.where(head, ((start + chunk) // chunk) * 2 + 1, (item - B).to(tl.int64) * 2)
    tl.store(ws_m_ptr + slot * M + offs_m, m_i, mask=partial_m)
    tl.store(ws_l_ptr + slot * M + offs_m, l_i, mask=partial_m)
    tl.store(ws_acc_ptr + (slot * M + offs_m[:, None]) * D + offs_d[None, :], acc,
             mask=partial_m[:, None] & d_ok[None, :])


@_jit
def _merge_kernel(off_ptr, out_ptr, lse_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr,
                  B, M, num_mb, chunk,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Program t merges the set whose rows past its head start in tile t, if there is one.
    pid = tl.program_id(0)
    t = pid // num_mb
    mb = pid % num_mb
    r0 = t.to(tl.int64) * chunk
    b = _locate(off_ptr, B, r0)
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1)
    tail0 = start + chunk
    mine = (tail0 >= r0) & (tail0 < r0 + chunk) & (tail0 < end)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    mine_m = offs_m < tl.where(mine, M, 0)
    mine_md = mine_m[:, None] & d_ok[None, :]
    slot = t.to(tl.int64) * 2 + 1
    m_i = tl.load(ws_m_ptr + slot * M + offs_m, mask=mine_m, other=float("-inf"))
    l_i = tl.load(ws_l_ptr + slot * M + offs_m, mask=mine_m, other=0.0)
    acc = tl.load(ws_acc_ptr + (slot * M + offs_m[:, None]) * D + offs_d[None, :], mask=mine_md, other=0.0)
    n_parts = tl.where(mine, (end - 1) // chunk - t + 1, 0).to(tl.int32)
    for j in range(0, n_parts):
        slot = (t + j).to(tl.int64) * 2
        m_j = tl.load(ws_m_ptr + slot * M + offs_m, mask=m_ok, other=float("-inf"))
        l_j = tl.load(ws_l_ptr + slot * M + offs_m, mask=m_ok, other=0.0)
        acc_j = tl.load(ws_acc_ptr + (slot * M + offs_m[:, None]) * D + offs_d[None, :], mask=md_ok, other=0.0)
        m_new = tl.maximum(m_i, m_j)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_j - m_use)
        l_i = l_i * alpha + l_j * beta
        acc = acc * alpha[:, None] + acc_j * beta[:, None]
        m_i = m_new

    denom = tl.where(l_i > 0, l_i, 1.0)
    o_ptrs = out_ptr + (b.to(tl.int64) * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(o_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=mine_md)
    lse = tl.where(l_i > 0, (m_i + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b.to(tl.int64) * M + offs_m, lse, mask=mine_m)


@_jit
def _bwd_kernel(x_ptr, off_ptr, q_ptr, g_ptr, lse_ptr, delta_ptr, dx_ptr, dqp_ptr,
                B, M, num_mb, q_set_stride, chunk, scale, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ACCUM_DX: tl.constexpr):
    # One program per work item (head or tail, as in the forward pass), looping over all blocks of queries so that
    # each dx row is written by exactly one program. With several blocks of queries (ACCUM_DX) dx is a float32
    # buffer that later blocks add into.
    item = tl.program_id(0)
    b, _start, _end, lo_row, hi_row, _head, _whole = _item_rows(off_ptr, item, B, chunk)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    q_base = b.to(tl.int64) * q_set_stride
    n_tiles = tl.cdiv(tl.maximum(hi_row - lo_row, 0), BLOCK_N).to(tl.int32)
    for mb in range(0, num_mb):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_base + offs_m[:, None] * D + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
        bm = b.to(tl.int64) * M + offs_m
        g = tl.load(g_ptr + bm[:, None] * D + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
        lse2 = tl.load(lse_ptr + bm, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + bm, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for i in range(0, n_tiles):
            rows = lo_row + i * BLOCK_N + offs_n
            r_ok = rows < hi_row
            rd_ok = r_ok[:, None] & d_ok[None, :]
            xt = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0).to(tl.float32)
            s = tl.sum(xt[:, None, :] * q[None, :, :], axis=2) * qk_scale  # [BLOCK_N, BLOCK_M]
            gx = tl.sum(xt[:, None, :] * g[None, :, :], axis=2)
            a = tl.where(r_ok[:, None] & m_ok[None, :], tl.exp2(s - lse2[None, :]), 0.0)
            ds = a * (gx - delta[None, :])
            dxt = tl.sum(a[:, :, None] * g[None, :, :] + (ds * scale)[:, :, None] * q[None, :, :], axis=1)
            dx_ptrs = dx_ptr + rows[:, None] * D + offs_d[None, :]
            if ACCUM_DX:  # dx starts zeroed
                dxt += tl.load(dx_ptrs, mask=rd_ok, other=0.0)
            tl.store(dx_ptrs, dxt.to(dx_ptr.dtype.element_ty), mask=rd_ok)
            dq += tl.sum(ds[:, :, None] * xt[:, None, :], axis=0)
        dq_ptrs = dqp_ptr + (item.to(tl.int64) * M + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(dq_ptrs, dq * scale, mask=md_ok)
        if ACCUM_DX:
            tl.debug_barrier()  # this block's dx stores are read back (by other threads) for the next block


@_jit
def _dq_merge_kernel(off_ptr, dqp_ptr, B, M, chunk,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Per-set queries: program (t, m block) adds the tail partials of the set whose rows past its head start in tile
    # t into that set's head partial (slot b of dqp; tail partial of tile t in slot B + t).
    t = tl.program_id(0)
    mb = tl.program_id(1)
    r0 = t.to(tl.int64) * chunk
    b = _locate(off_ptr, B, r0)
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1)
    tail0 = start + chunk
    mine = (tail0 >= r0) & (tail0 < r0 + chunk) & (tail0 < end)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md_ok = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    mine_md = (offs_m < tl.where(mine, M, 0))[:, None] & (offs_d < D)[None, :]
    tile_md = offs_m[:, None] * D + offs_d[None, :]
    head_ptrs = dqp_ptr + b.to(tl.int64) * M * D + tile_md
    dq = tl.load(head_ptrs, mask=mine_md, other=0.0)
    n_parts = tl.where(mine, (end - 1) // chunk - t + 1, 0).to(tl.int32)
    for j in range(0, n_parts):
        dq += tl.load(dqp_ptr + (B + t + j).to(tl.int64) * M * D + tile_md, mask=md_ok, other=0.0)
    tl.store(head_ptrs, dq, mask=mine_md)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _config(n: int, m: int, d: int, device: torch.device, *, chunk: int | None, block_n: int | None,
            block_m: int | None, num_warps: int | None, backward: bool = False) -> dict[str, int]:
    block_d = _next_pow2(d)
    bm = _next_pow2(min(m, 4)) if block_m is None else int(block_m)
    if bm < 1 or bm & (bm - 1):
        raise ValueError(f"block_m: expected a power of 2, got {block_m}")
    # The [BLOCK_N, BLOCK_M, BLOCK_D] products are the largest temporaries: 4k floats (2k backward) keep a 4-warp
    # program under 100 registers a thread for D = 128 (ptxas, sm_90), so several programs share an SM.
    budget = 2048 if backward else 4096
    bn = max(1, min(128, budget // (bm * block_d))) if block_n is None else int(block_n)
    if bn < 1 or bn & (bn - 1):
        raise ValueError(f"block_n: expected a power of 2, got {block_n}")
    if chunk is None:
        chunk = max(_MIN_CHUNK, bn, _next_pow2(-(-n // (4 * _num_sms(device)))))
    elif int(chunk) < 1:
        raise ValueError(f"chunk: expected a positive number of rows, got {chunk}")
    nw = (4 if bm * block_d <= 2048 else 8) if num_warps is None else int(num_warps)
    return {"chunk": int(chunk), "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": block_d, "num_warps": nw}


def _check(x: Tensor, offsets: Tensor, query: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a tensor [N, D], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16 for the Triton kernel, got {x.dtype} "
                        "(use attnpool.kernels.reference for float64)")
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets: expected a tensor [B+1], got {getattr(offsets, 'shape', type(offsets).__name__)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"offsets: expected dtype int64, got {offsets.dtype}")
    b = offsets.shape[0] - 1
    if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[0] not in (1, b) \
            or query.shape[2] != x.shape[1]:
        raise ValueError(f"query: expected a tensor [1 or B, M, D] = [1 or {b}, M, {x.shape[1]}], "
                         f"got {getattr(query, 'shape', type(query).__name__)}")
    if query.dtype not in _SUPPORTED:
        raise TypeError(f"query: expected dtype float32, float16 or bfloat16, got {query.dtype}")
    for name, t in (("offsets", offsets), ("query", query)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    if triton is None:
        raise RuntimeError("attnpool.kernels.triton_pool needs triton: pip install triton")
    if _INTERPRETED and x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"x: Triton's interpreter (TRITON_INTERPRET=1) takes CPU or CUDA tensors, got {x.device}")
    if not _INTERPRETED and x.device.type != "cuda":
        raise RuntimeError(f"x: the Triton kernel runs on a CUDA device, got {x.device}; to run it (slowly) on the "
                           "CPU, set TRITON_INTERPRET=1 before triton is first imported")


def _forward(x: Tensor, offsets: Tensor, query: Tensor, scale: float, cfg: dict[str, int]) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    b = offsets.shape[0] - 1
    m = query.shape[1]
    out = torch.empty(b, m, d, dtype=x.dtype, device=x.device)
    lse = torch.empty(b, m, dtype=torch.float32, device=x.device)
    if b == 0 or m == 0:
        return out, lse
    if d == 0:  # every logit is 0: lse = log(length), nothing to pool
        lengths = (offsets[1:] - offsets[:-1]).to(torch.float32)
        return out, lse.copy_(torch.log(lengths)[:, None].expand(b, m))
    chunk, bm, bn = cfg["chunk"], cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_mb = -(-m // bm)
    tiles = -(-n // chunk) if n > chunk else 0  # with n <= chunk no set can be split
    if tiles:
        ws_m = torch.empty(2 * tiles, m, dtype=torch.float32, device=x.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty(2 * tiles, m, d, dtype=torch.float32, device=x.device)
    else:
        ws_m = ws_l = ws_acc = lse  # never touched: no program has a partial to write
    q_set_stride = 0 if query.shape[0] == 1 else m * d
    _fwd_kernel[((b + tiles) * num_mb,)](
        x, offsets, query, out, lse, ws_m, ws_l, ws_acc,
        b, m, num_mb, q_set_stride, chunk, scale * _LOG2E,
        D=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"])
    if tiles:
        _merge_kernel[(tiles * num_mb,)](
            offsets, out, lse, ws_m, ws_l, ws_acc, b, m, num_mb, chunk,
            D=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=bm, num_warps=cfg["num_warps"])
    return out, lse


def _backward(x: Tensor, offsets: Tensor, query: Tensor, out: Tensor, lse: Tensor, g_out: Tensor | None,
              g_lse: Tensor | None, scale: float, cfg: dict[str, int]) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    b = offsets.shape[0] - 1
    m = query.shape[1]
    if g_out is None:
        g_out = torch.zeros_like(out)
    g_out = g_out.contiguous()
    delta = (g_out.float() * out.float()).sum(-1)  # g . out, [B, M]
    if g_lse is not None:
        delta = delta - g_lse.float()
    delta = delta.contiguous()
    if b == 0 or m == 0 or d == 0 or n == 0:
        return torch.zeros_like(x), torch.zeros_like(query)
    chunk, bm, bn = cfg["chunk"], cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_mb = -(-m // bm)
    tiles = -(-n // chunk) if n > chunk else 0
    accum = num_mb > 1
    dx = torch.zeros(n, d, dtype=torch.float32, device=x.device) if accum else torch.empty_like(x)
    dqp = torch.empty(b + tiles, m, d, dtype=torch.float32, device=x.device)
    shared = query.shape[0] == 1
    _bwd_kernel[(b + tiles,)](
        x, offsets, query, g_out, lse, delta, dx, dqp,
        b, m, num_mb, 0 if shared else m * d, chunk, scale, scale * _LOG2E,
        D=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=bm, BLOCK_N=bn, ACCUM_DX=accum, num_warps=cfg["num_warps"])
    if shared:
        dq = dqp.sum(0, keepdim=True)
    else:
        if tiles:
            _dq_merge_kernel[(tiles, num_mb)](offsets, dqp, b, m, chunk, D=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=bm,
                                                num_warps=cfg["num_warps"])
        dq = dqp[:b]
    return dx.to(x.dtype), dq.to(query.dtype)


class _SegmentAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, query, scale, tuning):
        fwd = _config(x.shape[0], query.shape[1], x.shape[1], x.device, **tuning)
        out, lse = _forward(x, offsets, query, scale, fwd)
        ctx.save_for_backward(x, offsets, query, out, lse)
        ctx.scale, ctx.tuning = scale, tuning
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_lse):
        x, offsets, query, out, lse = ctx.saved_tensors
        cfg = _config(x.shape[0], query.shape[1], x.shape[1], x.device, backward=True, **ctx.tuning)
        dx, dq = _backward(x, offsets, query, out, lse, g_out, g_lse, ctx.scale, cfg)
        return (dx if ctx.needs_input_grad[0] else None, None,
                dq if ctx.needs_input_grad[2] else None, None, None)


def segment_attention_pool(x: Tensor, offsets: Tensor, query: Tensor, scale: float, *, chunk: int | None = None,
                           block_n: int | None = None, block_m: int | None = None,
                           num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Attention pooling of packed sets by dot-product scores, as Triton kernels. See the module docstring.

    Args:
        x: ``[N, D]`` packed set elements, float32, float16 or bfloat16, on a CUDA device (or the CPU with
            ``TRITON_INTERPRET=1``).
        offsets: ``[B+1]`` int64, set ``b`` is ``x[offsets[b]:offsets[b+1]]``; ``offsets[0] == 0`` and
            ``offsets[B] == N`` (not checked here: that would synchronise with the device; validate upstream).
        query: ``[1, M, D]`` (one set of queries for every set) or ``[B, M, D]`` (per set).
        scale: multiplies every logit.
        chunk, block_n, block_m, num_warps: tuning, for tests and benchmarks. ``chunk`` is the most rows one program
            streams before a set is split across programs; ``block_n`` the rows per tile; ``block_m`` the queries per
            program (powers of 2). Defaults are chosen from the shapes.

    Returns:
        ``out [B, M, D]`` in ``x.dtype`` (zeros for an empty set) and ``lse [B, M]`` float32 (``-inf`` for an empty
        set), both differentiable with respect to ``x`` and ``query``.
    """
    _check(x, offsets, query)
    if isinstance(scale, Tensor):
        scale = scale.item()
    tuning = {"chunk": chunk, "block_n": block_n, "block_m": block_m, "num_warps": num_warps}
    return _SegmentAttentionPool.apply(x.contiguous(), offsets.to(torch.int64).contiguous(), query.contiguous(),
                                       float(scale), tuning)
