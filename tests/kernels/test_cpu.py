"""The fused CPU kernel against the reference kernel: forward, backward (x, query, through lse), dtypes, cut sets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnpool.kernels import cpu, reference

if not cpu.is_available():  # compiles the kernel on the first run on this machine (a few seconds)
    pytest.skip(f"the fused CPU kernel cannot be built here: {cpu.unavailable_reason()}", allow_module_level=True)

# Sets of every kind: empty (first, middle, last), length 1, and one of 2500 rows, longer than a piece of the work
# split (N // 1024 pieces for N rows), so that it is cut across pieces and merged.
LENGTHS = [0, 1, 7, 2500, 0, 1, 33, 3, 0, 600, 2, 0]


def batch(lengths, dim, dtype=torch.float64, query_rows=1, m=1, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    x = (spread * torch.randn(int(lens.sum()), dim, generator=g, dtype=torch.float64)).to(dtype)
    rows = 1 if query_rows == 1 else len(lengths)
    q = torch.randn(rows, m, dim, generator=g, dtype=torch.float64).to(dtype)
    return x, offsets, q


def run(fn, x, offsets, q, scale, seed=1):
    """Outputs and the gradients w.r.t. x and query of a loss using both out and (finite) lse."""
    x = x.detach().clone().requires_grad_()
    q = q.detach().clone().requires_grad_()
    out, lse = fn(x, offsets, q, scale)
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype) * torch.isfinite(lse)
    loss = (out * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum()
    dx, dq = torch.autograd.grad(loss, [x, q])
    return out.detach(), lse.detach(), dx, dq


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("query_rows", ["shared", "per-set"])
@pytest.mark.parametrize("m", [1, 3])
def test_matches_reference(dtype, tol, query_rows, m):
    x, offsets, q = batch(LENGTHS, 19, dtype, query_rows=1 if query_rows == "shared" else 0, m=m)
    got = run(cpu.segment_attention_pool, x, offsets, q, 0.4)
    want = run(reference.segment_attention_pool, x, offsets, q, 0.4)
    for name, a, b in zip(("out", "lse", "dx", "dq"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda s, name=name: f"{name}: {s}")
    out, lse, dx, dq = got
    empty = torch.tensor(LENGTHS) == 0
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dq).all()
    if query_rows == "per-set":
        assert (dq[empty] == 0).all()


@pytest.fixture(params=["avx2", "baseline"])
def isa(request):
    """Run a test with the AVX2 loops (where the CPU has them) and with the baseline ones every x86-64 has."""
    if request.param == "avx2" and cpu._isa() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA+F16C")
    cpu._force_isa(request.param)
    yield request.param
    cpu._force_isa(None)


def test_both_instruction_sets(isa):
    assert cpu._isa() == isa
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for query_rows in (1, 0):
            x, offsets, q = batch(LENGTHS, 13, dtype, query_rows=query_rows, m=3)
            for a, b in zip(run(cpu.segment_attention_pool, x, offsets, q, 0.4),
                            run(reference.segment_attention_pool, x, offsets, q, 0.4)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for dtype in (torch.float16, torch.bfloat16):  # the F16C and the bit-twiddling conversions, both directions
        x, offsets, q = batch([5, 0, 30], 21, dtype, m=2)
        for a, b in zip(run(cpu.segment_attention_pool, x, offsets, q, 0.4),
                        run(reference.segment_attention_pool, x, offsets, q, 0.4)):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        y = torch.tensor([0.0, -0.0, 1e-7, 6.1e-5, 65504.0, float("inf"), float("-inf"), float("nan"), 1 / 3],
                         dtype=torch.float32).to(dtype)
        # One-row sets and a zero query: weight exactly 1, so out = x and dx = dL/dout exactly: a round trip through
        # the kernel's conversions (widening x; narrowing dx), subnormals and the largest float16 included.
        xs = y.repeat(2, 1).T.contiguous().requires_grad_()  # [9, 2]: every value in a set of its own
        out, _ = cpu.segment_attention_pool(xs, torch.arange(10), torch.zeros(1, 1, 2, dtype=dtype), 1.0)
        (dx,) = torch.autograd.grad(out, [xs], grad_outputs=xs.detach()[:, None].flip(-1))
        finite = torch.isfinite(y)
        assert torch.equal(out[finite, 0], xs[finite]), dtype
        assert torch.equal(dx[finite], xs.detach()[finite].flip(-1)), dtype


@pytest.mark.parametrize("dim", [1, 5, 8, 64, 67])  # below, at and past the SIMD width, with tails
def test_feature_dims(dim):
    x, offsets, q = batch([3, 0, 40, 1, 17], dim, query_rows=0, m=5)
    for a, b in zip(run(cpu.segment_attention_pool, x, offsets, q, 0.3),
                    run(reference.segment_attention_pool, x, offsets, q, 0.3)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# The forward computes logits one row at a time for M <= 2 and on tiles of 3 rows x 4 queries (4 x 3 for a group of
# three) with a software prefetch of the next block for M >= 3; queries go in groups of four. Every M up to two full
# groups plus one, sets whose lengths leave every remainder of a 16-row block and of a 3- or 4-row tile, a set that
# ends x (the prefetch stops at its last row) and a set cut across pieces of the work split.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("dim", [7, 16, 67])
def test_every_query_count_and_tile_remainder(m, dim):
    lengths = [1, 2, 3, 4, 5, 0, 15, 16, 17, 18, 19, 31, 33, 2500, 47, 1, 2]
    x, offsets, q = batch(lengths, dim, query_rows=1 if m % 2 else 0, m=m, seed=m)
    for name, a, b in zip(("out", "lse", "dx", "dq"), run(cpu.segment_attention_pool, x, offsets, q, 0.3),
                          run(reference.segment_attention_pool, x, offsets, q, 0.3)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda s, name=name: f"{name}: {s}")
    x32, q32 = x.float(), q.float()
    got = cpu.segment_attention_pool(x32, offsets, q32, 0.3)
    want = reference.segment_attention_pool(x, offsets, q, 0.3)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5)


def test_tiled_path_in_half_precision_and_on_both_instruction_sets(isa):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        x, offsets, q = batch([20, 0, 37, 5], 40, dtype, m=4)
        for a, b in zip(run(cpu.segment_attention_pool, x, offsets, q, 0.3),
                        run(reference.segment_attention_pool, x, offsets, q, 0.3)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _pool_with_finite_lse(offsets):
    def f(x, q):
        out, lse = cpu.segment_attention_pool(x, offsets, q, 0.7)
        return out, torch.where(torch.isfinite(lse), lse, 0)  # -inf (empty set) has no finite difference
    return f


def test_gradcheck():
    x, offsets, q = batch([3, 0, 1, 5], 4, query_rows=0, m=2)
    assert torch.autograd.gradcheck(_pool_with_finite_lse(offsets), (x.requires_grad_(), q.requires_grad_()))
    x, offsets, q = batch([1, 2100, 0, 2], 3, m=2)  # a set cut across pieces, shared query
    assert torch.autograd.gradcheck(_pool_with_finite_lse(offsets), (x.requires_grad_(), q.requires_grad_()),
                                    fast_mode=True)


@pytest.mark.parametrize("m", [2, 4])  # the one-row and the tiled backward (whose prefetch differs without dx)
def test_only_one_output_or_input_needs_grad(m):
    x, offsets, q = batch(LENGTHS, 6, m=m)
    xr = x.clone().requires_grad_()
    _, lse = cpu.segment_attention_pool(xr, offsets, q, 0.5)
    (dx,) = torch.autograd.grad(torch.where(torch.isfinite(lse), lse, 0).sum(), [xr])
    xr2 = x.clone().requires_grad_()
    _, lse2 = reference.segment_attention_pool(xr2, offsets, q, 0.5)
    (dx2,) = torch.autograd.grad(torch.where(torch.isfinite(lse2), lse2, 0).sum(), [xr2])
    torch.testing.assert_close(dx, dx2, rtol=1e-12, atol=1e-12)
    qr = q.clone().requires_grad_()
    out, _ = cpu.segment_attention_pool(x, offsets, qr, 0.5)
    (dq,) = torch.autograd.grad(out.sum(), [qr])
    qr2 = q.clone().requires_grad_()
    (dq2,) = torch.autograd.grad(reference.segment_attention_pool(x, offsets, qr2, 0.5)[0].sum(), [qr2])
    torch.testing.assert_close(dq, dq2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_without_grad_the_same_results_without_autograd(dtype):
    """With nothing to differentiate the wrapper calls the kernel without ``torch.autograd.Function``: the same
    results, bit for bit, and outputs that carry no graph."""
    x, offsets, q = batch(LENGTHS, 6, dtype=dtype, m=2)
    with torch.no_grad():
        out, lse = cpu.segment_attention_pool(x.requires_grad_(), offsets, q, 0.5)
    assert out.grad_fn is None and lse.grad_fn is None and out.dtype == dtype
    x.requires_grad_(False)
    plain = cpu.segment_attention_pool(x, offsets, q, 0.5)  # grad mode on, but nothing requires grad
    tracked = cpu.segment_attention_pool(x.clone().requires_grad_(), offsets, q, 0.5)
    assert tracked[0].grad_fn is not None
    for a, b, c in zip((out, lse), plain, tracked):
        assert torch.equal(a, b) and torch.equal(a, c.detach())


# Half inputs accumulate in float32. Against float64 on the same (rounded) inputs, the error is the rounding of the
# result to the input dtype (half an ulp: 2^-11 relative for float16, 2^-8 for bfloat16) plus float32 accumulation
# (~1e-6 relative); lse (float32) and dq (float32, cast to the query dtype) likewise. The bounds below are those
# roundings, with a margin of 2 for the float32 part, relative to the largest magnitude of each tensor.
@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_inputs_accumulate_in_float32(dtype, ulp):
    x, offsets, q = batch(LENGTHS, 24, dtype, query_rows=0, m=3, spread=2.0)
    got = run(cpu.segment_attention_pool, x, offsets, q, 0.3)
    want = run(reference.segment_attention_pool, x.double(), offsets, q.double(), 0.3)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    for name, a, b in zip(("out", "lse", "dx", "dq"), got, want):
        bound = (ulp + 2e-6) * b[torch.isfinite(b)].abs().max().item()
        err = (a.double() - b).nan_to_num(neginf=0.0).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
    # and as close to the reference run on the same half inputs (which also accumulates in float32)
    ref = run(reference.segment_attention_pool, x, offsets, q, 0.3)
    torch.testing.assert_close(got[0], ref[0], rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


def test_skewed_batch():
    """One set of 300k rows beside 10k tiny ones (0 to 4 rows): the long set is cut into pieces and merged."""
    g = torch.Generator().manual_seed(3)
    tiny = torch.randint(0, 5, (10_000,), generator=g).tolist()
    lengths = [*tiny[:5000], 300_000, *tiny[5000:]]
    x, offsets, q = batch(lengths, 8, torch.float64, query_rows=1, m=2, seed=4)
    got = run(cpu.segment_attention_pool, x, offsets, q, 0.5)
    want = run(reference.segment_attention_pool, x, offsets, q, 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("m", [2, 4])  # the one-row and the tiled forward
def test_reproducible_whatever_the_thread_count(m):
    x, offsets, q = batch([5000, 3, 0, 4000, 1], 16, torch.float32, m=m)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpu.segment_attention_pool, x, offsets, q, 0.2)
        torch.set_num_threads(2)
        two = run(cpu.segment_attention_pool, x, offsets, q, 0.2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_degenerate_batches():
    q = torch.randn(1, 2, 4, dtype=torch.float64)
    for lengths in ([], [0], [0, 0, 0]):
        x, offsets, _ = batch(lengths, 4)
        xr = x.clone().requires_grad_()
        qr = q.clone().requires_grad_()
        out, lse = cpu.segment_attention_pool(xr, offsets, qr, 1.0)
        assert out.shape == (len(lengths), 2, 4) and (out == 0).all() and torch.isneginf(lse).all()
        dx, dq = torch.autograd.grad(out.sum(), [xr, qr])
        assert dx.shape == (0, 4) and (dq == 0).all()


@pytest.mark.parametrize("m", [2, 4])  # the one-row and the tiled forward (which prefetches strided rows)
def test_strided_rows(m):
    x, offsets, q = batch([4, 0, 9, 2, 40], 6, m=m)
    wide = torch.randn(x.shape[0], 10, dtype=torch.float64)
    wide[:, 2:8] = x
    strided = wide[:, 2:8]  # row stride 10
    transposed = x.T.contiguous().T  # column-major
    want = cpu.segment_attention_pool(x, offsets, q, 0.5)
    for view in (strided, transposed):
        for a, b in zip(cpu.segment_attention_pool(view, offsets, q, 0.5), want):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    xr = strided.clone().requires_grad_()  # gradients of a strided view land in its layout
    wr = wide.clone().requires_grad_()
    cpu.segment_attention_pool(wr[:, 2:8], offsets, q, 0.5)[0].sum().backward()
    cpu.segment_attention_pool(xr, offsets, q, 0.5)[0].sum().backward()
    torch.testing.assert_close(wr.grad[:, 2:8], xr.grad)
    assert (wr.grad[:, :2] == 0).all()


def test_bad_input_names_the_argument():
    x, offsets, q = batch([2, 3], 4)
    with pytest.raises(ValueError, match=r"offsets: expected non-decreasing values from 0 to N = 5"):
        cpu.segment_attention_pool(x, torch.tensor([0, 3, 2]), q, 1.0)
    with pytest.raises(ValueError, match=r"offsets: expected non-decreasing values from 0 to N = 5"):
        cpu.segment_attention_pool(x, torch.tensor([0, 2, 4]), q, 1.0)
    with pytest.raises(TypeError, match=r"offsets: expected an integer tensor"):
        cpu.segment_attention_pool(x, offsets.double(), q, 1.0)
    with pytest.raises(ValueError, match=r"query: expected a tensor \[1 or B, M, D\] with B = 2, D = 4"):
        cpu.segment_attention_pool(x, offsets, torch.randn(3, 1, 4, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"x: expected a tensor \[N, D\]"):
        cpu.segment_attention_pool(x[None], offsets, q, 1.0)
    with pytest.raises(TypeError, match=r"x: expected float32, float64, float16 or bfloat16, got torch.int64"):
        cpu.segment_attention_pool(x.long(), offsets, q, 1.0)
    with pytest.raises(TypeError, match=r"scale: expected a Python float"):
        cpu.segment_attention_pool(x, offsets, q, torch.tensor(1.0, requires_grad=True))
    # int32 offsets are accepted
    torch.testing.assert_close(cpu.segment_attention_pool(x, offsets.int(), q, 1.0),
                               cpu.segment_attention_pool(x, offsets, q, 1.0))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_concurrent_builds_share_one_library(tmp_path):
    """Two processes building into the same empty cache (pytest-xdist workers): one compiles, both load it."""
    code = """
        from attnpool.kernels import cpu
        lib = cpu.build()
        print(cpu._isa(), lib._name)
    """
    env = {"ATTNPOOL_KERNEL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    for _, err, rc in results:
        assert rc == 0, err
    assert len({out.split()[1] for out, _, _ in results}) == 1
    assert [p.name for p in tmp_path.glob("*.so")] == [os.path.basename(results[0][0].split()[1])]
    assert not list(tmp_path.glob("*.build.*")), "a temporary build directory was left behind"


def test_unavailable_without_a_compiler(tmp_path):
    code = """
        import torch
        from attnpool.kernels import cpu
        assert not cpu.is_available()
        print(cpu.unavailable_reason())
        try:
            cpu.segment_attention_pool(torch.zeros(1, 2), torch.tensor([0, 1]), torch.zeros(1, 1, 2), 1.0)
        except RuntimeError as e:
            print(e)
    """
    proc = _python(code, CXX=str(tmp_path / "no-such-compiler"), ATTNPOOL_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "no C++ compiler found" in proc.stdout
    assert "the attnpool CPU kernel is unavailable" in proc.stdout
    assert "attnpool.kernels.reference.segment_attention_pool computes the same thing" in proc.stdout
