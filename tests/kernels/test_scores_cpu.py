"""The fused given-logits kernel (`cpu.segment_softmax_pool`) against its reference, and its dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from attnpool import functional as AF
from attnpool.kernels import cpu, reference, segment_softmax_pool, use_kernel
from attnpool.nn import GatedAttentionPool

if not cpu.is_available():
    pytest.skip(f"the fused CPU kernel cannot be built here: {cpu.unavailable_reason()}", allow_module_level=True)

# empty sets first, in the middle and last; a set of 2500 rows, cut across pieces of the work split and merged
LENGTHS = [0, 1, 7, 2500, 0, 1, 33, 3, 0, 600, 2, 0]


def batch(lengths, dim, m, dtype=torch.float64, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    n = int(lens.sum())
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    s = (spread * torch.randn(n, m, generator=g, dtype=torch.float64)).to(torch.promote_types(dtype, torch.float32))
    return x, offsets, s


def run(fn, x, offsets, s, seed=1, grad_dtype=None):
    """out, lse and the gradients of a loss through both outputs (lse of empty sets left out: it is -inf); the
    output gradient is rounded to ``grad_dtype`` (default: out's dtype), so that two runs can share it."""
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out, lse = fn(x, offsets, s)
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(grad_dtype or out.dtype).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    loss = (out * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum()
    dx, ds = torch.autograd.grad(loss, [x, s])
    return out.detach(), lse.detach(), dx, ds


def check_close(got, want, tol):
    for name, a, b in zip(("out", "lse", "dx", "ds"), got, want):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        scale = b[finite].abs().max().clamp_min(1).item() if finite.any() else 1.0
        torch.testing.assert_close(a.double()[finite], b[finite], rtol=tol, atol=tol * scale,
                                   msg=lambda msg, n=name: f"{n}: {msg}")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])  # the accumulation's tiles of 1, 2, 3 and 4 softmaxes, and a remainder
@pytest.mark.parametrize("dim", [1, 5, 8, 19, 64, 67])  # below, at and past the SIMD width, with tails
def test_matches_reference(dtype, tol, m, dim):
    x, offsets, s = batch(LENGTHS, dim, m, dtype)
    got = run(cpu.segment_softmax_pool, x, offsets, s)
    check_close(got, run(reference.segment_softmax_pool, x.double(), offsets, s.double()), tol)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == s.dtype
    empty = torch.tensor(LENGTHS) == 0
    assert (got[0][empty] == 0).all() and torch.isneginf(got[1][empty]).all()


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_both_instruction_sets(isa):
    if isa == "avx2" and cpu._isa() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA+F16C: only the baseline loops can run here")
    x, offsets, s = batch(LENGTHS, 37, 3, torch.float32)
    cpu._force_isa(isa)
    try:
        got = run(cpu.segment_softmax_pool, x, offsets, s)
    finally:
        cpu._force_isa(None)
    check_close(got, run(reference.segment_softmax_pool, x.double(), offsets, s.double()), 2e-5)


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_inputs_accumulate_in_float32(dtype, ulp):
    x, offsets, s = batch(LENGTHS, 24, 2, dtype)
    got = run(cpu.segment_softmax_pool, x, offsets, s)
    want = run(reference.segment_softmax_pool, x.double(), offsets, s.double(), grad_dtype=dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b in zip(("out", "lse", "dx", "ds"), got, want):
        finite = torch.isfinite(b)
        bound = (ulp + 1e-5) * b[finite].abs().max().item()
        err = (a.double()[finite] - b[finite]).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def test_large_and_infinite_logits():
    """Logits of 1e4 (exp overflows float32 at 88) stay finite; a set whose logits are all -inf pools 0 with
    lse -inf and zero gradients, never NaN; one -inf logit among finite ones gets weight 0."""
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [7.0, 7.0], [1.0, 1.0]], dtype=torch.float32)
    s = torch.tensor([[1e4], [1e4 - 1], [-math.inf], [-math.inf], [-math.inf]], dtype=torch.float32)
    offsets = torch.tensor([0, 3, 5])
    got = run(cpu.segment_softmax_pool, x, offsets, s)
    want = run(reference.segment_softmax_pool, x.double(), offsets, s.double())
    out, lse, dx, ds = got
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(ds[:2]).all()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and (dx[3:] == 0).all() and (ds[2:] == 0).all()
    torch.testing.assert_close(out.double(), want[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(lse[0].double(), want[1][0], rtol=1e-6, atol=1e-3)


def test_gradcheck():
    x, offsets, s = batch([3, 0, 1, 5], 4, 2)

    def f(x, s):  # out, and lse where it is finite (an empty set's -inf has no derivative)
        out, lse = cpu.segment_softmax_pool(x, offsets, s)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), s.requires_grad_()))
    x, offsets, s = batch([1, 2100, 0, 2], 3, 1)  # a set cut across pieces of the work split
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), s.requires_grad_()), fast_mode=True)


def test_only_x_or_only_scores_needs_grad():
    x, offsets, s = batch(LENGTHS, 6, 2)
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    want = torch.autograd.grad(reference.segment_softmax_pool(xr, offsets, sr)[0].sum(), [xr, sr])
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(cpu.segment_softmax_pool(xr, offsets, s)[0].sum(), [xr])
    sr = s.clone().requires_grad_()
    (ds,) = torch.autograd.grad(cpu.segment_softmax_pool(x, offsets, sr)[0].sum(), [sr])
    torch.testing.assert_close(dx, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, want[1], rtol=1e-12, atol=1e-12)


def test_strided_rows_and_thread_count_reproducibility():
    x, offsets, s = batch(LENGTHS, 10, 2, torch.float32)
    wide = torch.randn(x.shape[0], 16)
    wide[:, 3:13] = x
    strided = wide[:, 3:13]
    assert strided.stride(0) == 16
    assert torch.equal(cpu.segment_softmax_pool(strided, offsets, s)[0], cpu.segment_softmax_pool(x, offsets, s)[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpu.segment_softmax_pool, x, offsets, s)
        torch.set_num_threads(max(2, threads))
        two = run(cpu.segment_softmax_pool, x, offsets, s)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_skewed_batch():
    g = torch.Generator().manual_seed(3)
    tiny = torch.randint(0, 5, (10_000,), generator=g).tolist()
    x, offsets, s = batch([*tiny[:5000], 300_000, *tiny[5000:]], 8, 1, seed=4)
    check_close(run(cpu.segment_softmax_pool, x, offsets, s),
                run(reference.segment_softmax_pool, x, offsets, s), 1e-10)


def test_bad_input_names_the_argument():
    x, offsets, s = batch([2, 3], 4, 1)
    with pytest.raises(ValueError, match=r"scores: expected a tensor \[N, M\] with N = 5"):
        cpu.segment_softmax_pool(x, offsets, s[:4])
    with pytest.raises(TypeError, match="scores: expected a floating-point tensor"):
        cpu.segment_softmax_pool(x, offsets, torch.ones(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="offsets"):
        cpu.segment_softmax_pool(x, torch.tensor([0, 3, 4]), s)


def test_dispatch_runs_the_kernel_on_cpu_and_the_reference_when_forced():
    x, offsets, s = batch(LENGTHS, 9, 2)
    auto = segment_softmax_pool(x, offsets, s.requires_grad_())
    with use_kernel("reference"):
        ref = segment_softmax_pool(x, offsets, s)
    assert "SegmentSoftmaxPool" in type(auto[0].grad_fn).__name__
    assert "SegmentSoftmaxPool" not in type(ref[0].grad_fn).__name__
    for a, b in zip(auto, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _grad_fn_names(t):
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("gated", [True, False])
def test_gated_attention_pool_takes_the_kernel_on_packed_input_and_matches_the_eager_path(gated):
    torch.manual_seed(0)
    pool = GatedAttentionPool(12, hidden_dim=8, num_branches=2, gated=gated).double()
    lengths = torch.tensor([3, 0, 40, 1, 7])
    x = torch.randn(int(lengths.sum()), 12, dtype=torch.float64, requires_grad=True)
    out = pool(x, lengths=lengths)
    assert any("SegmentSoftmaxPool" in n for n in _grad_fn_names(out))
    grads = torch.autograd.grad(out.square().sum(), [x, *pool.parameters()])
    with use_kernel("reference"):
        eager = pool(x, lengths=lengths)
        assert not any("SegmentSoftmaxPool" in n for n in _grad_fn_names(eager))
        eager_grads = torch.autograd.grad(eager.square().sum(), [x, *pool.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (out[1] == 0).all()
    # weights asked for without gradient come from the kernel's lse; with gradient, from the eager path
    with torch.no_grad():
        _, w = pool(x, lengths=lengths, return_weights=True)
        with use_kernel("reference"):
            _, w_eager = pool(x, lengths=lengths, return_weights=True)
    torch.testing.assert_close(w, w_eager, rtol=1e-12, atol=1e-12)
    _, w_grad = pool(x, lengths=lengths, return_weights=True)
    assert w_grad.requires_grad


def test_softmax_pool_on_packed_input_with_a_learned_temperature():
    x, offsets, s = batch(LENGTHS, 5, 3)
    temperature = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sr = s.clone().requires_grad_()
    out, w = AF.softmax_pool(x, sr, offsets=offsets, temperature=temperature, return_weights=True)
    assert w is not None
    got = torch.autograd.grad(out.sum(), [sr, temperature])
    with use_kernel("reference"):
        sr2 = s.clone().requires_grad_()
        ref = AF.softmax_pool(x, sr2, offsets=offsets, temperature=temperature)
        want = torch.autograd.grad(ref.sum(), [sr2, temperature])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_softmax_pool_weights_of_a_set_with_only_minus_inf_scores_are_zero_on_both_paths():
    x = torch.randn(5, 3, dtype=torch.float64)
    s = torch.tensor([0.5, -1.0, -math.inf, -math.inf, 2.0], dtype=torch.float64)
    offsets = torch.tensor([0, 2, 4, 5])
    out, w = AF.softmax_pool(x, s, offsets=offsets, return_weights=True)
    with use_kernel("reference"):
        ref, w_ref = AF.softmax_pool(x, s, offsets=offsets, return_weights=True)
    assert torch.isfinite(w).all() and (w[2:4] == 0).all() and (out[1] == 0).all()
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
