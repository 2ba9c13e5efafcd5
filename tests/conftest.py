"""Shared helpers: one ragged batch in the three input forms, and a float64 reference of the formula."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

# Triton reads TRITON_INTERPRET once, at its first import: set it before anything imports triton, so that without a
# GPU the Triton kernels run (slowly, for correctness) in its interpreter on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class Batch:
    sets: list[Tensor]  # [L_i, D]
    padded: Tensor  # [B, L, D], NaN at padded positions unless told otherwise
    mask: Tensor  # [B, L] bool
    packed: Tensor  # [N, D]
    offsets: Tensor  # [B+1]
    lengths: Tensor  # [B]


def make_batch(lengths: list[int], dim: int, *, dtype=torch.float64, fill=float("nan"), seed=0,
               pad_to: int | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randn(n, dim, generator=g, dtype=dtype) for n in lengths]
    return batch_from_sets(sets, dim, fill=fill, pad_to=pad_to)


def batch_from_sets(sets: list[Tensor], dim: int, *, fill=float("nan"), pad_to: int | None = None) -> Batch:
    lengths = [s.shape[0] for s in sets]
    dtype = sets[0].dtype
    width = max([0, *lengths]) if pad_to is None else pad_to
    padded = torch.full((len(sets), width, dim), fill, dtype=dtype)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for b, s in enumerate(sets):
        padded[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = True
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    packed = torch.cat(sets) if sets else torch.zeros(0, dim, dtype=dtype)
    return Batch(sets, padded, mask, packed, offsets, lens)


def reference_attention_pool(sets: list[Tensor], queries: Tensor, keys: list[Tensor] | None = None, *,
                             num_heads: int = 1, scale: float | None = None, temperature: float = 1.0,
                             score=None) -> tuple[Tensor, list[Tensor]]:
    """The formula, one set, head and query at a time, in float64. ``queries``: ``[B, Q, Dq]``.

    Returns ``[B, Q, Dv]`` and per-set weights ``[H, Q, L_i]``."""
    keys = sets if keys is None else keys
    outs, weights = [], []
    for b, (v, k) in enumerate(zip(sets, keys)):
        v, k, q = v.double(), k.double(), queries[b].double()
        h = num_heads
        dqh, dkh, dvh = q.shape[-1] // h, k.shape[-1] // h, v.shape[-1] // h
        s = scale if scale is not None else (1.0 / math.sqrt(dkh) if score is None else 1.0)
        out_b = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
        w_b = torch.zeros(h, q.shape[0], v.shape[0], dtype=torch.float64)
        for head in range(h):
            qh = q[:, head * dqh:(head + 1) * dqh]
            kh = k[:, head * dkh:(head + 1) * dkh]
            vh = v[:, head * dvh:(head + 1) * dvh]
            for j in range(q.shape[0]):
                if v.shape[0] == 0:
                    continue
                if score is None:
                    logits = torch.stack([qh[j] @ kh[i] for i in range(kh.shape[0])])
                else:
                    logits = score(qh[j].view(1, 1, 1, -1), kh.view(1, 1, *kh.shape)).view(-1)
                logits = logits * s / temperature
                a = torch.exp(logits - logits.max())
                a = a / a.sum()
                w_b[head, j] = a
                out_b[j, head * dvh:(head + 1) * dvh] = (a[:, None] * vh).sum(0)
        outs.append(out_b)
        weights.append(w_b)
    return torch.stack(outs), weights


@pytest.fixture(autouse=True, scope="session")
def single_intraop_thread():
    """One intra-op thread: the tests run many small ops, where a thread pool only adds hand-off cost (several times
    the run time on a loaded 2-core machine). Tests of threading set their own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ragged() -> Batch:
    return make_batch([3, 1, 0, 5, 2], 8)
