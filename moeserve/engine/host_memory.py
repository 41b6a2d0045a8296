"""The CPU engine's process settings: glibc's heap, the matmul kernel caches, and MKL's reproducible mode.

After glibc frees its first large block it serves blocks up to that size (up to 32 MB) from the heap, where a
freed block stays resident while anything allocated after it lives. Loading a GGUF model frees many decode
temporaries of a few MB between allocations that stay, so the heap holds memory it no longer uses until
malloc_trim hands the free pages back. (Fixing the threshold low instead cost batch throughput: every step's
activations then come from fresh mappings.) Nothing happens where the C library is not glibc.

A CPU engine trims after loading, and then after its steps that prefill and every 32nd step
(worker.Worker._after_cpu_step): steps of different shapes (a prefill, a batch, a longer context) leave holes of
their own sizes. The C library's handle is looked up once (find_library spawns `ldconfig -p`, ~1 ms, per call).
A CPU engine also caps the kernel caches of torch's bf16 matmuls, which otherwise grow with every new prefill
length (bound_kernel_caches), and asks MKL for results that do not depend on what ran before in the process
(reproducible_mkl). Every engine lets MKL's vector math pick its kernels in one thread before any parallel call
(settle_mkl_vml), so that the rotary tables never come from the wrong kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os

# oneDNN's primitive cache and ideep's (torch's mkldnn matmul) keep a compiled kernel per matmul shape; see
# bound_kernel_caches.
KERNEL_CACHE_CAPACITY = 32
_KERNEL_CACHE_VARS = (("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"), ("LRU_CACHE_CAPACITY",))


def reproducible_mkl() -> None:
    """MKL_CBWR=AUTO,STRICT unless the user set MKL_CBWR: MKL's conditional numerical reproducibility.

    Added when the default model's first-token logprobs seemed to depend on the SDPA shapes run before in the
    process (torch's CPU attention multiplies through MKL's sgemm): after some seeded histories its near-tied
    first token (0.11 nats) flipped, and in strict mode six histories did not. The flips were later traced to a
    race in MKL's vector math instead (settle_mkl_vml): without the strict mode a seed that flipped once gave the
    right answer on its next runs, and with VML settled six seeds gave the same logprobs bit for bit without it
    (benchmarks/cpu/NOTES.md). Kept because it costs nothing measurable: at two threads, batch 16 with AUTO instead
    was +1.3 % (median of 4) before the K/V row gather and -2-3 % after it (two sessions of alternated runs), and
    reproducibility held without it (10 of 10 suite runs). Set after MKL's first call in the process it still took
    effect."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def settle_mkl_vml() -> None:
    """Make MKL's vector math (VML) choose its kernels now, in this thread alone: a one-element cos.

    torch computes cos, sin, exp and others of float tensors with MKL's VML (vmsCos with VML_HA, high accuracy),
    over its OpenMP threads. VML picks a kernel from a table indexed by the CPU type it detects on its first call
    and keeps in a static variable (mkl_vml_serv_cpu_detect). The detecting thread first stores the raw CPU code (9
    on the AVX-512 Xeon this was found on) and only then the mapped one (5). A thread that reads the static between
    the two stores takes index 9 + 6 = 15 of the kernel table for HA: `sCos_L9EPnnn`, the AVX2 kernel of the
    *enhanced performance* mode (~12 correct bits), for its whole share of the call. The default model's rotary
    cos table (8192 x 32) was its process's first VML call, made by both threads at once: when the race was lost,
    the main thread's half of the table was off by up to 1.7e-4, which moved the whole prefill and flipped a
    near-tied first token (benchmarks/cpu/NOTES.md). Detected once, the type stays: one call in one thread (one
    element is below torch's grain, so it runs here) closes the window for the rest of the process. It costs
    microseconds; without MKL it is just a cos."""
    import torch

    torch.zeros(1).cos()


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


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap the kernel caches of torch's CPU bf16 matmuls at `capacity` entries each, unless the user set them.

    oneDNN's primitive cache and ideep's LRU cache keep a compiled kernel for every (rows, N, K) a matmul has seen,
    up to 1024 each by default, ~0.3 MB an entry: the bf16 copies of a CPU model meet a new row count with every
    prompt length a prefill step has, so a server's RSS grew ~2.4 MB per new prompt length with the default model
    (+470 MB over 200 lengths, still linear). A new shape compiles (~0.6 ms a linear) whatever the capacity; a decode
    step's few shapes stay among the most recent (the bench's runs compile the same 17 kernels at a capacity of 8 as
    at 1024). Both variables are read at the process's first mkldnn matmul: a CPU engine calls this before loading
    its model; later, it changes nothing.
    """
    for names in _KERNEL_CACHE_VARS:
        if not any(n in os.environ for n in names):
            os.environ[names[0]] = str(capacity)
