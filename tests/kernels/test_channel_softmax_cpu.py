"""The fused per-channel softmax kernel (`cpu.segment_channel_softmax_pool`) against its reference."""

from __future__ import annotations

import pytest
import torch

from attnpool.kernels import cpu, reference, segment_channel_softmax_pool, use_kernel

if not cpu.is_available():
    pytest.skip(f"the fused CPU kernel cannot be built here: {cpu.unavailable_reason()}", allow_module_level=True)

# empty sets first, in the middle and last; a set of 2500 rows, cut across pieces of the work split and merged
LENGTHS = [0, 1, 7, 2500, 0, 1, 33, 3, 0, 600, 2, 0]


def batch(lengths, dim, dtype=torch.float64, seed=0, spread=2.0, per_channel=True):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    x = (spread * torch.randn(int(lens.sum()), dim, generator=g, dtype=torch.float64)).to(dtype)
    shape = (dim,) if per_channel else ()
    t = (torch.rand(shape, generator=g, dtype=torch.float64) * 3 - 1).to(torch.promote_types(dtype, torch.float32))
    return x, offsets, t


def run(fn, x, offsets, t, seed=1):
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out, lse = fn(x, offsets, t)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dx, dt = torch.autograd.grad((out * g_out.to(out.dtype)).sum(), [x, t])
    return out.detach(), lse.detach(), dx, dt


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dim", [1, 5, 8, 19, 64, 67])  # below, at and past the SIMD width, with tails
def test_matches_reference(dtype, tol, per_channel, dim):
    x, offsets, t = batch(LENGTHS, dim, dtype, per_channel=per_channel)
    got = run(cpu.segment_channel_softmax_pool, x, offsets, t)
    want = run(reference.segment_channel_softmax_pool, x.double(), offsets, t.double())
    for name, a, b in zip(("out", "lse", "dx", "dt"), got, want):
        assert a.dtype == dtype or name == "dt" or name == "lse", name
        scale = b[torch.isfinite(b)].abs().max().clamp_min(1).item()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=lambda s, n=name: f"{n}: {s}")
    out, lse = got[0], got[1]
    empty = torch.tensor(LENGTHS) == 0
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_inputs_accumulate_in_float32(dtype, ulp):
    x, offsets, t = batch(LENGTHS, 24, dtype)
    got = run(cpu.segment_channel_softmax_pool, x, offsets, t)
    want = run(reference.segment_channel_softmax_pool, x.double(), offsets, t.double())
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b in zip(("out", "lse", "dx", "dt"), got, want):
        bound = (ulp + 1e-5) * b[torch.isfinite(b)].abs().max().item()
        err = (a.double() - b).nan_to_num(neginf=0.0).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def test_large_values_do_not_overflow():
    """Logits of +-1e4 (exp overflows float32 at 88): the running max keeps every exponent <= 0."""
    x = torch.tensor([[1e4, -1e4], [1e4 - 1, -1e4 + 1], [0.0, 0.0]], dtype=torch.float32)
    out, lse = cpu.segment_channel_softmax_pool(x, torch.tensor([0, 3]), torch.tensor(1.0))
    want, want_lse = reference.segment_channel_softmax_pool(x.double(), torch.tensor([0, 3]), torch.tensor(1.0,
                                                            dtype=torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-3)


def test_gradcheck():
    x, offsets, t = batch([3, 0, 1, 5], 4)
    f = lambda x, t: cpu.segment_channel_softmax_pool(x, offsets, t)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), t.requires_grad_()))
    x, offsets, t = batch([1, 2100, 0, 2], 3, per_channel=False)  # a set cut across pieces, one shared t
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), t.requires_grad_()), fast_mode=True)


def test_only_x_or_only_t_needs_grad():
    x, offsets, t = batch(LENGTHS, 6)
    want = run(reference.segment_channel_softmax_pool, x, offsets, t)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(cpu.segment_channel_softmax_pool(xr, offsets, t)[0].sum(), [xr])
    tr = t.clone().requires_grad_()
    (dt,) = torch.autograd.grad(cpu.segment_channel_softmax_pool(x, offsets, tr)[0].sum(), [tr])
    xr2, tr2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    dx2, dt2 = torch.autograd.grad(reference.segment_channel_softmax_pool(xr2, offsets, tr2)[0].sum(), [xr2, tr2])
    torch.testing.assert_close(dx, dx2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dt, dt2, rtol=1e-12, atol=1e-12)
    assert want[0].shape == (len(LENGTHS), 6)


def test_strided_rows_and_thread_count_reproducibility():
    x, offsets, t = batch(LENGTHS, 10, torch.float32)
    wide = torch.randn(x.shape[0], 16)
    wide[:, 3:13] = x
    strided = wide[:, 3:13]
    assert strided.stride(0) == 16
    got = cpu.segment_channel_softmax_pool(strided, offsets, t)[0]
    assert torch.equal(got, cpu.segment_channel_softmax_pool(x, offsets, t)[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpu.segment_channel_softmax_pool, x, offsets, t)
        torch.set_num_threads(max(2, threads))
        two = run(cpu.segment_channel_softmax_pool, x, offsets, t)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_skewed_batch():
    g = torch.Generator().manual_seed(3)
    tiny = torch.randint(0, 5, (10_000,), generator=g).tolist()
    x, offsets, t = batch([*tiny[:5000], 300_000, *tiny[5000:]], 8, seed=4)
    for a, b in zip(run(cpu.segment_channel_softmax_pool, x, offsets, t),
                    run(reference.segment_channel_softmax_pool, x, offsets, t)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bad_t_names_the_argument():
    x, offsets, _ = batch([2, 3], 4)
    with pytest.raises(ValueError, match=r"t: expected .*\[D\] = \[4\]"):
        cpu.segment_channel_softmax_pool(x, offsets, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="offsets"):
        cpu.segment_channel_softmax_pool(x, torch.tensor([0, 3, 4]), torch.ones(4, dtype=torch.float64))


def test_dispatch_runs_the_kernel_on_cpu_and_the_reference_when_forced():
    x, offsets, t = batch(LENGTHS, 9)
    auto = segment_channel_softmax_pool(x, offsets, t)
    with use_kernel("reference"):
        ref = segment_channel_softmax_pool(x, offsets, t)
    assert auto[0].grad_fn is None and ref[0].grad_fn is None
    xr = x.clone().requires_grad_()
    assert "SegmentChannelSoftmaxPool" in type(segment_channel_softmax_pool(xr, offsets, t)[0].grad_fn).__name__
    for a, b in zip(auto, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
