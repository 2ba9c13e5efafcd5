"""The Triton kernels against the reference kernel (float64), forward and backward.

Without a GPU the kernels run in Triton's interpreter on the CPU: tests/conftest.py sets ``TRITON_INTERPRET=1``
before anything imports triton (triton reads it once, at import). On a machine with CUDA the same tests run the
compiled kernels on the GPU. The interpreter is slow: shapes are tiny, and ``chunk``/``block_n`` are small so that
sets span several tiles and long sets are split across programs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the Triton kernels need it")

from attnpool.kernels import reference, triton_pool

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not (CUDA or triton_pool._INTERPRETED):
    pytest.fail("triton was imported without TRITON_INTERPRET=1 and there is no GPU: tests/conftest.py must set it "
                "before the first import of triton", pytrace=False)
SCALE = 0.7

# empty sets, length-1 sets, a set longer than one tile (block_n=4) and one split across programs (chunk=8):
# head rows 10..17, then tails in the global tiles 2 (rows 18..23) and 3 (rows 24..29)
LENGTHS = [0, 1, 5, 0, 20, 3]
TUNING = {"chunk": 8, "block_n": 4}


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)


def _inputs(lengths, d, m, shared, dtype, seed=0):
    """Inputs rounded to ``dtype`` (held in float64, so the reference sees exactly what the kernel sees)."""
    g = torch.Generator().manual_seed(seed)
    n, b = sum(lengths), len(lengths)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).double()
    q = torch.randn(1 if shared else b, m, d, generator=g, dtype=torch.float64).to(dtype).double()
    g_out = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    g_lse = torch.randn(b, m, generator=g, dtype=torch.float64)
    return x, q, g_out, g_lse


def _loss(out, lse, g_out, g_lse):
    # lse is -inf for an empty set; where() gives those entries no gradient, as a caller masking them would
    return (out.double() * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * g_lse).sum()


def _run(fn, x, offsets, q, g_out, g_lse, dtype, device, **kw):
    xt = x.to(device=device, dtype=dtype, copy=True).requires_grad_()
    qt = q.to(device=device, dtype=dtype, copy=True).requires_grad_()
    out, lse = fn(xt, offsets.to(device), qt, SCALE, **kw)
    _loss(out, lse, g_out.to(device), g_lse.to(device)).backward()
    return out.detach().cpu(), lse.detach().cpu(), xt.grad.cpu(), qt.grad.cpu()


def _check(lengths, d, m, shared, dtype, seed=0, **tuning):
    offsets = _offsets(lengths)
    x, q, g_out, g_lse = _inputs(lengths, d, m, shared, dtype, seed)
    ref = _run(reference.segment_attention_pool, x, offsets, q, g_out, g_lse, torch.float64, "cpu")
    got = _run(triton_pool.segment_attention_pool, x, offsets, q, g_out, g_lse, dtype, DEVICE, **tuning)

    out, lse, dx, dq = got
    assert out.dtype == dtype and dx.dtype == dtype and dq.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref[0].shape and lse.shape == ref[1].shape and dq.shape == q.shape and dx.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(dq).all()
    # lse: float32 statistics whatever x.dtype; -inf exactly where the reference has it (the empty sets)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    finite = torch.isfinite(ref[1])
    torch.testing.assert_close(lse[finite].double(), ref[1][finite], rtol=1e-5, atol=1e-5)
    for name, a, r in (("out", out, ref[0]), ("dx", dx, ref[2]), ("dq", dq, ref[3])):
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
        else:
            # Half types: float32 arithmetic, then one rounding to dtype of the result (eps/2 relative), and for the
            # gradients g.out taken from the rounded out. Bound: 2 eps of the largest reference entry + eps relative
            # (the largest error seen over seeds is about 0.4 of it).
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(a.double(), r, rtol=eps, atol=2 * eps * max(1.0, r.abs().max().item()),
                                       msg=lambda s, n=name: f"{n}: {s}")
    return got


def test_is_available():
    assert triton_pool.is_available()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-query", "per-set-query"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(dtype, m, shared):
    # D = 6 is padded to BLOCK_D = 8 and masked
    _check(LENGTHS, 6, m, shared, dtype, **TUNING)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-query", "per-set-query"])
def test_query_blocks(shared):
    # block_m=2 with M=3: two blocks of queries (separate programs forward; dx accumulated over blocks backward)
    _check(LENGTHS, 6, 3, shared, torch.float32, block_m=2, **TUNING)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-query", "per-set-query"])
def test_skewed_batch(shared):
    # one long set among tiny ones: with chunk=8 it is split over a head and 5 tail programs, and the global tiles
    # holding its tail also hold tiny sets (handled by their own heads)
    lengths = [2, 1, 0, 45, 1, 3, 0, 1, 9]
    _check(lengths, 5, 1, shared, torch.float32, seed=1, **TUNING)


def test_default_tuning():
    # the defaults chosen from the shapes (no split at this size); D = 16 is a power of 2 (no column mask needed)
    _check(LENGTHS, 16, 3, False, torch.float32, seed=2)


def test_empty_sets():
    # a batch of only empty sets (N = 0) and a batch of no sets: zeros, -inf, finite zero gradients
    offsets = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    x = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    q = torch.randn(3, 2, 4, device=DEVICE, requires_grad=True)
    out, lse = triton_pool.segment_attention_pool(x, offsets, q, SCALE)
    assert out.shape == (3, 2, 4) and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (3, 2) and bool((lse == float("-inf")).all())
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert x.grad.shape == (0, 4)
    assert torch.equal(q.grad, torch.zeros_like(q))

    out, lse = triton_pool.segment_attention_pool(torch.randn(0, 4, device=DEVICE),
                                                  torch.zeros(1, dtype=torch.int64, device=DEVICE),
                                                  torch.randn(1, 2, 4, device=DEVICE), SCALE)
    assert out.shape == (0, 2, 4) and lse.shape == (0, 2)


def test_zero_feature_dim():
    # D = 0: every logit is 0, so lse = log(length) (-inf when empty), as in the reference; nothing is launched
    offsets = _offsets([2, 0, 3])
    x = torch.zeros(5, 0, device=DEVICE, requires_grad=True)
    q = torch.zeros(1, 2, 0, device=DEVICE, requires_grad=True)
    out, lse = triton_pool.segment_attention_pool(x, offsets.to(DEVICE), q, SCALE)
    r_out, r_lse = reference.segment_attention_pool(x.detach().cpu().double(), offsets, q.detach().cpu().double(),
                                                    SCALE)
    assert out.shape == r_out.shape == (3, 2, 0)
    torch.testing.assert_close(lse.cpu().double(), r_lse)
    torch.where(torch.isfinite(lse), lse, 0).sum().backward()
    assert x.grad.shape == (5, 0) and q.grad.shape == (1, 2, 0)


def test_empty_set_gradients_are_zero():
    # per-set queries: an empty set's query gets exactly zero gradient, even with a gradient on its out
    lengths = [0, 3, 0]
    offsets = _offsets(lengths).to(DEVICE)
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    q = torch.randn(3, 1, 4, device=DEVICE, requires_grad=True)
    out, _ = triton_pool.segment_attention_pool(x, offsets, q, SCALE)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0])) and torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))
    assert bool(q.grad[1].abs().sum() > 0)


def test_inputs_are_normalised():
    # int32 offsets and non-contiguous x/query give the same result as their contiguous int64 forms
    lengths = [2, 0, 3]
    offsets = _offsets(lengths)
    x = torch.randn(4, 5, dtype=torch.float32).t()  # [5, 4], non-contiguous
    q = torch.randn(1, 4, 2, dtype=torch.float32).transpose(1, 2)  # [1, 2, 4], non-contiguous
    got = triton_pool.segment_attention_pool(x.to(DEVICE), offsets.to(torch.int32).to(DEVICE), q.to(DEVICE), SCALE)
    ref = reference.segment_attention_pool(x.double(), offsets, q.double(), SCALE)
    torch.testing.assert_close(got[0].cpu().double(), ref[0], rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 3, device=DEVICE)
    offsets = _offsets([1, 3]).to(DEVICE)
    q = torch.randn(1, 1, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x: expected dtype"):
        triton_pool.segment_attention_pool(x.double(), offsets, q, SCALE)
    with pytest.raises(ValueError, match=r"query: expected a tensor \[1 or B, M, D\]"):
        triton_pool.segment_attention_pool(x, offsets, torch.randn(3, 1, 3, device=DEVICE), SCALE)
    with pytest.raises(ValueError, match="query"):
        triton_pool.segment_attention_pool(x, offsets, torch.randn(1, 1, 4, device=DEVICE), SCALE)
    with pytest.raises(TypeError, match="offsets: expected dtype int64"):
        triton_pool.segment_attention_pool(x, offsets.float(), q, SCALE)
    with pytest.raises(ValueError, match="block_n"):
        triton_pool.segment_attention_pool(x, offsets, q, SCALE, block_n=3)


@pytest.mark.skipif(CUDA, reason="checks the CPU error without the interpreter")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_pool, "_INTERPRETED", False)
    assert triton_pool.is_available() is False
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before triton is first imported"):
        triton_pool.segment_attention_pool(torch.randn(2, 3), _offsets([2]), torch.randn(1, 1, 3), SCALE)


def test_kernels_follow_triton():
    # the kernels are of the kind triton's own library is (interpreted without CUDA), whatever the import order
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(tl.zeros, InterpretedFunction)
    assert interpreted or CUDA
    for kernel in (triton_pool._fwd_kernel, triton_pool._bwd_kernel, triton_pool._locate):
        assert isinstance(kernel, InterpretedFunction) == interpreted
