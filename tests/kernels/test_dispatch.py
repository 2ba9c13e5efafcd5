"""The kernel dispatcher, and the engine's kernel path checked against the eager path."""

import pytest
import torch

import attnpool.kernels as kernels
from attnpool.functional import attention_pool
from attnpool.kernels import reference
from attnpool.nn import AttentionPool, ChannelSoftmaxPool, GatedAttentionPool
from tests.conftest import make_batch


@pytest.fixture
def reference_as_fused(monkeypatch):
    """Serve the reference kernel under the name of the fused CPU kernel, so that the engine's kernel path (query
    scaling, weights rebuilt from the log-sum-exp) runs whatever compiler this machine has."""
    monkeypatch.setitem(kernels._loaded, "cpu", reference.segment_attention_pool)
    with kernels.use_kernel("cpu"):
        yield


def test_reference_kernel_matches_the_engine_and_reports_lse():
    batch = make_batch([3, 0, 1, 6], 5)
    q = torch.randn(4, 2, 5, dtype=torch.float64)
    out, lse = reference.segment_attention_pool(batch.packed, batch.offsets, q, 0.3)
    torch.testing.assert_close(out, attention_pool(batch.packed, q, offsets=batch.offsets, scale=0.3),
                               rtol=0, atol=1e-14)
    for b, s in enumerate(batch.sets):
        expected = torch.logsumexp(0.3 * s @ q[b].T, 0) if s.shape[0] else torch.full((2,), -torch.inf).double()
        torch.testing.assert_close(lse[b], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("query_rows", [1, 4])
@pytest.mark.parametrize("learned_temperature", [True, False])
def test_engine_kernel_path_equals_eager_path(reference_as_fused, query_rows, learned_temperature):
    """A learned temperature scales the query (its gradient flows through it); a plain number goes to the kernel
    as its scale. Either way: the eager path's output, weights and gradients."""
    batch = make_batch([3, 0, 1, 6], 5)
    q = torch.randn(query_rows, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if learned_temperature else 0.7
    x = batch.packed.clone().requires_grad_()
    fused = attention_pool(x, q, offsets=batch.offsets, temperature=t)
    fused.sum().backward()
    fused_grads = x.grad.clone(), (t.grad.clone() if learned_temperature else q.grad.clone())
    x.grad, q.grad = None, None
    if learned_temperature:
        t.grad = None
    with torch.no_grad():
        fused_out, fused_w = attention_pool(x, q, offsets=batch.offsets, temperature=t, return_weights=True)
    with kernels.use_kernel("reference"):
        eager = attention_pool(x, q, offsets=batch.offsets, temperature=t)
        eager.sum().backward()
        eager_w = attention_pool(x, q, offsets=batch.offsets, temperature=t, return_weights=True)[1]
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-14)
    torch.testing.assert_close(fused_out, eager.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(fused_w, eager_w, rtol=0, atol=1e-14)
    torch.testing.assert_close(fused_grads[0], x.grad, rtol=0, atol=1e-14)
    torch.testing.assert_close(fused_grads[1], t.grad if learned_temperature else q.grad, rtol=0, atol=1e-14)


def test_folded_module_runs_on_the_kernel(reference_as_fused, monkeypatch):
    calls = []
    monkeypatch.setitem(kernels._loaded, "cpu", lambda *a: calls.append(1) or reference.segment_attention_pool(*a))
    pool = AttentionPool(8, 2, 2, key_proj=True, value_proj=True, dtype=torch.float64)
    batch = make_batch([4, 0, 2], 8)
    out = pool(batch.packed, offsets=batch.offsets)
    assert calls, "the folded packed path should use the fused kernel"
    with kernels.use_kernel("reference"):
        torch.testing.assert_close(out, pool(batch.packed, offsets=batch.offsets), rtol=0, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_one_head_applies_value_and_output_projections_as_one(reference_as_fused, bias):
    """One head, W_v and W_o, more pooled vectors than D: (W_o W_v) z + (W_o b_v + b_o) in one product, equal to
    the projected path (every element through W_k and W_v) with gradients, the empty set still 0."""
    torch.manual_seed(0)
    pool = AttentionPool(6, 1, 1, query_proj=True, key_proj=True, value_proj=True, out_proj=True, bias=bias,
                         learn_temperature=True, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            for layer in (pool.key_proj, pool.value_proj, pool.out_proj):
                layer.bias.normal_()
    out_proj_calls = []
    plain_forward = pool.out_proj.forward
    # counted without a hook: a hooked W_o is always called as a module (tests/nn/test_attention_pool.py)
    pool.out_proj.forward = lambda z: out_proj_calls.append(1) or plain_forward(z)
    batch = make_batch([3, 1, 0, 5, 2, 4, 1, 7, 2, 3], 6)  # B = 10 > D = 6
    results = {}
    for fold in (False, True):
        pool.fold = fold
        pool.zero_grad()
        out_proj_calls.clear()
        x = batch.packed.clone().requires_grad_()
        out = pool(x, offsets=batch.offsets)
        out.sin().sum().backward()
        assert bool(out_proj_calls) == (not fold)  # folded: W_o went into the one product
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in pool.named_parameters()}
        results[fold] = (out.detach(), x.grad, grads)
    (o0, x0, g0), (o1, x1, g1) = results[False], results[True]
    torch.testing.assert_close(o1, o0, rtol=0, atol=1e-13)
    assert torch.equal(o1[2], torch.zeros_like(o1[2]))
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-12, msg=name)


def test_overrides_and_errors(monkeypatch):
    before = kernels._choice
    assert "reference" in kernels.available_kernels()
    with pytest.raises(ValueError, match=r"kernel: expected one of .* got .fastest."):
        kernels.set_kernel("fastest")
    monkeypatch.setitem(kernels._loaded, "triton", None)
    with kernels.use_kernel("triton"), pytest.raises(RuntimeError, match="'triton' was forced"):
        kernels.get_kernel("cpu")
    with kernels.use_kernel("reference"):
        assert kernels.get_kernel("cpu")[0] == "reference"
    assert kernels._choice == before


@pytest.mark.parametrize("make", [
    lambda: AttentionPool(6, score="dot", dtype=torch.float64),
    lambda: AttentionPool(6, 2, 2, key_proj=True, value_proj=True, dtype=torch.float64),
    lambda: GatedAttentionPool(6, 4, dtype=torch.float64),
    lambda: ChannelSoftmaxPool(learn=True, dtype=torch.float64),
], ids=["dot", "folded", "gated", "channel"])
def test_torch_func_transforms_take_the_eager_path(make):
    """``torch.func.vmap`` and ``torch.func.grad`` wrap their inputs; the fused kernels (opaque calls on raw
    pointers) cannot take those, so packed pooling under a transform runs the eager path: the same values and
    gradients as a loop of plain calls on the kernel."""
    torch.manual_seed(0)
    pool = make()
    offsets = torch.tensor([0, 3, 3, 7])
    xs = torch.randn(4, 7, 6, dtype=torch.float64)
    with kernels.use_kernel("auto"):
        batched = torch.func.vmap(lambda x: pool(x, offsets=offsets))(xs)
        grads = torch.func.vmap(torch.func.grad(lambda x: pool(x, offsets=offsets).sin().sum()))(xs)
        loop, loop_grads = [], []
        for x in xs:
            x = x.clone().requires_grad_()
            out = pool(x, offsets=offsets)
            (g,) = torch.autograd.grad(out.sin().sum(), [x])
            loop.append(out.detach())
            loop_grads.append(g)
    torch.testing.assert_close(batched, torch.stack(loop), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads, torch.stack(loop_grads), rtol=0, atol=1e-12)
