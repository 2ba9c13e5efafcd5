"""The SDPA path for padded multi-query attention equals the eager reference (forced by use_kernel)."""

from __future__ import annotations

import pytest
import torch

from attnpool import kernels
from attnpool._sets import as_sets
from attnpool.functional import pool as pool_module
from attnpool.functional.pool import attention_pool_sets
from attnpool.nn import SAB


def _padded(lengths: list[int], dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g, dtype=dtype)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)
    return x.masked_fill(~mask.unsqueeze(-1), float("nan")), mask


def _both_paths(fn):
    with kernels.use_kernel("reference"):
        expected = fn()
    assert kernels.kernel_choice() == "auto"
    return fn(), expected


def test_sdpa_path_is_taken_for_padded_multi_query(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pool_module._pool_with_sdpa
    monkeypatch.setattr(pool_module, "_pool_with_sdpa", lambda *a: calls.append(1) or real(*a))
    x, mask = _padded([5, 3], 8, torch.float64)
    sets = as_sets(x, mask=mask)
    attention_pool_sets(sets, torch.randn(2, 16, 8, dtype=torch.float64), num_heads=2)
    assert calls == [1]
    with kernels.use_kernel("reference"):
        attention_pool_sets(sets, torch.randn(2, 16, 8, dtype=torch.float64), num_heads=2)
    attention_pool_sets(sets, torch.randn(2, 16, 8, dtype=torch.float64), num_heads=2, need_weights=True)
    attention_pool_sets(sets, torch.randn(2, 1, 8, dtype=torch.float64))
    assert calls == [1]


@pytest.mark.parametrize("lengths", [[7, 3, 1, 5], [4, 0, 2], [0, 0]])
@pytest.mark.parametrize("heads", [1, 4])
def test_sdpa_equals_reference_float64_with_gradients(lengths: list[int], heads: int) -> None:
    x, mask = _padded(lengths, 8, torch.float64)
    q0 = torch.randn(len(lengths), 9, 8, dtype=torch.float64)
    keys0 = torch.randn(*x.shape, dtype=torch.float64)

    def run():
        xv = x.clone().requires_grad_(True)
        q = q0.clone().requires_grad_(True)
        keys = keys0.clone().masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_(True)
        out, _ = attention_pool_sets(as_sets(xv, mask=mask), q, keys, xv, num_heads=heads, scale=0.7,
                                     temperature=0.5)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), q.grad, xv.grad, keys.grad

    got, expected = _both_paths(run)
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    empty = torch.tensor(lengths) == 0
    assert (got[0][empty] == 0).all()


def test_sdpa_half_input_computes_in_float32() -> None:
    x, mask = _padded([6, 2], 16, torch.float16)
    x = x * 300  # logits far beyond fp16's range if the product were taken in fp16
    q = torch.randn(2, 12, 16, dtype=torch.float16)
    got, expected = _both_paths(lambda: attention_pool_sets(as_sets(x, mask=mask), q)[0])
    assert got.dtype == expected.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_sab_packed_equals_reference_gradcheck() -> None:
    torch.manual_seed(0)
    sab = SAB(8, 2, layer_norm=True).double()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 4, 4, 9])
    got, expected = _both_paths(lambda: sab(x, offsets=offsets))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: sab(v, offsets=offsets), (x,))
