"""W4A16 GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W stored as 4-bit codes with one scale and one zero per
group of G inputs (layers/quant/int4's in-memory layout, whatever the checkpoint format was):

  packed  int32 [N, K/8]   nibble j of word c = q[n, 8c + j] (unsigned 0..15)
  scales  fp16/bf16/fp32 [N, K/G]   w = (q - zero) * scale
  zeros   uint8 [N, K/G]   (None: symmetric, zero 8)

  _gemm_kernel   one program per BLOCK_M x BLOCK_N tile; K walked BLOCK_K at a time (BLOCK_K divides G, so a tile
                 has one group): the words are read, unpacked in registers (shift, mask), dequantized with the
                 group's scale/zero to the activation dtype and fed to tl.dot, fp32 accumulation, one rounding at
                 the end.
  _gemv_kernel   the skinny decode form (M <= SKINNY_ROWS): one program per (row, BLOCK_N outputs), no tl.dot
                 (its smallest M is 16): the dequantized tile times the activation row, summed over K in fp32.
                 Decode is memory-bound, and this reads 0.5 byte per weight instead of 2.

A tile's words are loaded as [BLOCK_N, BLOCK_K / 8], each word once, each output's words contiguous, and unpacked
to [BLOCK_N, BLOCK_K] in registers. The first form indexed the word of every code (k // 8) across a
[BLOCK_K, BLOCK_N] tile: eight loads of each word and no contiguity the compiler could see, and on an H200 it ran at
7-29 GB/s (qkv_proj of qwen3-30b-a3b at batch 1: 187 us, against 7.7 us for bf16;
benchmarks/results/kernels/2026-11-28-session22-int4-h200/).

Reference: layers/quant/int4.dequantize + the dense matmul (tests/test_int4_kernel.py, under TRITON_INTERPRET=1
without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin

SKINNY_ROWS = 4


@triton.jit
def unpack_codes(words, K_AXIS: tl.constexpr):
    """A tile of int32 words, 8 codes each along K, loaded once each ([K/8, N] for K_AXIS 0, [N, K/8] for 1), as the
    [K, N] / [N, K] tile of its unsigned codes: code j of word c is input 8c + j. (fused_moe's int4 experts too.)"""
    shifts = tl.arange(0, 8) * 4
    if K_AXIS == 0:
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q, [words.shape[0] * 8, words.shape[1]])
    else:
        q = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        q = tl.reshape(q, [words.shape[0], words.shape[1] * 8])
    return q


@triton.jit
def _codes(w_ptr, n, n_ok, k0, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32 codes (0..15) of W for outputs n and inputs k0 .. k0 + BLOCK_K: the words loaded once
    each, [BLOCK_N, BLOCK_K / 8], contiguous along K, and unpacked in registers."""
    c = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + c[None, :], mask=n_ok[:, None], other=0)
    return unpack_codes(words, 1).to(tl.float32)


@triton.jit
def _scale_zero(s_ptr, z_ptr, n, n_ok, g, stride_sn, HAS_ZEROS: tl.constexpr):
    """Each output's scale and zero for group g, fp32 ([BLOCK_N] each; zero 8 when symmetric)."""
    s = tl.load(s_ptr + n.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.full(s.shape, 8.0, tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + n.to(tl.int64) * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, PDL: tl.constexpr = 0):
    """Per K tile (one group): (x @ codes^T - rowsum(x) * zero) * scale, so the codes (exact in bf16) go to tl.dot
    as they are and the scale and zero are applied per output column once per tile."""
    pdl_begin(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, GROUP of BLOCK_K: no partial tile
        a = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.trans(_codes(w_ptr, n, n_ok, k0, stride_wn, BLOCK_N, BLOCK_K))
        s, z = _scale_zero(s_ptr, z_ptr, n, n_ok, k0 // GROUP, stride_sn, HAS_ZEROS)
        if DOT_F32:
            a = a.to(tl.float32)
            part = tl.dot(a, w, input_precision=INPUT_PRECISION)
        else:
            part = tl.dot(a, w.to(a.dtype), input_precision=INPUT_PRECISION)
        a_sum = tl.sum(a.to(tl.float32), axis=1)
        acc += (part - a_sum[:, None] * z[None, :]) * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, PDL: tl.constexpr = 0):
    """Per K tile (one group): (codes . x - zero * sum(x)) * scale for each output, in fp32."""
    pdl_begin(PDL)
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + row.to(tl.int64) * stride_xm + k0 + kk).to(tl.float32)
        part = tl.sum(_codes(w_ptr, n, n_ok, k0, stride_wn, BLOCK_N, BLOCK_K) * a[None, :], axis=1)
        s, z = _scale_zero(s_ptr, z_ptr, n, n_ok, k0 // GROUP, stride_sn, HAS_ZEROS)
        acc += (part - z * tl.sum(a)) * s
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def block_k(group: int, cap: int = 64) -> int:
    """The K tile: the largest power of two <= cap dividing the group (>= 8, one packed word; 16 for tl.dot)."""
    b = cap
    while b > 8 and group % b:
        b //= 2
    if group % b:
        raise ValueError(f"int4 GEMM: group size {group} is not a multiple of 8")
    return b


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ ((q - zeros) * scales)^T + bias -> [M, N], fp32 accumulation."""
    runtime.check_device("int4 GEMM", x, packed, scales, *([] if zeros is None else [zeros]))
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    if packed.shape[1] * 8 != k or k % group or scales.shape != (n, k // group) or \
            (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"int4 GEMM: x [{m}, {k}], packed {tuple(packed.shape)}, scales {tuple(scales.shape)}, "
                         f"zeros {None if zeros is None else tuple(zeros.shape)} do not fit group {group}")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    b = bias if bias is not None else out
    has_zeros = zeros is not None
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if has_zeros else scales  # a placeholder pointer when symmetric
    if m <= SKINNY_ROWS:
        bn = 64
        _gemv_kernel[(m, triton.cdiv(n, bn))](x, packed, scales, zeros, b, out, n, k, x.stride(0), packed.stride(0),
                                              scales.stride(0), out.stride(0), GROUP=group, BLOCK_N=bn,
                                              BLOCK_K=block_k(group, 128), HAS_BIAS=bias is not None,
                                              HAS_ZEROS=has_zeros, num_warps=4, **pdl.launch(x.device, x.shape[0]))
        return out
    bm, bn, warps, stages = (16, 64, 4, 4) if m <= 16 else (64, 128, 4, 3)
    bk = block_k(group)
    if bk < 16:
        raise ValueError(f"int4 GEMM: group size {group} gives K tiles of {bk} (< 16, tl.dot's smallest)")
    dot_f32, precision = runtime.dot_flags(x.dtype)
    _gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, packed, scales, zeros, b, out, m, n, k, x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, DOT_F32=dot_f32,
        INPUT_PRECISION=precision, HAS_ZEROS=has_zeros, num_warps=warps, num_stages=stages,
        **pdl.launch(x.device, x.shape[0]))
    return out
