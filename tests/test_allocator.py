"""keep_freed_memory: large tensors come from the heap (and stay there) instead of fresh mmaps."""

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [  # glibc >= 2.33, malloc.h: struct mallinfo2, all size_t
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _mmapped_bytes() -> int:
    """Bytes glibc currently serves through mmap (``mallinfo2().hblkhd``)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().hblkhd)


_PROBE = """
import torch
from saelab.allocator import keep_freed_memory
from tests.test_allocator import _mmapped_bytes
n_bytes = 64 * 2**20
before = _mmapped_bytes()
mapped = torch.empty(n_bytes // 4)  # glibc's defaults: above the mmap threshold, an mmap
print(_mmapped_bytes() - before)
del mapped  # munmap: nothing of it stays in the heap
assert keep_freed_memory()
before = _mmapped_bytes()
kept = torch.empty(n_bytes // 4)
print(_mmapped_bytes() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_large_tensors_leave_mmap_once_enabled():
    """In a fresh process (glibc's defaults, an empty heap), a 64 MiB tensor is an mmap; after
    keep_freed_memory() it comes from the heap (where it stays when freed)."""
    root = Path(__file__).resolve().parent.parent
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=root, check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])},
    )  # fmt: skip
    mapped_default, mapped_kept = (int(line) for line in probe.stdout.split())
    assert mapped_default >= 64 * 2**20
    assert mapped_kept < 64 * 2**20  # not an mmap


@pytest.mark.skipif(GLIBC, reason="the no-op path, where the C library is not glibc")
def test_other_c_libraries_are_left_alone():
    assert keep_freed_memory() is False
