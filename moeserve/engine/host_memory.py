"""The CPU engine's resident memory under glibc's malloc.

After glibc frees its first large block it serves blocks up to that size (up to 32 MB) from the heap, where a
freed block stays resident while anything allocated after it lives. Loading a GGUF model frees many decode
temporaries of a few MB between allocations that stay, so the heap holds memory it no longer uses until
malloc_trim hands the free pages back. (Fixing the threshold low instead cost batch throughput: every step's
activations then come from fresh mappings.) Nothing happens where the C library is not glibc.

A CPU engine trims after loading, and then after its steps that prefill and every 32nd step
(worker.Worker._after_cpu_step): steps of different shapes (a prefill, a batch, a longer context) leave holes of
their own sizes. The C library's handle is looked up once (find_library spawns `ldconfig -p`, ~1 ms, per call).
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or no C library to load)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library python runs on
    except (OSError, TypeError):  # TypeError: Windows has no handle for the process itself
        return None
    fn = getattr(libc, "malloc_trim", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> None:
    """Give the heap's free pages back to the system (~0.2-0.5 ms with the default model loaded)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
