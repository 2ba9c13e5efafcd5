"""Checks shared by the tests of the Set Transformer, latent cross-attention and MAP head modules, and the float64
building blocks of their references (plain torch ops on the modules' own parameters, one set at a time)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.conftest import Batch, batch_from_sets, make_batch

LENGTHS = [3, 1, 0, 5, 2]


# ---------------------------------------------------------------------------------------------------------------
# Float64 reference pieces.
# ---------------------------------------------------------------------------------------------------------------


def linear(layer, x: Tensor) -> Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def layer_norm(ln, x: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + ln.eps)
    if ln.weight is not None:
        out = out * ln.weight
    return out + ln.bias if ln.bias is not None else out


def multihead(attn, q: Tensor, y: Tensor) -> Tensor:
    """``W_o [softmax(W_q q (W_k y)^T s) W_v y]_heads`` for one set: ``q [Q, Dq]``, ``y [L, Dk]`` -> ``[Q, D]``.
    An empty ``y`` gives zero attention (so ``b_o`` after ``W_o``)."""
    h, d = attn.num_heads, attn.dim
    qp, kp, vp = linear(attn.query_proj, q), linear(attn.key_proj, y), linear(attn.value_proj, y)
    dh = d // h
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(dh)
    out = torch.zeros(q.shape[0], d, dtype=q.dtype)
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        for j in range(q.shape[0]):
            if y.shape[0] == 0:
                continue
            logits = torch.stack([qp[j, sl] @ kp[i, sl] for i in range(y.shape[0])]) * scale
            a = torch.exp(logits - logits.max())
            a = a / a.sum()
            out[j, sl] = (a[:, None] * vp[:, sl]).sum(0)
    return linear(attn.out_proj, out) if attn.out_proj is not None else out


def multihead_weights(attn, q: Tensor, y: Tensor) -> Tensor:
    """The attention weights of :func:`multihead`, ``[H, Q, L]``."""
    h, d = attn.num_heads, attn.dim
    dh = d // h
    qp, kp = linear(attn.query_proj, q), linear(attn.key_proj, y)
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(dh)
    w = torch.zeros(h, q.shape[0], y.shape[0], dtype=q.dtype)
    if y.shape[0] == 0:
        return w
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        w[head] = torch.softmax(qp[:, sl] @ kp[:, sl].T * scale, -1)
    return w


def row_ff(ff, h: Tensor) -> Tensor:
    layers = [m for m in ff if isinstance(m, torch.nn.Linear)]
    out = torch.relu(linear(layers[0], h))
    return linear(layers[1], out) if len(layers) == 2 else out


def mab(m, x: Tensor, y: Tensor) -> Tensor:
    """The paper's MAB (with the module's residual and LayerNorm switches), one set."""
    r = x if m.residual == "query" else linear(m.attn.query_proj, x)
    h = r + multihead(m.attn, x, y)
    if m.ln0 is not None:
        h = layer_norm(m.ln0, h)
    out = h + row_ff(m.ff, h)
    return layer_norm(m.ln1, out) if m.ln1 is not None else out


# ---------------------------------------------------------------------------------------------------------------
# Generic checks. `kind` is "pool" (one or more vectors per set) or "set" (one vector per element).
# ---------------------------------------------------------------------------------------------------------------


def forms(module, batch: Batch, **kw):
    return (module(batch.padded, batch.mask, **kw), module(batch.packed, offsets=batch.offsets, **kw),
            module(batch.sets, **kw))


def as_packed(out, batch: Batch, kind: str, form: str) -> Tensor:
    """Any form's output, as one tensor to compare: ``[B, ...]`` for pools, packed ``[N, D]`` for set-to-set."""
    if kind == "pool":
        return out
    if form == "padded":
        return out[batch.mask]
    if form == "list":
        return torch.cat(out)
    return out


def check_shapes(module, kind: str, out_dim: int, num_out: int, in_dim: int | None = None,
                 weight_rows: int | None = None, num_heads: int = 1) -> None:
    """Output (and, where there are any, weight) shapes in all three forms."""
    batch = make_batch(LENGTHS, in_dim or out_dim, dtype=torch.float32)
    b, l, n = len(LENGTHS), max(LENGTHS), sum(LENGTHS)
    padded, packed, listed = forms(module, batch)
    if kind == "pool":
        want = (b, out_dim) if num_out == 1 else (b, num_out, out_dim)
        assert padded.shape == want and packed.shape == want and listed.shape == want
    else:
        assert padded.shape == (b, l, out_dim) and packed.shape == (n, out_dim)
        assert isinstance(listed, list) and [t.shape for t in listed] == [(k, out_dim) for k in LENGTHS]
        assert torch.equal(padded[~batch.mask], torch.zeros(int((~batch.mask).sum()), out_dim))
    if weight_rows is not None:
        (_, wp), (_, wk), (_, wl) = forms(module, batch, return_weights=True)
        assert wp.shape == (b, num_heads, weight_rows, l)
        assert wk.shape == (n, num_heads, weight_rows)
        assert [w.shape for w in wl] == [(num_heads, weight_rows, k) for k in LENGTHS]


def check_forms_agree(module, kind: str, in_dim: int, weights: bool = True, atol: float = 1e-6) -> None:
    """padded + mask, packed + offsets (and + lengths) and list give the same output and weights (float32)."""
    batch = make_batch(LENGTHS, in_dim, dtype=torch.float32)
    outs = forms(module, batch, return_weights=weights)
    if not weights:
        outs = tuple((o, None) for o in outs)
    got = [as_packed(o, batch, kind, f) for (o, _), f in zip(outs, ("padded", "packed", "list"))]
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=atol)
    torch.testing.assert_close(got[2], got[0], rtol=0, atol=atol)
    by_lengths = module(batch.packed, lengths=batch.lengths)
    torch.testing.assert_close(as_packed(by_lengths, batch, kind, "packed"), got[0], rtol=0, atol=atol)
    if weights:
        wp, wk, wl = (w for _, w in outs)
        for bi, n in enumerate(LENGTHS):
            lo = int(batch.offsets[bi])
            torch.testing.assert_close(wl[bi], wp[bi, :, :, :n], rtol=0, atol=atol)
            torch.testing.assert_close(wk[lo:lo + n].permute(1, 2, 0), wl[bi], rtol=0, atol=atol)
            assert torch.equal(wp[bi, :, :, n:], torch.zeros_like(wp[bi, :, :, n:]))


def _params_finite(module) -> bool:
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def check_empty_sets(module, kind: str, in_dim: int, out_dim: int) -> None:
    """Empty sets (length 0, or all masked) give exactly 0 and finite gradients, in every form."""
    batch = make_batch([2, 0, 3, 0], in_dim, fill=0.0, dtype=torch.float64)
    for form in ("padded", "packed", "list"):
        module.zero_grad()
        x = {"padded": batch.padded, "packed": batch.packed}.get(form)
        if x is None:
            sets = [s.clone().requires_grad_() for s in batch.sets]
            out = module(sets)
            leaves = sets
        else:
            x = x.clone().requires_grad_()
            out = module(x, batch.mask) if form == "padded" else module(x, offsets=batch.offsets)
            leaves = [x]
        if kind == "pool" or form == "padded":
            assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
            total = out.sum()
        elif form == "list":
            assert out[1].shape == (0, out_dim) and out[3].shape == (0, out_dim)
            total = sum(o.sum() for o in out)
        else:
            assert out.shape == (5, out_dim)
            total = out.sum()
        total.backward()
        assert all(torch.isfinite(t.grad).all() for t in leaves)
        assert _params_finite(module)
    # a batch of nothing but empty sets
    module.zero_grad()
    x = torch.zeros(2, 3, in_dim, dtype=torch.float64, requires_grad=True)
    out = module(x, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and _params_finite(module)
    packed_out = module(torch.zeros(0, in_dim, dtype=torch.float64), offsets=torch.tensor([0, 0, 0]))
    assert torch.equal(packed_out, torch.zeros_like(packed_out))


def check_nan_padding(module, kind: str, in_dim: int) -> None:
    """NaN (and Inf) stored at masked positions reaches neither the output nor any gradient."""
    clean = make_batch(LENGTHS, in_dim, fill=0.0, dtype=torch.float64)
    dirty = make_batch(LENGTHS, in_dim, fill=float("nan"), dtype=torch.float64)
    x = dirty.padded.clone()
    x[0, -1] = float("inf")
    x = x.requires_grad_()
    module.zero_grad()
    out = module(x, dirty.mask)
    expected = module(clean.padded, clean.mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~dirty.mask], torch.zeros_like(x.grad[~dirty.mask]))
    assert _params_finite(module)  # (the key bias may get no gradient at all: the softmax cancels it)


def check_permutation(module, kind: str, in_dim: int, weight_rows: int | None = None) -> None:
    """Pools are invariant to the order of the elements, set-to-set maps equivariant (padded, mask not left-aligned,
    and list); weights move with their elements."""
    batch = make_batch(LENGTHS, in_dim, dtype=torch.float64, fill=0.0)
    g = torch.Generator().manual_seed(1)
    b, l = batch.mask.shape
    perm = torch.stack([torch.randperm(l, generator=g) for _ in range(b)])
    rows = torch.arange(b)[:, None]
    xp, mp = batch.padded[rows, perm], batch.mask[rows, perm]
    kw = {"return_weights": True} if weight_rows is not None else {}
    ref = module(batch.padded, batch.mask, **kw)
    got = module(xp, mp, **kw)
    if weight_rows is None:
        ref, got = (ref, None), (got, None)
    if kind == "pool":
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(got[0], ref[0][rows, perm], rtol=0, atol=1e-12)
    if weight_rows is not None:
        torch.testing.assert_close(got[1], ref[1][rows, :, :, perm].permute(0, 2, 3, 1), rtol=0, atol=1e-12)
    # list form
    perms = [torch.randperm(n, generator=g) for n in LENGTHS]
    shuffled = [s[p] for s, p in zip(batch.sets, perms)]
    ref_l, got_l = module(batch.sets), module(shuffled)
    if kind == "pool":
        torch.testing.assert_close(got_l, ref_l, rtol=0, atol=1e-12)
    else:
        for r, o, p in zip(ref_l, got_l, perms):
            torch.testing.assert_close(o, r[p], rtol=0, atol=1e-12)


def check_padding_invariance(module, kind: str, in_dim: int) -> None:
    """More padding changes nothing."""
    tight = make_batch(LENGTHS, in_dim, dtype=torch.float64)
    loose = make_batch(LENGTHS, in_dim, dtype=torch.float64, pad_to=max(LENGTHS) + 4)
    a, b = module(tight.padded, tight.mask), module(loose.padded, loose.mask)
    if kind == "pool":
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(b[:, : a.shape[1]], a, rtol=0, atol=1e-12)
        assert torch.equal(b[:, a.shape[1]:], torch.zeros_like(b[:, a.shape[1]:]))


def check_batch_independence(module, kind: str, in_dim: int) -> None:
    """Each set's output is what it would be alone (padded and packed)."""
    batch = make_batch(LENGTHS, in_dim, dtype=torch.float64)
    together_padded = module(batch.padded, batch.mask)
    together_packed = module(batch.packed, offsets=batch.offsets)
    for bi, s in enumerate(batch.sets):
        alone = module(s.unsqueeze(0))
        alone_packed = module(s, lengths=torch.tensor([s.shape[0]]))
        if kind == "pool":
            torch.testing.assert_close(together_padded[bi], alone[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(together_packed[bi], alone_packed[0], rtol=0, atol=1e-12)
        else:
            n = s.shape[0]
            lo = int(batch.offsets[bi])
            torch.testing.assert_close(together_padded[bi, :n], alone[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(together_packed[lo:lo + n], alone_packed, rtol=0, atol=1e-12)


def check_gradcheck(module, in_dim: int, lengths=(3, 0, 2)) -> None:
    """``gradcheck`` on double input in the padded (with a mask) and packed forms, with respect to the input and
    every parameter."""
    batch = make_batch(list(lengths), in_dim, dtype=torch.float64, fill=0.0)
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def run(x, *ps, packed):
        state = dict(zip(names, ps))
        if packed:
            out = torch.func.functional_call(module, state, (x,), {"offsets": batch.offsets})
        else:
            out = torch.func.functional_call(module, state, (x, batch.mask))
        return out

    xp = batch.padded.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *ps: run(x, *ps, packed=False), (xp, *params), fast_mode=True)
    xk = batch.packed.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *ps: run(x, *ps, packed=True), (xk, *params), fast_mode=True)


def check_reset_and_repr(module, words: list[str]) -> None:
    """``reset_parameters`` redraws the parameters (reproducibly under a seed) and ``extra_repr`` names the
    configuration."""
    torch.manual_seed(0)
    module.reset_parameters()
    first = [p.detach().clone() for p in module.parameters()]
    torch.manual_seed(1)
    module.reset_parameters()
    assert any(not torch.equal(a, p) for a, p in zip(first, module.parameters()))
    torch.manual_seed(0)
    module.reset_parameters()
    assert all(torch.equal(a, p) for a, p in zip(first, module.parameters()))
    text = repr(module)
    for w in words:
        assert w in text, (w, text)


def check_factory_kwargs(make, in_dim: int) -> None:
    """``dtype`` and ``device`` reach every parameter."""
    m = make(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    batch = make_batch([2, 3], in_dim, dtype=torch.float64)
    out = m(batch.sets)
    assert (torch.cat(out) if isinstance(out, list) else out).dtype == torch.float64
    meta = make(device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in meta.buffers())


__all__ = [
    "LENGTHS",
    "as_packed",
    "batch_from_sets",
    "check_batch_independence",
    "check_empty_sets",
    "check_factory_kwargs",
    "check_forms_agree",
    "check_gradcheck",
    "check_nan_padding",
    "check_padding_invariance",
    "check_permutation",
    "check_reset_and_repr",
    "check_shapes",
    "forms",
    "layer_norm",
    "linear",
    "mab",
    "make_batch",
    "multihead",
    "multihead_weights",
    "row_ff",
]
