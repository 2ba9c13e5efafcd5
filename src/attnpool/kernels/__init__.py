"""Kernels for the one primitive that every dot-product attention pool reduces to (see :mod:`.reference`).

Backends:

* ``"reference"``: eager torch ops, readable; the ground truth in tests.
* ``"cpu"``: a fused single-pass (online-softmax) C++ kernel for packed input on the CPU.
* ``"triton"``: a fused Triton kernel for packed input on CUDA devices.

Padded input with many queries (self-attention: SAB, ISAB) goes instead to PyTorch's fused
``scaled_dot_product_attention`` (see ``attnpool.functional.pool._use_sdpa``).

Two more primitives have a reference and a CPU kernel only: :func:`segment_softmax_pool`, the same pooling with the
logits given (the packed path of every score that is not a dot product with the rows: gated, additive, a caller's
own; :class:`attnpool.nn.GatedAttentionPool`, :func:`attnpool.functional.softmax_pool`), and
:func:`segment_channel_softmax_pool` (every channel with its own softmax, PyG's ``SoftmaxAggregation``;
:class:`attnpool.nn.ChannelSoftmaxPool`).

The dispatcher picks the fastest available backend for the input's device. One switch overrides it: the
``ATTNPOOL_KERNEL`` environment variable, or :func:`use_kernel` (a context manager) /
:func:`set_kernel`, with one of the names above or ``"auto"``. Inputs wrapped by a ``torch.func`` transform
(``vmap``, ``grad``, ``jacrev``) always take the reference or eager path, whatever the switch says: the fused
kernels are calls on raw pointers that those transforms cannot batch or differentiate.

On the CPU, with glibc's default malloc, a backward over a large packed batch can spend more time faulting in the
fresh zeroed pages of its ``[N, D]`` input gradient than computing it (on a 2-core VM: 16.5k page faults and 48 ms
of system time per 64 MiB gradient, against 8.8 ms for one read and one write of it; ``benchmarks/cpu_allocator.py``
measures it). That is a property of the process's allocator, not of the kernel: an allocator that keeps freed
blocks (jemalloc or tcmalloc through ``LD_PRELOAD``, or glibc's ``mallopt`` thresholds as ``benchmarks/run.py``
sets them) removes it for every op alike.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["available_kernels", "get_kernel", "kernel_choice", "segment_attention_pool",
           "segment_channel_softmax_pool", "segment_softmax_pool", "set_kernel", "use_kernel"]

KernelFn = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
_NAMES = ("reference", "cpu", "triton")
_choice: str = os.environ.get("ATTNPOOL_KERNEL", "auto")
_loaded: dict[str, KernelFn | None] = {}


def _load(name: str) -> KernelFn | None:
    """The backend's function, or None when it cannot run here (no compiler, no triton)."""
    if name not in _loaded:
        module = {"reference": "reference", "cpu": "cpu", "triton": "triton_pool"}[name]
        try:
            mod = importlib.import_module(f"attnpool.kernels.{module}")
        except ImportError:
            _loaded[name] = None
        else:
            ok = getattr(mod, "is_available", lambda: True)()
            _loaded[name] = mod.segment_attention_pool if ok else None
    return _loaded[name]


def available_kernels() -> list[str]:
    """The backends that can run on this machine."""
    return [n for n in _NAMES if _load(n) is not None]


def _check_name(name: str) -> str:
    if name not in (*_NAMES, "auto"):
        raise ValueError(f"kernel: expected one of {(*_NAMES, 'auto')}, got {name!r}")
    return name


def set_kernel(name: str) -> None:
    """Force a backend for every later call (``"auto"`` restores the automatic choice)."""
    global _choice
    _choice = _check_name(name)


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block."""
    global _choice
    previous, _choice = _choice, _check_name(name)
    try:
        yield
    finally:
        _choice = previous


def kernel_choice() -> str:
    """The backend forced by :func:`set_kernel`, :func:`use_kernel` or ``ATTNPOOL_KERNEL``, or ``"auto"``."""
    return _check_name(_choice)


def under_functorch(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) wraps any of ``tensors``. The fused
    kernels are opaque ``autograd.Function`` calls on raw pointers, which those transforms cannot batch or
    differentiate, so such calls take the reference (or eager) path."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def get_kernel(device_type: str, dtype: torch.dtype = torch.float32) -> tuple[str, KernelFn]:
    """The backend that runs for tensors on ``device_type``: the forced one, else the fastest available for it
    (float64 on CUDA goes to the reference: the Triton kernel computes in float32)."""
    choice = _check_name(_choice)
    if choice != "auto":
        fn = _load(choice)
        if fn is None:
            raise RuntimeError(f"kernel {choice!r} was forced (ATTNPOOL_KERNEL or set_kernel) but cannot run here")
        return choice, fn
    preferred = {"cuda": ("triton",) if dtype != torch.float64 else (), "cpu": ("cpu",)}.get(device_type, ())
    for name in (*preferred, "reference"):
        fn = _load(name)
        if fn is not None:
            return name, fn
    raise AssertionError("the reference kernel always loads")


def segment_attention_pool(x: Tensor, offsets: Tensor, query: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dispatch the primitive of :mod:`.reference` to the chosen backend."""
    _, fn = get_kernel(x.device.type, x.dtype)
    if under_functorch(x, query):
        from attnpool.kernels import reference
        return reference.segment_attention_pool(x, offsets, query, scale)
    return fn(x, offsets, query, scale)


def segment_channel_softmax_pool(x: Tensor, offsets: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatch the per-channel primitive of :mod:`.reference` (PyG's ``SoftmaxAggregation``): the CPU kernel for
    CPU tensors, else the reference (there is no Triton kernel for it; a forced ``"triton"`` also runs the
    reference). ``lse`` is differentiable on the reference only."""
    name, _ = get_kernel(x.device.type, x.dtype)
    if name == "cpu" and not under_functorch(x, t):
        from attnpool.kernels import cpu
        return cpu.segment_channel_softmax_pool(x, offsets, t)
    from attnpool.kernels import reference
    return reference.segment_channel_softmax_pool(x, offsets, t)


def segment_softmax_pool(x: Tensor, offsets: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatch the given-logits primitive of :mod:`.reference`: the CPU kernel for CPU tensors, else the reference
    (there is no Triton kernel for it; a forced ``"triton"`` also runs the reference)."""
    name, _ = get_kernel(x.device.type, x.dtype)
    if name == "cpu" and not under_functorch(x, scores):
        from attnpool.kernels import cpu
        return cpu.segment_softmax_pool(x, offsets, scores)
    from attnpool.kernels import reference
    return reference.segment_softmax_pool(x, offsets, scores)
