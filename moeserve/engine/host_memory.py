"""The CPU engine's resident memory under glibc's malloc.

After glibc frees its first large block it serves blocks up to that size (up to 32 MB) from the heap, where a
freed block stays resident while anything allocated after it lives. Loading a GGUF model frees many decode
temporaries of a few MB between allocations that stay, so the heap holds memory it no longer uses until
malloc_trim hands the free pages back. (Fixing the threshold low instead cost batch throughput: every step's
activations then come from fresh mappings.) Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def trim() -> None:
    """Give the heap's free pages back to the system (a CPU engine calls it after loading)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
