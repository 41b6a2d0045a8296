"""GPU kernels (Triton) for the CUDA fast path, with plain-torch references in `reference.py`.

Import the kernel modules (`attention`, `fused_moe`) lazily: importing them imports triton, and under
TRITON_INTERPRET=1 (set before the import) they run on CPU tensors for tests.
"""
