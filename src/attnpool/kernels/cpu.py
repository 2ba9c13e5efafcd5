"""The fused CPU kernel: :func:`segment_attention_pool` in one pass over the packed input, forward and backward.

Same contract as :mod:`attnpool.kernels.reference` (read it first)::

    out[b, m] = sum_{i in set b} softmax_i(scale * x_i . query[g(b), m]) * x_i      (0 for an empty set)
    lse[b, m] = log sum_{i in set b} exp(scale * x_i . query[g(b), m])              (-inf for an empty set)

**Forward.** One pass over ``x`` with an online softmax: for every (set, query) a running max, a running sum and a
running weighted sum of the rows, updated a block of 16 rows at a time (one max and at most one rescale per block).
Nothing of size ``N x D`` or ``N x M`` is allocated: the outputs ``out [B, M, D]`` and ``lse [B, M]`` and a few KB of
scratch per thread are all.

**Backward.** With ``g = dL/dout``, ``h = dL/dlse`` (0 when unused), the saved ``out`` and ``lse``, and per row
``a_i = exp(scale x_i.q - lse)``, ``ds_i = a_i (g.x_i - g.out + h)``::

    dx_i = sum_m a_im g_m + scale ds_im q_m          dq_m = scale sum_i ds_im x_i

in one more pass over ``x`` (two dot products per row and query, then ``dx_i`` written once); the only ``N x D``
tensor is ``dx`` itself. The gradient with respect to ``lse`` is supported. Double backward is not.

**Given logits.** :func:`segment_softmax_pool` runs the same loops with the logits read from ``scores [N, M]``
instead of computed as ``scale x_i . q``: the forward's only pass over ``x`` is then the accumulation, which
prefetches the next block of rows as it goes; the backward computes ``g.x_i`` per row and query and writes ``dx_i =
sum_m a_im g_m`` and ``ds_im``.

**Work split.** The rows are cut into pieces of about equal size (at least 1024 rows, at most 256 pieces) that the
threads take dynamically; a set lying in one piece is finished there, and a set cut by piece boundaries (a long set)
leaves one partial state per piece that a short serial pass merges. A skewed batch (one set of 1M rows beside 10k
tiny sets) therefore costs what its rows cost. The pieces depend only on ``N``, ``M`` and ``D``, so results are
bitwise reproducible whatever the thread count.

**Numerics.** float32 and float64 compute in their own precision; float16 and bfloat16 are widened to float32 a block
at a time, accumulate in float32, and ``out`` comes back in the input dtype (``lse`` in float32, as the reference).
Empty sets give ``out = 0``, ``lse = -inf`` and zero gradients.

**Build.** The kernel is plain C++ with a C ABI (``csrc/segment_attention_pool.cpp``), compiled on first use with the
system C++ compiler (``$CXX``, else ``c++``) in a few seconds and loaded with :mod:`ctypes`; it includes no PyTorch
header, needs neither ``ninja`` nor pybind11, and does not depend on PyTorch's C++ ABI. Its hot loops are compiled for
baseline x86-64 and for AVX2+FMA+F16C and picked at run time, so a cached build is safe to share across machines.
Threads come from OpenMP, sharing PyTorch's pool (``torch.set_num_threads`` applies). The library is cached in
``$ATTNPOOL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/attnpool/kernels`` (``~/.cache/attnpool/kernels``), under a name
that hashes the sources, the flags and the compiler's version; concurrent processes (pytest-xdist workers) serialize
the build on a file lock and publish it with an atomic rename. :func:`is_available` says whether the build works, so
a dispatcher can fall back to the reference; calling the kernel when it does not raises ``RuntimeError`` with the
compiler's message.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builds then rely on the atomic rename alone
    fcntl = None  # type: ignore[assignment]

import torch
from torch import Tensor

__all__ = ["build", "is_available", "segment_attention_pool", "segment_channel_softmax_pool", "segment_softmax_pool",
           "unavailable_reason"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("segment_attention_pool.cpp", "segment_attention_pool_impl.h", "channel_softmax_pool_impl.h")
_CFLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno")
_LDFLAGS = ("-shared", "-fopenmp")
_ABI_VERSION = 3
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> Path:
    """``$ATTNPOOL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/attnpool/kernels`` (``~/.cache/...``), else, when that
    cannot be written (a read-only home), a per-user directory under the system's temporary directory."""
    env = os.environ.get("ATTNPOOL_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "attnpool" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"attnpool-kernels-{uid}"


def _compiler() -> list[str]:
    """The compiler command: ``$CXX`` (which may carry a launcher, ``ccache g++``), else ``c++``, else ``g++``."""
    env = os.environ.get("CXX")
    cxx = shlex.split(env) if env else ["c++" if shutil.which("c++") else "g++"]
    if not cxx or not shutil.which(cxx[0]):
        raise RuntimeError(f"no C++ compiler found (looked for $CXX, c++ and g++; CXX={env!r})")
    return cxx


def _run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _compile(cxx: list[str], out: Path) -> None:
    """Compile the two halves (baseline, AVX2) in parallel, link them, and publish the library atomically."""
    source = str(_CSRC / _SOURCES[0])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{out.stem}.build.") as tmp:
        objects = [os.path.join(tmp, f"part{i}.o") for i in (0, 1)]
        steps = [[*cxx, *_CFLAGS, f"-DAP_PART={i}", "-c", source, "-o", obj] for i, obj in enumerate(objects)]
        library = os.path.join(tmp, out.name)
        procs = [_run(cmd) for cmd in steps]
        logs = [p.communicate()[0] for p in procs]
        if all(p.returncode == 0 for p in procs):
            steps.append([*cxx, *_LDFLAGS, *objects, "-o", library])
            link = _run(steps[-1])
            logs.append(link.communicate()[0])
            procs.append(link)
        for cmd, proc, log in zip(steps, procs, logs):
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the attnpool CPU kernel failed (exit code {proc.returncode}):\n"
                                   f"$ {' '.join(cmd)}\n{log[-4000:]}")
        os.replace(library, out)  # atomic: another process sees either no library or the whole one


def _library_path(cxx: list[str]) -> Path:
    """Where the library for these sources, flags, compiler and platform lives (the name hashes all of them)."""
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_CSRC / name).read_bytes())
    h.update(" ".join((*cxx, *_CFLAGS, *_LDFLAGS, str(_ABI_VERSION), sys.platform, platform.machine())).encode())
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    return _cache_dir() / f"segment_attention_pool_{h.hexdigest()[:16]}.so"


def _build_and_load() -> ctypes.CDLL:
    cxx = _compiler()
    path = _library_path(cxx)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock_file:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # one builder; the others wait, then find the library
            try:
                if not path.exists():
                    _compile(cxx, path)
            finally:
                if fcntl is not None:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
    lib = ctypes.CDLL(str(path))
    if lib.ap_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has ABI version {lib.ap_abi_version()}, expected {_ABI_VERSION}")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.ap_forward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, i64, i64, ctypes.c_double, vp, vp,
                               ctypes.c_int]
    lib.ap_forward.restype = ctypes.c_int
    lib.ap_backward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, i64, i64, ctypes.c_double, vp, vp, vp,
                                vp, vp, vp, ctypes.c_int]
    lib.ap_backward.restype = ctypes.c_int
    lib.ap_channel_forward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, vp, vp, ctypes.c_int]
    lib.ap_channel_forward.restype = ctypes.c_int
    lib.ap_channel_backward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, vp, vp, vp, vp, vp,
                                        ctypes.c_int]
    lib.ap_channel_backward.restype = ctypes.c_int
    lib.ap_scores_forward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, i64, vp, vp, ctypes.c_int]
    lib.ap_scores_forward.restype = ctypes.c_int
    lib.ap_scores_backward.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp, i64, vp, i64, vp, vp, vp, vp, vp, vp,
                                       ctypes.c_int]
    lib.ap_scores_backward.restype = ctypes.c_int
    lib.ap_force_isa.argtypes = [ctypes.c_int]
    lib.ap_force_isa.restype = None
    return lib


def _unavailable(reason: str) -> RuntimeError:
    return RuntimeError(f"the attnpool CPU kernel is unavailable: {reason}. Set $CXX to a working C++17 compiler "
                        "with OpenMP, or $ATTNPOOL_KERNEL_CACHE to a writable directory; "
                        "attnpool.kernels.reference.segment_attention_pool computes the same thing.")


def build() -> ctypes.CDLL:
    """Compile (first use only; cached across processes) and load the kernel library.

    Raises ``RuntimeError`` with the reason when it cannot be built; the failure is remembered for this process.
    """
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise _unavailable(_error)
        try:
            _lib = _build_and_load()
        except Exception as e:  # any failure (no compiler, no OpenMP, read-only cache) means: use the reference
            _error = f"{type(e).__name__}: {e}"
            raise _unavailable(_error) from e
        return _lib


def is_available() -> bool:
    """Whether the kernel builds and loads here (compiles it on the first call, a few seconds)."""
    try:
        build()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (``None`` when it is True or has not been asked yet)."""
    return _error


_ISAS = ("baseline", "avx2")


def _isa() -> str:
    """The instruction set the kernel's hot loops run with here: ``"avx2"`` or ``"baseline"``."""
    return _ISAS[build().ap_isa()]


def _force_isa(name: str | None) -> None:
    """Run the loops compiled for ``name`` (if this CPU has it), or the best again with None. For tests."""
    build().ap_force_isa(-1 if name is None else _ISAS.index(name))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(x: Tensor, offsets: Tensor, query: Tensor, scale: float) -> tuple[Tensor, Tensor, float]:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a tensor [N, D], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets: expected a tensor [B+1], got {getattr(offsets, 'shape', type(offsets).__name__)}")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"offsets: expected an integer tensor, got {offsets.dtype}")
    b = offsets.shape[0] - 1
    if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[0] not in (1, b) \
            or query.shape[2] != x.shape[1]:
        raise ValueError(f"query: expected a tensor [1 or B, M, D] with B = {b}, D = {x.shape[1]}, "
                         f"got {getattr(query, 'shape', type(query).__name__)}")
    if not query.is_floating_point():
        raise TypeError(f"query: expected a floating-point tensor, got {query.dtype}")
    for name, t in (("x", x), ("offsets", offsets), ("query", query)):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CPU kernel takes CPU tensors, got device {t.device}")
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or scale.requires_grad:
            raise TypeError("scale: expected a Python float (no gradient flows to it), got a tensor")
        scale = scale.item()
    return offsets.to(torch.int64).contiguous(), query, float(scale)


def _rows(x: Tensor) -> Tensor:
    """``x`` with unit stride along D (rows may be strided), as the kernel reads it."""
    if x.stride(1) == 1 and x.stride(0) >= x.shape[1]:
        return x
    return x.contiguous()


def _raise(status: int, offsets: Tensor, n: int) -> None:
    if status == 1:
        raise ValueError(f"offsets: expected non-decreasing values from 0 to N = {n}, got "
                         f"{offsets.tolist() if offsets.numel() <= 20 else offsets}")
    if status == 2:
        raise MemoryError("attnpool CPU kernel: could not allocate its scratch memory")
    raise RuntimeError(f"attnpool CPU kernel failed with status {status}")


def _attention_forward(x: Tensor, offsets: Tensor, query: Tensor, scale: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward through the C entry point: ``(rows of x as read, query in the compute dtype, out, lse)``, ``out``
    in the compute dtype."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    xr = _rows(x)
    n, d = xr.shape
    b = offsets.shape[0] - 1
    g, m = query.shape[0], query.shape[1]
    q = query.detach()
    if q.dtype != cdt or not q.is_contiguous():
        q = q.to(cdt).contiguous()
    out = torch.empty(b, m, d, dtype=cdt)
    lse = torch.empty(b, m, dtype=cdt)
    status = build().ap_forward(_DTYPE_CODES[x.dtype], _ptr(xr), xr.stride(0) if n else d, n, d, _ptr(offsets), b,
                                _ptr(q), g, m, scale, _ptr(out), _ptr(lse), torch.get_num_threads())
    if status:
        _raise(status, offsets, n)
    return xr, q, out, lse


class _SegmentAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor, query: Tensor, scale: float):
        xr, q, out, lse = _attention_forward(x, offsets, query, scale)
        ctx.save_for_backward(xr, offsets, q, out, lse)
        ctx.scale = scale
        ctx.query_dtype = query.dtype
        ctx.set_materialize_grads(False)
        return (out if out.dtype == x.dtype else out.to(x.dtype)), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        need_x, _, need_q, _ = ctx.needs_input_grad
        if (grad_out is None and grad_lse is None) or not (need_x or need_q):
            return None, None, None, None
        xr, offsets, q, out, lse = ctx.saved_tensors
        cdt = q.dtype
        n, d = xr.shape
        b = offsets.shape[0] - 1
        g, m = q.shape[0], q.shape[1]
        gout = torch.zeros_like(out) if grad_out is None else grad_out.to(cdt).contiguous()
        glse = None if grad_lse is None else grad_lse.to(cdt).contiguous()
        dx = torch.empty(n, d, dtype=xr.dtype) if need_x else None
        dq = torch.zeros(g, m, d, dtype=cdt) if need_q else None
        status = build().ap_backward(_DTYPE_CODES[xr.dtype], _ptr(xr), xr.stride(0) if n else d, n, d, _ptr(offsets),
                                     b, _ptr(q), g, m, ctx.scale, _ptr(out), _ptr(lse), _ptr(gout), _ptr(glse),
                                     _ptr(dx), _ptr(dq), torch.get_num_threads())
        if status:
            _raise(status, offsets, n)
        return dx, None, None if dq is None else dq.to(ctx.query_dtype), None


def segment_attention_pool(x: Tensor, offsets: Tensor, query: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Fused CPU :func:`attnpool.kernels.reference.segment_attention_pool`: same arguments, results and gradients.

    Args:
        x: ``[N, D]`` packed rows, float32, float64, float16 or bfloat16 (rows may be strided; D must be unit-stride
            or the rows are copied once).
        offsets: ``[B+1]`` integer, non-decreasing from 0 to N; set ``b`` is ``x[offsets[b]:offsets[b+1]]``.
        query: ``[1 or B, M, D]``: one query set shared by every set, or one per set. Cast to the compute dtype.
        scale: Python float multiplying every logit (no gradient).

    Returns:
        ``out [B, M, D]`` in ``x.dtype`` and ``lse [B, M]`` (float64 for float64 input, else float32), both
        differentiable with respect to ``x`` and ``query``.

    Raises:
        RuntimeError: when the kernel cannot be built here (see :func:`is_available`).
    """
    offsets, query, scale = _check(x, offsets, query, scale)
    if (torch.is_grad_enabled() and (x.requires_grad or query.requires_grad)) \
            or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return _SegmentAttentionPool.apply(x, offsets, query, scale)
    # Nothing to differentiate: the C call without autograd.Function's bookkeeping (a few us here, and several
    # times that right after a large input has gone through the caches: benchmarks/call_overhead.py).
    _, _, out, lse = _attention_forward(x, offsets, query, scale)
    return (out if out.dtype == x.dtype else out.to(x.dtype)), lse


class _SegmentChannelSoftmaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor, t: Tensor):
        lib = build()
        cdt = torch.promote_types(x.dtype, torch.float32)
        xr = _rows(x)
        n, d = xr.shape
        b = offsets.shape[0] - 1
        tc = t.detach().to(cdt).expand(d).contiguous()
        out = torch.empty(b, d, dtype=cdt)
        lse = torch.empty(b, d, dtype=cdt)
        status = lib.ap_channel_forward(_DTYPE_CODES[x.dtype], _ptr(xr), xr.stride(0) if n else d, n, d,
                                        _ptr(offsets), b, _ptr(tc), _ptr(out), _ptr(lse), torch.get_num_threads())
        if status:
            _raise(status, offsets, n)
        ctx.save_for_backward(xr, offsets, tc, out, lse)
        ctx.t_shape, ctx.t_dtype = t.shape, t.dtype
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out.to(x.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, _grad_lse: Tensor | None):
        need_x, _, need_t = ctx.needs_input_grad
        if grad_out is None or not (need_x or need_t):
            return None, None, None
        xr, offsets, tc, out, lse = ctx.saved_tensors
        n, d = xr.shape
        b = offsets.shape[0] - 1
        g = grad_out.to(tc.dtype).contiguous()
        dx = torch.empty(n, d, dtype=xr.dtype) if need_x else None
        dt = torch.zeros(d, dtype=tc.dtype) if need_t else None
        status = build().ap_channel_backward(_DTYPE_CODES[xr.dtype], _ptr(xr), xr.stride(0) if n else d, n, d,
                                             _ptr(offsets), b, _ptr(tc), _ptr(out), _ptr(lse), _ptr(g), _ptr(dx),
                                             _ptr(dt), torch.get_num_threads())
        if status:
            _raise(status, offsets, n)
        if dt is not None:
            dt = dt.sum_to_size(ctx.t_shape).to(ctx.t_dtype)  # a scalar t gets the sum over the channels
        return dx, None, dt


def segment_channel_softmax_pool(x: Tensor, offsets: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Fused CPU :func:`attnpool.kernels.reference.segment_channel_softmax_pool`: same arguments, results and
    gradients (with respect to ``x`` and ``t``; ``lse`` is not differentiable here).

    Args:
        x: ``[N, D]`` packed rows, float32, float64, float16 or bfloat16.
        offsets: ``[B+1]`` integer, non-decreasing from 0 to N.
        t: ``[]``, ``[1]`` or ``[D]`` floating-point: the inverse temperature, shared or one per channel.

    Returns:
        ``out [B, D]`` in ``x.dtype`` and ``lse [B, D]`` (float64 for float64 input, else float32).
    """
    offsets, _, _ = _check(x, offsets, x.new_zeros(1, 1, x.shape[1] if x.dim() == 2 else 0), 1.0)
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() not in (1, x.shape[1]) or t.dim() > 1:
        raise ValueError(f"t: expected a floating-point tensor [], [1] or [D] = [{x.shape[1]}], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if t.device.type != "cpu":
        raise ValueError(f"t: the CPU kernel takes CPU tensors, got device {t.device}")
    return _SegmentChannelSoftmaxPool.apply(x, offsets, t)


class _SegmentSoftmaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor, scores: Tensor):
        lib = build()
        cdt = torch.promote_types(x.dtype, torch.float32)
        xr = _rows(x)
        n, d = xr.shape
        b, m = offsets.shape[0] - 1, scores.shape[1]
        s = scores.detach().to(cdt).contiguous()
        out = torch.empty(b, m, d, dtype=cdt)
        lse = torch.empty(b, m, dtype=cdt)
        status = lib.ap_scores_forward(_DTYPE_CODES[x.dtype], _ptr(xr), xr.stride(0) if n else d, n, d,
                                       _ptr(offsets), b, _ptr(s), m, _ptr(out), _ptr(lse), torch.get_num_threads())
        if status:
            _raise(status, offsets, n)
        ctx.save_for_backward(xr, offsets, s, out, lse)
        ctx.scores_dtype = scores.dtype
        ctx.set_materialize_grads(False)
        return out.to(x.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        need_x, _, need_s = ctx.needs_input_grad
        if (grad_out is None and grad_lse is None) or not (need_x or need_s):
            return None, None, None
        xr, offsets, s, out, lse = ctx.saved_tensors
        cdt = s.dtype
        n, d = xr.shape
        b, m = offsets.shape[0] - 1, s.shape[1]
        gout = torch.zeros_like(out) if grad_out is None else grad_out.to(cdt).contiguous()
        glse = None if grad_lse is None else grad_lse.to(cdt).contiguous()
        dx = torch.empty(n, d, dtype=xr.dtype) if need_x else None
        ds = torch.empty(n, m, dtype=cdt) if need_s else None
        status = build().ap_scores_backward(_DTYPE_CODES[xr.dtype], _ptr(xr), xr.stride(0) if n else d, n, d,
                                            _ptr(offsets), b, _ptr(s), m, _ptr(out), _ptr(lse), _ptr(gout),
                                            _ptr(glse), _ptr(dx), _ptr(ds), torch.get_num_threads())
        if status:
            _raise(status, offsets, n)
        return dx, None, None if ds is None else ds.to(ctx.scores_dtype)


def segment_softmax_pool(x: Tensor, offsets: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Fused CPU :func:`attnpool.kernels.reference.segment_softmax_pool`: same arguments, results and gradients.

    Args:
        x: ``[N, D]`` packed rows, float32, float64, float16 or bfloat16 (rows may be strided).
        offsets: ``[B+1]`` integer, non-decreasing from 0 to N.
        scores: ``[N, M]`` floating-point logits, one column per softmax (cast to the compute dtype).

    Returns:
        ``out [B, M, D]`` in ``x.dtype`` and ``lse [B, M]`` (float64 for float64 input, else float32), both
        differentiable with respect to ``x`` and ``scores``.
    """
    offsets, _, _ = _check(x, offsets, x.new_zeros(1, 1, x.shape[1] if x.dim() == 2 else 0), 1.0)
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != x.shape[0]:
        raise ValueError(f"scores: expected a tensor [N, M] with N = {x.shape[0]}, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    if scores.device.type != "cpu":
        raise ValueError(f"scores: the CPU kernel takes CPU tensors, got device {scores.device}")
    return _SegmentSoftmaxPool.apply(x, offsets, scores)
