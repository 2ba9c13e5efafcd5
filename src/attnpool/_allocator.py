"""glibc's malloc, told to keep freed blocks: for CPU processes that allocate and free the same large tensors over
and over (training steps, benchmark rounds).

With glibc's default settings a block above the dynamic mmap threshold (at most 32 MiB) is returned to the kernel on
free, and the next allocation of it faults in fresh zeroed pages: on the 2-vCPU VMs we measure on, a few µs per
4 KiB page. Raising the mmap and trim thresholds keeps such blocks in the heap for reuse. The setting is per
process and applies to allocations made after the call. ``benchmarks/cpu_allocator.py`` measures the effect on one
forward+backward; ``attnpool repro mil --malloc`` on a training run.
"""

from __future__ import annotations

import ctypes

__all__ = ["MALLOC_REUSE", "malloc_reuse"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# mallopt takes an int: 2 GiB - 1 is the largest trim threshold it can be given. Until 2026-12-06 the thresholds were
# 256 / 512 MiB, which left a 259 MiB gradient (run.py's scaling-N at B = 8192) to be mapped and faulted in per call.
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 1 << 30, (1 << 31) - 1
MALLOC_REUSE = "glibc mallopt: mmap threshold 1 GiB, trim threshold 2 GiB (freed blocks are reused)"


def malloc_reuse() -> str:
    """Make glibc's malloc keep freed blocks for reuse (this process only; call it before the big allocations).
    Returns :data:`MALLOC_REUSE`; raises ``OSError`` where there is no glibc or ``mallopt`` refuses."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError) as e:
        raise OSError(f"glibc's mallopt is not available here: {e}") from e
    if not ok:
        raise OSError("glibc's mallopt refused the thresholds")
    return MALLOC_REUSE
