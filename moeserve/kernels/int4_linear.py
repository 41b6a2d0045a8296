"""W4A16 GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W stored as 4-bit codes with one scale and one zero per
group of G inputs (layers/quant/int4's in-memory layout, whatever the checkpoint format was):

  packed  int32 [N, K/8]   nibble j of word c = q[n, 8c + j] (unsigned 0..15)
  scales  fp16/bf16/fp32 [N, K/G]   w = (q - zero) * scale
  zeros   uint8 [N, K/G]   (None: symmetric, zero 8)

  _gemm_kernel   one program per BLOCK_M x BLOCK_N tile; K walked BLOCK_K at a time (BLOCK_K divides G, so a tile
                 has one group): the words are read, unpacked in registers (shift, mask), dequantized with the
                 group's scale/zero to the activation dtype and fed to tl.dot, fp32 accumulation, one rounding at
                 the end.
  _gemv_kernel   the skinny decode form (M <= SKINNY_ROWS): one program per BLOCK_N outputs (and 1/SPLIT_K of K,
                 the partials added in the same launch as linear's split-K), all rows in it, no tl.dot (its
                 smallest M is 16): per K tile, codes . x summed where each thread holds them, then the group's
                 zero and scale per output.
                 Decode is memory-bound, and this reads 0.5 byte per weight instead of 2.
  The autotuner picks the launch shape per (rows bucket, N, K, group), timed on streamed copies of the weight.

A tile's words are loaded as [BLOCK_N, BLOCK_K / 8], each word once, each output's words contiguous, and unpacked
to [BLOCK_N, BLOCK_K] in registers. The first form indexed the word of every code (k // 8) across a
[BLOCK_K, BLOCK_N] tile: eight loads of each word and no contiguity the compiler could see, and on an H200 it ran at
7-29 GB/s (qkv_proj of qwen3-30b-a3b at batch 1: 187 us, against 7.7 us for bf16;
benchmarks/results/kernels/2026-11-28-session22-int4-h200/). With the words loaded once (session 23, same card):
40.5 us, 3 % of the bandwidth: one program per row and 64 outputs, a tl.sum across threads every K step, 80
programs at N = 5120, and M rows reading the weight M times. Hence slabs of all rows, split K, and tuning.

Reference: layers/quant/int4.dequantize + the dense matmul (tests/test_int4_kernel.py, under TRITON_INTERPRET=1
without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.autotune import Config, StreamedRun, bucket, get_tuner
from moeserve.kernels.linear import _split_reduce, split_counters
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
def codes_f32(q, less):
    """Unpacked codes q (int32, 0..15) less `less` (the zeros, 8 when symmetric, 0 for the bare codes) in fp32, with
    no int-to-float conversion: under the exponent bits of 2^23 (0x4B000000) a code reads as the float 2^23 + q, and
    one subtraction of 2^23 + less leaves q - less exactly (integers below 2^24). I2F issues at a quarter of the fp32
    rate on sm_90, and fused_moe's int4 gate/up had 133 of them a thread a K step, one a code (session 24; the int4
    kernels sped up 0-13 %)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (less + 8388608.0)


@triton.jit
def codes_minus(words, less, K_AXIS: tl.constexpr):
    """codes_f32(unpack_codes(words, K_AXIS), less): a tile of words as its codes less their zeros, fp32."""
    return codes_f32(unpack_codes(words, K_AXIS), less)


@triton.jit
def _codes(w_ptr, n, n_ok, k0, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32 codes (0..15) of W for outputs n and inputs k0 .. k0 + BLOCK_K: the words loaded once
    each, [BLOCK_N, BLOCK_K / 8], contiguous along K, and unpacked in registers."""
    c = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + c[None, :], mask=n_ok[:, None], other=0)
    return codes_minus(words, 0.0, 1)


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
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn,
                 stride_sn, stride_om, GROUP: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, PDL: tl.constexpr = 0):
    """All M (<= M_P) rows against one BLOCK_N-output slab of W (1/SPLIT_K of its K), so each word is read once
    whatever the rows. A K tile is NG = BLOCK_K / GS sub-blocks; GS divides GROUP, so a sub-block has one scale and
    zero, and K (whole groups) ends on a sub-block. Per sub-block: (codes . x - zero * sum(x)) * scale, the codes
    summed where each thread holds them (a sub-block row is a few threads' consecutive words) before the scale and
    zero, which are then one load per (output, sub-block) a thread holds, not one per code. Deep tiles (NG > 1)
    put more of the weight in flight per thread; the accumulator stays [M_P, BLOCK_N]."""
    pdl_begin(PDL)
    NG: tl.constexpr = BLOCK_K // GS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, M_P)
    m_ok = m < M
    g = tl.arange(0, NG)
    j = tl.arange(0, GS)
    c = tl.arange(0, GS // 8)
    shifts = tl.arange(0, 8) * 4
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # each split's K range, whole tiles
    acc = tl.zeros([M_P, BLOCK_N], tl.float32)
    for k0 in range(pid_k * k_span, tl.minimum(K, (pid_k + 1) * k_span), BLOCK_K):
        kg = k0 + g * GS  # each sub-block's first input
        g_ok = kg < K
        words = tl.load(w_ptr + n[:, None, None].to(tl.int64) * stride_wn + (kg // 8)[None, :, None] + c[None, None, :],
                        mask=n_ok[:, None, None] & g_ok[None, :, None], other=0, eviction_policy="evict_first")
        q = codes_f32(tl.reshape((words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF, [BLOCK_N, NG, GS]), 0.0)
        a = tl.load(x_ptr + m[:, None, None] * stride_xm + kg[None, :, None] + j[None, None, :],
                    mask=m_ok[:, None, None] & g_ok[None, :, None], other=0.0).to(tl.float32)
        part = tl.sum(a[:, None, :, :] * q[None, :, :, :], axis=3)  # [M_P, BLOCK_N, NG]
        sz_off = n[:, None].to(tl.int64) * stride_sn + (kg // GROUP)[None, :]
        sz_ok = n_ok[:, None] & g_ok[None, :]
        sc = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + sz_off, mask=sz_ok, other=0).to(tl.float32)
        else:
            zero = tl.full(sc.shape, 8.0, tl.float32)
        a_sum = tl.sum(a, axis=2)  # [M_P, NG]
        acc += tl.sum((part - a_sum[:, None, :] * zero[None, :, :]) * sc[None, :, :], axis=2)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        _split_reduce(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, pid_n, pid_k, m, n, m_ok, n_ok, M, N, stride_om,
                      SPLIT_K, HAS_BIAS)


def block_k(group: int, cap: int = 64) -> int:
    """The largest power of two <= cap (a power of two) dividing the group (>= 8, one packed word; 16 for tl.dot):
    the tl.dot K tile, or the sub-block of a GEMV K tile of cap inputs (one scale and zero)."""
    b = cap
    while b > 8 and group % b:
        b //= 2
    if group % b:
        raise ValueError(f"int4 GEMM: group size {group} is not a multiple of 8")
    return b


def _v(bn, bk, split, w=4, s=3) -> Config:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "W": w, "S": s}


def _t(bm, bn, bk, w, s) -> Config:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "W": w, "S": s}


def int4_candidates(rows: int, n: int, group: int) -> list[Config]:
    """Configs for this many rows (a bucket); the first is the heuristic default. Up to SKINNY_ROWS rows, GEMV slabs.
    A weight stream wants tens of KB in flight per SM: small slabs and split K for narrow N give programs, deep K
    tiles (several groups) give each thread several 16-byte word loads a step. Above, tl.dot tiles with K tiles of
    up to one group."""
    if rows <= SKINNY_ROWS:
        deep = 1024 // runtime.next_pow2(rows)  # 16-32 words a thread a step at 4 warps
        bk = 128 if rows == 1 else 64
        cands = [_v(64, bk, 1, 4), _v(32, bk, 1, 4), _v(16, bk, 1, 2), _v(16, bk, 2, 2), _v(32, bk, 2, 4),
                 _v(8, bk, 4, 1), _v(16, deep, 1, 4), _v(8, deep, 1, 2), _v(16, deep, 2, 4)]
        if n <= 4096:
            cands += [_v(16, bk, 4, 2), _v(32, bk, 4, 4), _v(16, bk, 8, 2), _v(16, deep, 4, 4), _v(8, deep, 4, 2)]
        return cands
    bk, bk2 = block_k(group), block_k(group, 128)
    if rows <= 16:
        return [_t(16, 64, bk, 4, 4), _t(16, 128, bk2, 4, 3), _t(16, 64, bk2, 4, 4), _t(16, 256, bk2, 8, 3),
                _t(16, 32, bk2, 4, 4)]
    return [_t(64, 128, bk, 4, 3), _t(128, 128, bk, 8, 3), _t(64, 128, bk2, 4, 3), _t(128, 256, bk, 8, 3),
            _t(64, 256, bk2, 8, 3), _t(32, 128, bk2, 4, 4)]


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ ((q - zeros) * scales)^T + bias -> [M, N], fp32 accumulation; the launch shape
    chosen by the autotuner per (rows bucket, N, K, group)."""
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
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    rows = bucket(m)
    key = (f"M={rows}|N={n}|K={k}|g={group}|{'z' if zeros is not None else 'sym'}|"
           f"{str(x.dtype).removeprefix('torch.')}")
    cands = int4_candidates(rows, n, group)
    run = StreamedRun(lambda cfg, w, s, *z: apply_config(cfg, x, w, s, z[0] if z else None, group, bias, out),
                      packed, scales, *([] if zeros is None else [zeros]))
    cfg = get_tuner().choose("int4_linear", key, cands, run, cands[0])
    return apply_config(cfg, x, packed, scales, zeros, group, bias, out)


def apply_config(cfg: Config, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group: int, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """One launch of a given config (GEMV: BLOCK_N, BLOCK_K, SPLIT_K; tl.dot tiles: BLOCK_M too) into out."""
    m, k = x.shape
    n = packed.shape[0]
    b = bias if bias is not None else out
    has_zeros = zeros is not None
    z = zeros if has_zeros else scales  # a placeholder pointer when symmetric
    if "BLOCK_M" not in cfg:
        if m > SKINNY_ROWS:
            raise ValueError(f"int4 GEMM: GEMV config {cfg} cannot run {m} rows")
        bn, bk, split = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
        tiles = triton.cdiv(n, bn)
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
        counters = split_counters(x.device, tiles) if split > 1 else out
        _gemv_kernel[(tiles, split)](
            x, packed, scales, z, b, out, part, counters, m, n, k, x.stride(0), packed.stride(0), scales.stride(0),
            out.stride(0), GROUP=group, M_P=runtime.next_pow2(m), BLOCK_N=bn, BLOCK_K=bk,
            GS=block_k(group, bk), SPLIT_K=split, HAS_BIAS=bias is not None, HAS_ZEROS=has_zeros,
            num_warps=cfg["W"], num_stages=cfg["S"], **pdl.launch(x.device, m))
        return out
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk < 16 or group % bk:
        raise ValueError(f"int4 GEMM: group size {group} gives K tiles of {bk} (< 16, tl.dot's smallest, or not "
                         "dividing the group)")
    dot_f32, precision = runtime.dot_flags(x.dtype)
    _gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, packed, scales, z, b, out, m, n, k, x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, DOT_F32=dot_f32,
        INPUT_PRECISION=precision, HAS_ZEROS=has_zeros, num_warps=cfg["W"], num_stages=cfg["S"],
        **pdl.launch(x.device, m))
    return out
