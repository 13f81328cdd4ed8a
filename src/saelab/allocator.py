"""Host memory allocator setting for the pipeline's processes: keep freed memory for reuse.

A training step allocates the same large tensors every step: the ``[batch, d_sae]``
pre-activations (268 MB at batch 4,096 and 16,384 latents), ``[d_sae, d_in]`` gradients and
optimizer temporaries (50 MB). glibc's ``malloc`` serves every allocation above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` when it is freed, so each
step page-faults, and the kernel zeroes, every page of those tensors again: ~70 ms for the
pre-activations alone, a tenth of the step's encoder GEMM on this CPU (``bench/allocator.py``).
Serving them from the heap and never trimming it makes the next step reuse the same pages. This is
what a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator) does; glibc can do it
through ``mallopt``, with no extra dependency.

Cost: the process keeps its resident memory until it exits instead of returning freed memory to
the kernel, and the heap fragments, so the peak grows too: +25-32% for the training data path,
+4% for caching (``bench/memory.py --malloc kept|default``). The ``saelab`` CLI's ``--malloc
default`` (``SAELAB_MALLOC=default``) leaves glibc's defaults. Numerics are untouched. CUDA
tensors are not affected (they have their own caching allocator).
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # bytes
_DEFAULT_MMAP_MAX = 65536  # mappings
_NEVER_TRIM = 2**31 - 1  # bytes; mallopt takes an int


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc's ``malloc`` serve large allocations from the heap and keep freed memory
    (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB - 1 byte), so a loop that allocates the same
    large tensors reuses their pages instead of faulting them in again (module docstring).
    ``enable=False`` restores glibc's defaults (``M_MMAP_MAX = 65536``, ``M_TRIM_THRESHOLD`` =
    128 KiB; glibc's dynamic mmap threshold stays off once either was set).

    Process-wide; call it once at a process entry point (the ``saelab`` CLI does), not from
    library code. Returns whether the setting was applied: False (and nothing changes) where the C
    library is not glibc (macOS, musl, Windows).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    mmap_max, trim = (0, _NEVER_TRIM) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    applied = bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
    )
    logger.debug("glibc malloc: keep freed memory %s (applied: %s)", enable, applied)
    return applied
