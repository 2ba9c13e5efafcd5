"""The implementations that ``benchmarks/run.py`` times: attnpool's and its peers', one builder per pooled function.

Each builder takes a :class:`Batch` and returns a :class:`Task`: the float64 ground truth (attnpool's module copied to
float64 and run on its reference kernel), and :class:`Row` objects that all compute that same function with the same
parameters. attnpool's module is built first and is the source of every parameter; each peer gets exact copies.

A peer library that cannot be imported is listed in :attr:`Task.skipped` with the reason, so the benchmark still runs
in the project's own venv (no PyG, no timm there) and says what it left out.

Input forms of the rows:

* ``packed``: the ``[N, D]`` input with offsets or a sorted set index, as attnpool and PyG take it;
* ``pads itself``: the peer needs ``[B, L_max, D]`` + mask, and the row includes making them from the packed input,
  as a user with ragged data must (a vectorized ``index_put``, the cheapest way; PyG's ``to_dense_batch`` does it);
* ``prebuilt padded``: the same peer given a padded copy and mask made once, outside the timing.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpool.functional import softmax_pool
from attnpool.kernels import use_kernel
from attnpool.nn import AttentionPool, ChannelSoftmaxPool

PACKED, PADS_ITSELF, PREBUILT = "packed", "pads itself", "prebuilt padded"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch of sets, packed, with what every input form needs precomputed."""

    x: Tensor  # [N, D] packed
    offsets: Tensor  # [B+1] int64
    lengths: Tensor  # [B] int64
    index: Tensor  # [N] sorted set ids (PyG's "batch" vector)
    pos: Tensor  # [N] position of each element inside its set
    max_len: int
    padded: Tensor | None  # [B, L_max, D] prebuilt copy, None when it would not fit (see pad_skip)
    mask: Tensor | None  # [B, L_max] bool, True = keep
    pad_skip: str | None  # why there is no padded form

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def padded_bytes(self) -> int:
        return self.batch_size * self.max_len * self.dim * self.x.element_size()


def make_batch(lengths: Tensor, dim: int, dtype: torch.dtype, *, seed: int, pad_limit_bytes: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths.long()
    n = int(lengths.sum())
    x = torch.randn(n, dim, generator=gen).to(dtype)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    index = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths, output_size=n)
    pos = torch.arange(n) - offsets[:-1][index]
    max_len = int(lengths.max())
    batch = Batch(x, offsets, lengths, index, pos, max_len, None, None, None)
    if batch.padded_bytes > pad_limit_bytes:
        batch.pad_skip = (f"padding to [B, L_max, D] = [{batch.batch_size}, {max_len}, {dim}] would take "
                          f"{batch.padded_bytes / 2**30:.1f} GiB (limit {pad_limit_bytes / 2**30:.1f} GiB)")
    else:
        batch.padded, batch.mask = pad_from_packed(x, batch)
    return batch


def pad_from_packed(x: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """``[B, L_max, D]`` zero-padded copy of packed ``x`` and its keep-mask, computed from the set index and offsets
    as a user holding ragged data would (all of it, ``L_max`` included, is part of the "pads itself" timings)."""
    lengths, index = batch.lengths, batch.index
    max_len = int(lengths.max())
    pos = torch.arange(x.shape[0]) - batch.offsets[:-1][index]
    padded = x.new_zeros(lengths.shape[0], max_len, x.shape[1]).index_put((index, pos), x)
    mask = torch.arange(max_len) < lengths.unsqueeze(1)
    return padded, mask


# ---------------------------------------------------------------------------------------------------------------
# Rows and tasks
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One implementation of a task's function.

    ``fn`` maps the row's input (packed ``x`` for ``packed`` and ``pads itself`` rows, the prebuilt padded copy for
    ``prebuilt padded`` rows) to the ``[B, D_out]`` output. ``params`` are the tensors whose gradients a training
    step computes. ``kernel`` is the attnpool backend forced while the row runs (None: not attnpool, or a path that
    no kernel serves). ``compare`` restricts the correctness check to some sets (``[B]`` bool), where a peer is only
    defined on them.
    """

    name: str
    library: str
    input: str
    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]
    kernel: str | None = None
    compare: Tensor | None = None
    note: str = ""


@dataclass
class Task:
    name: str
    title: str
    truth: Tensor  # float64 [B, D_out]
    truth_fn: Callable[[Tensor], Tensor]  # float64 packed x -> output, for the gradient check
    rows: list[Row] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # [N] bool: elements left out of the input-gradient check, where the function has no derivative (a ReLU's input
    # within rounding of 0: float32 and float64 then take different sides of the kink)
    grad_skip: Tensor | None = None


def _import(name: str) -> tuple[object | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken install raising something else at import
        return None, f"{name} is not importable here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def _float64_truth(module: nn.Module, call: Callable[[nn.Module, Tensor], Tensor], x: Tensor
                   ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    ref = copy.deepcopy(module).double()

    def truth_fn(x64: Tensor) -> Tensor:
        with use_kernel("reference"):
            return call(ref, x64)

    with torch.no_grad():
        return truth_fn(x.double()), truth_fn


def _attnpool_rows(name: str, fn: Callable[[Tensor], Tensor], params: list[Tensor], kernels: list[str],
                   note: str = "") -> list[Row]:
    return [Row(name, "attnpool", PACKED, fn, params, kernel=k, note=note) for k in kernels]


def _padded_rows(name: str, library: str, fn: Callable[[Tensor, Tensor], Tensor], params: list[Tensor],
                 batch: Batch, skipped: list[tuple[str, str]], compare: Tensor | None = None,
                 note: str = "") -> list[Row]:
    """A padded peer twice: padding the packed input itself, and on the prebuilt padded copy."""
    if batch.pad_skip is not None:
        skipped.append((name, batch.pad_skip))
        return []
    mask = batch.mask
    assert mask is not None
    return [
        Row(name, library, PADS_ITSELF, lambda x: fn(*pad_from_packed(x, batch)), params, compare=compare,
            note=note),
        Row(name, library, PREBUILT, lambda xp: fn(xp, mask), params, compare=compare, note=note),
    ]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The textbook masked softmax: ``softmax(q kᵀ * scale, masked to -inf) v`` over ``[B, H, L, d]`` keys."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# gate: s_i = w·x_i + b, softmax over the set, sum of a_i x_i (PyG AttentionalAggregation with gate_nn=Linear(D, 1))
# ---------------------------------------------------------------------------------------------------------------


def build_gate(batch: Batch, kernels: list[str], seed: int) -> Task:
    torch.manual_seed(seed)
    d, dtype, offsets = batch.dim, batch.x.dtype, batch.offsets
    # The gate's bias is constant over a set, so the softmax cancels it: the gate is a dot score with query w.
    pool = AttentionPool(d, 1, score="dot", dtype=dtype)
    gate = nn.Linear(d, 1, dtype=dtype)
    with torch.no_grad():
        gate.weight.copy_(pool.query)

    def call(m: nn.Module, x: Tensor) -> Tensor:
        return m(x, offsets=offsets)

    truth, truth_fn = _float64_truth(pool, call, batch.x)
    task = Task("gate", "gate score w·x_i + b -> softmax over the set -> Σ a_i x_i", truth, truth_fn)
    task.rows += _attnpool_rows("AttentionPool(score='dot')", partial(call, pool), [pool.query], kernels,
                                note="query = the gate's weight")

    task.rows.append(Row("softmax_pool(x, gate(x))", "attnpool", PACKED,
                         lambda x: softmax_pool(x, gate(x).squeeze(-1), offsets=offsets), list(gate.parameters()),
                         note="scores from the same Linear(D, 1); the given-scores kernel"))

    pyg, why = _import("torch_geometric.nn.aggr")
    if pyg is None:
        task.skipped.append(("PyG AttentionalAggregation", why or ""))
    else:
        aggr = pyg.AttentionalAggregation(gate_nn=copy.deepcopy(gate))
        b, index = batch.batch_size, batch.index
        task.rows.append(Row("PyG AttentionalAggregation", "PyG", "packed (index)",
                             lambda x: aggr(x, index=index, dim_size=b), list(aggr.parameters()),
                             note="gate_nn = Linear(D, 1), sorted index"))
        task.rows.append(Row("PyG AttentionalAggregation", "PyG", "packed (ptr)",
                             lambda x: aggr(x, ptr=offsets, dim_size=b), list(aggr.parameters()),
                             note="gate_nn = Linear(D, 1), CSR offsets"))

    w = pool.query  # [1, D]
    task.rows += _padded_rows(
        "F.scaled_dot_product_attention", "torch",
        lambda xp, m: sdpa(w.view(1, 1, 1, d).expand(xp.shape[0], 1, 1, d), xp.unsqueeze(1), xp.unsqueeze(1), m,
                           1.0).view(-1, d),
        [w], batch, task.skipped)
    task.rows += _padded_rows(
        "naive masked softmax", "torch",
        lambda xp, m: naive_attention(w.view(1, 1, 1, d), xp.unsqueeze(1), xp.unsqueeze(1), m, 1.0).view(-1, d),
        [w], batch, task.skipped)
    return task


# ---------------------------------------------------------------------------------------------------------------
# softmax_agg: out_c = Σ_i softmax_i(t·x_ic) x_ic, per channel c (PyG SoftmaxAggregation(learn=True))
# ---------------------------------------------------------------------------------------------------------------


def build_softmax_agg(batch: Batch, kernels: list[str], seed: int) -> Task:
    d, dtype, offsets = batch.dim, batch.x.dtype, batch.offsets
    t0 = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    ours = ChannelSoftmaxPool(t0, learn=True, dtype=dtype)

    def call(m: nn.Module, x: Tensor) -> Tensor:
        return m(x, offsets=offsets)

    truth, truth_fn = _float64_truth(ours, call, batch.x)
    task = Task("softmax_agg", "per channel c: Σ_i softmax_i(t·x_ic) x_ic, learned t", truth, truth_fn)
    task.rows += _attnpool_rows("ChannelSoftmaxPool(learn=True)", partial(call, ours), [ours.t], kernels)

    pyg, why = _import("torch_geometric.nn.aggr")
    if pyg is None:
        task.skipped.append(("PyG SoftmaxAggregation(learn=True)", why or ""))
    else:
        aggr = pyg.SoftmaxAggregation(learn=True)
        aggr = aggr.to(dtype)
        with torch.no_grad():
            aggr.t.copy_(ours.t)
        b, index = batch.batch_size, batch.index
        task.rows.append(Row("PyG SoftmaxAggregation(learn=True)", "PyG", "packed (index)",
                             lambda x: aggr(x, index=index, dim_size=b), [aggr.t]))
        task.rows.append(Row("PyG SoftmaxAggregation(learn=True)", "PyG", "packed (ptr)",
                             lambda x: aggr(x, ptr=offsets, dim_size=b), [aggr.t]))

    t = ours.t

    def naive(xp: Tensor, m: Tensor) -> Tensor:
        s = (xp * t).masked_fill(~m.unsqueeze(-1), float("-inf"))
        return (s.softmax(1) * xp).sum(1)

    def by_sdpa(xp: Tensor, m: Tensor) -> Tensor:
        # D heads of size 1: head c attends with query t over the scalars x_ic
        kv = xp.transpose(1, 2).unsqueeze(-1)  # [B, D, L, 1]
        return sdpa(t.view(1, 1, 1, 1).expand(xp.shape[0], d, 1, 1), kv, kv, m, 1.0).view(-1, d)

    task.rows += _padded_rows("F.scaled_dot_product_attention", "torch", by_sdpa, [t], batch, task.skipped,
                              note="D heads of size 1")
    task.rows += _padded_rows("naive masked softmax", "torch", naive, [t], batch, task.skipped)
    return task


# ---------------------------------------------------------------------------------------------------------------
# mha: a learned query attends over the set with q/k/v/out projections and H heads (nn.MultiheadAttention)
# ---------------------------------------------------------------------------------------------------------------


class _LearnedQueryMHA(nn.Module):
    def __init__(self, query: Tensor, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.query = nn.Parameter(query.detach().clone().view(1, 1, -1))
        self.attn = mha

    def forward(self, xp: Tensor, mask: Tensor) -> Tensor:
        q = self.query.expand(xp.shape[0], 1, -1)
        return self.attn(q, xp, xp, key_padding_mask=~mask, need_weights=False)[0].squeeze(1)


def _projected_attention(pool: AttentionPool, attend: Callable[..., Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``W_o attend(W_q q, W_k x, W_v x)`` on padded input, with ``pool``'s own parameters."""
    h, d = pool.num_heads, pool.dim
    dh = d // h
    assert pool.query is not None and pool.query_proj and pool.key_proj and pool.value_proj and pool.out_proj

    def fn(xp: Tensor, m: Tensor) -> Tensor:
        b, l, _ = xp.shape
        q = pool.query_proj(pool.query).view(1, h, 1, dh).expand(b, h, 1, dh)
        k = pool.key_proj(xp).view(b, l, h, dh).transpose(1, 2)
        v = pool.value_proj(xp).view(b, l, h, dh).transpose(1, 2)
        o = attend(q, k, v, m, dh**-0.5).transpose(1, 2).reshape(b, d)
        return pool.out_proj(o)

    return fn


def build_mha(batch: Batch, kernels: list[str], seed: int, heads: int) -> Task:
    torch.manual_seed(seed)
    d, dtype, offsets = batch.dim, batch.x.dtype, batch.offsets
    pool = AttentionPool(d, 1, heads, query_proj=True, key_proj=True, value_proj=True, out_proj=True, dtype=dtype)
    unfolded = copy.deepcopy(pool)
    unfolded.fold = False

    def call(m: nn.Module, x: Tensor) -> Tensor:
        return m(x, offsets=offsets)

    truth, truth_fn = _float64_truth(unfolded, call, batch.x)
    task = Task(f"mha(H={heads})", f"learned query, q/k/v/out projections, {heads} head(s), scale 1/sqrt(D/H)",
                truth, truth_fn)
    task.rows += _attnpool_rows("AttentionPool(all projections)", partial(call, pool), list(pool.parameters()),
                                kernels, note="folded automatically")
    task.rows.append(Row("AttentionPool(all projections, fold=False)", "attnpool", PACKED, partial(call, unfolded),
                         list(unfolded.parameters()), note="projects every element (what the peers do)"))

    assert pool.query is not None and pool.query_proj and pool.key_proj and pool.value_proj and pool.out_proj
    mha = nn.MultiheadAttention(d, heads, batch_first=True, dtype=dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.query_proj.weight, pool.key_proj.weight, pool.value_proj.weight]))
        assert mha.in_proj_bias is not None
        mha.in_proj_bias.copy_(torch.cat([pool.query_proj.bias, pool.key_proj.bias, pool.value_proj.bias]))
        mha.out_proj.weight.copy_(pool.out_proj.weight)
        mha.out_proj.bias.copy_(pool.out_proj.bias)
    learned = _LearnedQueryMHA(pool.query, mha)
    task.rows += _padded_rows("nn.MultiheadAttention", "torch", learned, list(learned.parameters()), batch,
                              task.skipped, note="learned query, key_padding_mask")
    params = list(pool.parameters())
    task.rows += _padded_rows("F.scaled_dot_product_attention", "torch", _projected_attention(pool, sdpa), params,
                              batch, task.skipped, note="projections applied by the caller")
    task.rows += _padded_rows("naive masked softmax", "torch", _projected_attention(pool, naive_attention), params,
                              batch, task.skipped, note="projections applied by the caller")
    return task


# ---------------------------------------------------------------------------------------------------------------
# pma: Set Transformer's PMA with one seed (PyG SetTransformerAggregation without encoder/decoder blocks)
# ---------------------------------------------------------------------------------------------------------------


def build_pma(batch: Batch, kernels: list[str], seed: int, heads: int) -> Task:
    from attnpool.nn import PMA

    torch.manual_seed(seed)
    d, dtype, offsets = batch.dim, batch.x.dtype, batch.offsets
    # PyG's PMA: rFF = relu(Linear) on every element, MAB with the seed as residual, relu(Linear) feed-forward,
    # nn.MultiheadAttention (scale 1/sqrt(D/H), output projection), no LayerNorm by default: the paper's defaults.
    pma = PMA(d, 1, heads, input_ff=True, layer_norm=False, dtype=dtype)

    def call(m: nn.Module, x: Tensor) -> Tensor:
        return m(x, offsets=offsets)

    truth, truth_fn = _float64_truth(pma, call, batch.x)
    task = Task(f"pma(H={heads})", f"PMA, 1 seed, {heads} heads: MAB(S, relu(Linear(x))), no LayerNorm", truth,
                truth_fn)
    task.rows += _attnpool_rows("PMA", partial(call, pma), list(pma.parameters()), kernels,
                                note="rFF on every element is O(N·D²) in every row")
    with torch.no_grad():
        ff = pma.input_ff[0]
        z = F.linear(batch.x.double(), ff.weight.double(), ff.bias.double())
        task.grad_skip = (z.abs() < 1e-5 * z.abs().max()).any(1)

    pyg, why = _import("torch_geometric.nn.aggr")
    if pyg is None:
        task.skipped.append(("PyG SetTransformerAggregation", why or ""))
        return task
    aggr = pyg.SetTransformerAggregation(
        d, num_seed_points=1, num_encoder_blocks=0, num_decoder_blocks=0, heads=heads, layer_norm=False).to(dtype)
    attn = pma.mab.attn
    with torch.no_grad():
        p = aggr.pma
        p.lin.weight.copy_(pma.input_ff[0].weight)
        p.lin.bias.copy_(pma.input_ff[0].bias)
        p.seed.copy_(pma.seeds.unsqueeze(0))
        mha = p.mab.attn
        mha.in_proj_weight.copy_(torch.cat([attn.query_proj.weight, attn.key_proj.weight, attn.value_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.query_proj.bias, attn.key_proj.bias, attn.value_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
        p.mab.lin.weight.copy_(pma.mab.ff[0].weight)
        p.mab.lin.bias.copy_(pma.mab.ff[0].bias)
    b, index = batch.batch_size, batch.index
    task.rows.append(Row("PyG SetTransformerAggregation", "PyG", "packed (index)",
                         lambda x: aggr(x, index=index, dim_size=b), list(aggr.parameters()),
                         note="0 encoder/decoder blocks; pads internally (to_dense_batch)"))
    if batch.pad_skip is not None:
        task.skipped.append(("PyG PoolingByMultiheadAttention", batch.pad_skip))
    else:
        mask = batch.mask
        task.rows.append(Row("PyG PoolingByMultiheadAttention", "PyG", PREBUILT,
                             lambda xp: aggr.pma(xp, mask).squeeze(1).nan_to_num(), list(aggr.parameters()),
                             note="aggr.pma called on the prebuilt padded copy"))
    return task


# ---------------------------------------------------------------------------------------------------------------
# map: the SigLIP MAP head (timm AttentionPoolLatent)
# ---------------------------------------------------------------------------------------------------------------


def build_map(batch: Batch, kernels: list[str], seed: int, heads: int) -> Task:
    from attnpool.nn import MAPHead

    torch.manual_seed(seed)
    d, dtype, offsets = batch.dim, batch.x.dtype, batch.offsets
    head = MAPHead(d, heads, norm=True, norm_eps=1e-6, dtype=dtype)

    def call(m: nn.Module, x: Tensor) -> Tensor:
        return m(x, offsets=offsets)

    truth, truth_fn = _float64_truth(head, call, batch.x)
    task = Task(f"map(H={heads})", f"MAP head, {heads} heads: attention of a learned probe, + MLP(LayerNorm(.))",
                truth, truth_fn)
    task.rows += _attnpool_rows("MAPHead", partial(call, head), list(head.parameters()), kernels)

    timm_layers, why = _import("timm.layers")
    if timm_layers is None:
        task.skipped.append(("timm AttentionPoolLatent", why or ""))
        return task
    apl = timm_layers.AttentionPoolLatent(
        d, num_heads=heads, mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), dtype=dtype)
    attn = head.attn
    with torch.no_grad():
        apl.latent.copy_(head.probe.unsqueeze(0))
        apl.q.weight.copy_(attn.query_proj.weight)
        apl.q.bias.copy_(attn.query_proj.bias)
        apl.kv.weight.copy_(torch.cat([attn.key_proj.weight, attn.value_proj.weight]))
        apl.kv.bias.copy_(torch.cat([attn.key_proj.bias, attn.value_proj.bias]))
        apl.proj.weight.copy_(attn.out_proj.weight)
        apl.proj.bias.copy_(attn.out_proj.bias)
        apl.norm.load_state_dict(head.norm.state_dict())
        apl.mlp.fc1.load_state_dict(head.mlp.fc1.state_dict())
        apl.mlp.fc2.load_state_dict(head.mlp.fc2.state_dict())
    params = list(apl.parameters())
    # timm has no padding mask: on padded input it attends to the zero padding too, so its output is the MAP head's
    # only for the sets of length L_max. It is timed on all of them and checked on those.
    full = batch.lengths == batch.max_len
    task.rows += _padded_rows("timm AttentionPoolLatent", "timm", lambda xp, m: apl(xp), params, batch,
                              task.skipped, compare=full,
                              note=f"no padding mask: checked on the {int(full.sum())} full-length set(s) only")

    def masked(xp: Tensor, m: Tensor) -> Tensor:
        bias = torch.zeros(m.shape, dtype=xp.dtype).masked_fill(~m, -math.inf)[:, None, None, :]
        return apl(xp, attn_mask=bias)

    task.rows += _padded_rows("timm AttentionPoolLatent(attn_mask)", "timm", masked, params, batch, task.skipped,
                              note="caller-built additive -inf mask through its generic attn_mask argument")
    return task


BUILDERS: dict[str, Callable[..., Task]] = {
    "gate": build_gate,
    "softmax_agg": build_softmax_agg,
    "mha": build_mha,
    "pma": build_pma,
    "map": build_map,
}
