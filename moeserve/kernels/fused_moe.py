"""Fused MoE experts in Triton: sort pairs by expert, gate/up GEMM with SiLU-and-mul, down GEMM with the routing
weight folded in, then a sum over the K experts of each token.

    out[t] = sum_k w[t,k] * w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t])),  e = topk_ids[t,k]

Per chunk of tokens (so a 64k-token prefill stays inside memory):
  1. moe_align.align_pairs: (token, k) pairs grouped by expert, padded per expert to BLOCK_M rows;
  2. _gate_up_kernel: one BLOCK_M x BLOCK_N tile of gate and of up per program, fp32 accumulators, SiLU(gate) * up
     in the epilogue -> inter1 [pairs, I] (model dtype), rows indexed by pair;
  3. _down_kernel: inter1 rows @ w2[e]^T, times the pair's routing weight (fp32) -> inter2 [pairs, H];
  4. out[t] = sum over k of inter2[t*K + k] (torch.sum: fp32 accumulation, one rounding), no atomics.
For one or two tokens a tuning candidate may fold 3 and 4 into one launch (_down_sum_kernel: each program owns a
token's slice of H and adds up its K experts' GEMVs in registers), and may replace 2 by _gate_up_gemv_kernel (one
pair's slice of I per program, multiply-and-reduce in fp32 registers: no 16-row tensor-core tile of which 15 rows
are padding), as the autotuner finds faster or not.
Grids depend only on shapes (an upper bound of expert blocks; blocks past the used length exit at once), nothing
syncs with the host: CUDA-graph safe. Block sizes come from the autotuner, per token-count bucket.
fp8 experts (e4m3 + block scales) and int4 experts (8 codes an int32 along K, a scale and a zero per row per group)
take the same kernels (WSCALE: each tile widened to the activations' dtype - int4 codes first unpacked and less their
zero, PACK - its product scaled per column) and so the same decode forms and tuning; for fp8 the tuner may also pick
W8A8 forms of the tiled kernels (A8: activations quantized per token per scale block, fp8 x fp8 on the tensor
cores), vLLM's arithmetic for block-fp8 experts. (Quantizing those activations inside gate/up and down, two
launches fewer, lost at every decode size on an H200: T=1 34.9 us against 23.2, session 17; deleted.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import fp8_linear as _fp8_linear  # its activation quantization (looked up at call time)
from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.autotune import Config, bucket, get_tuner
from moeserve.kernels.int4_linear import codes_minus
from moeserve.kernels.moe_align import align_pairs

DEFAULT_CHUNK = 16384


@triton.jit
def _local_expert(e, num_experts, map_ptr, HAS_MAP: tl.constexpr):
    """The w13/w2 row of expert id e, -1 for none: ids outside [0, num_experts), or (with an expert map, ids
    global) an expert another rank holds."""
    ok = (e >= 0) & (e < num_experts)
    if HAS_MAP:
        e = tl.load(map_ptr + tl.where(ok, e, 0)).to(tl.int64)
        ok = ok & (e >= 0)
    return tl.where(ok, e, -1)


@triton.jit
def _block_rows(pid_m, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, map_ptr,
                BLOCK_M: tl.constexpr, SORTED: tl.constexpr, HAS_MAP: tl.constexpr):
    """(local expert, pair ids of the BLOCK_M rows) of row block pid_m; expert -1 = no expert to run (rows with a
    pair id below num_pairs are then zeros in the output; a block past the sorted list's end has none).

    SORTED: blocks of the expert-sorted pair list. Otherwise one pair per block (block_expert_ptr is then the
    flat topk_ids): no sort launch at all, which wins when there are so few pairs that experts rarely repeat.
    """
    rows = tl.arange(0, BLOCK_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if SORTED:
        live = pid_m * BLOCK_M < tl.load(num_post_ptr)
        e = tl.where(live, e, -1)
        pair = tl.where(live, tl.load(sorted_ptr + pid_m * BLOCK_M + rows), num_pairs)
    else:
        pair = tl.where(rows == 0, pid_m, num_pairs)
    return _local_expert(e, num_experts, map_ptr, HAS_MAP), pair


@triton.jit
def _col_scale(s_col, k0, n_ok, SBK: tl.constexpr):
    """WSCALE 1: the scale of each column (s_col: its scale row) for the K tile at k0, which lies inside one scale
    block: the tile's product is scaled once per column instead of each weight element."""
    return tl.load(s_col + k0 // SBK, mask=n_ok, other=0.0).to(tl.float32)


@triton.jit
def _scale_elems(w, s_col, kb, mask):
    """WSCALE 2 (scale blocks narrower than the K tile): each weight element times its own block's scale, fp32."""
    return w.to(tl.float32) * tl.load(s_col + kb, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _kpos(BLOCK_K: tl.constexpr, PACK: tl.constexpr):
    """Offsets along K of a weight tile's storage: BLOCK_K elements, or BLOCK_K / 8 int32 words of 8 int4 codes
    (PACK 8), each word loaded once and unpacked in registers (unpack_codes). Indexing the word of every code instead
    (k // 8 across the tile) ran the int4 experts at 0.04-0.18x of bf16's speed on an H200
    (results/kernels/2026-11-28-session22-int4-h200)."""
    return tl.arange(0, BLOCK_K // PACK)


@triton.jit
def _w_mask(kk, k_left, n_ok, PACK: tl.constexpr, K_AXIS: tl.constexpr):
    """The load mask of a weight tile: its K offsets (elements, or words: word c holds inputs 8c..8c+7, and K is a
    multiple of 8) below k_left, its columns inside N."""
    if K_AXIS == 0:
        m = ((kk * PACK) < k_left)[:, None] & n_ok[None, :]
    else:
        m = n_ok[:, None] & ((kk * PACK) < k_left)[None, :]
    return m


@triton.jit
def _w4_tile(words, z_col, k0, kk, k_left, n_ok, SBK: tl.constexpr, WSCALE: tl.constexpr, HAS_ZEROS: tl.constexpr,
             K_AXIS: tl.constexpr):
    """int4: a loaded tile of words (K along K_AXIS) as each element's code minus its zero (8 when symmetric), fp32:
    small integers, exact in bf16, so the scale can still be applied per column after the dot."""
    z = 8.0
    if HAS_ZEROS:
        if K_AXIS == 0:
            z = _zero(z_col, k0, n_ok, ((k0 + kk) // SBK)[:, None], (kk < k_left)[:, None] & n_ok[None, :], SBK,
                      WSCALE, 1)
        else:
            z = _zero(z_col, k0, n_ok, ((k0 + kk) // SBK)[None, :], n_ok[:, None] & (kk < k_left)[None, :], SBK,
                      WSCALE, 0)
    return codes_minus(words, z, K_AXIS)


@triton.jit
def _zero(z_col, k0, n_ok, kb, mask, SBK: tl.constexpr, WSCALE: tl.constexpr, N_AXIS: tl.constexpr):
    """int4 zeros, laid out as the scales (z_col: each column's row of them): one per column for the K tile
    (WSCALE 1) or one per element (group index kb, mask), as a tile with the columns on N_AXIS. One return: the
    compiler type-checks every return of a function, constexpr branches or not (the interpreter does not)."""
    if WSCALE == 1:
        z = tl.load(z_col + k0 // SBK, mask=n_ok, other=0).to(tl.float32)
        if N_AXIS == 1:
            z = z[None, :]
        else:
            z = z[:, None]
    elif N_AXIS == 1:
        z = tl.load(z_col[None, :] + kb, mask=mask, other=0).to(tl.float32)
    else:
        z = tl.load(z_col[:, None] + kb, mask=mask, other=0).to(tl.float32)
    return z


@triton.jit
def _col_zero(z_col, k0, n_ok, SBK: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """int4, WSCALE 1: each column's zero for the K tile at k0 ([BLOCK_N], fp32; 8 when symmetric). A GEMV subtracts
    it once per column after the tile's sum (zero * sum(x)) instead of from every code, where the broadcast tile of
    zeros cost one load per element of each thread's rows (64 a tile in the sm_90 code of _gate_up_gemv_kernel)."""
    z = tl.full(n_ok.shape, 8.0, tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_col + k0 // SBK, mask=n_ok, other=0).to(tl.float32)
    return z


@triton.jit
def _w4_deep_dot(codes, a, s_col, z_col, k0, k_left, n_ok, SBK: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """int4, WSCALE 3 (a GEMV's K tile of NG whole scale groups): [BLOCK_N] sums over the tile of each column's
    (codes - zero) * scale . a, each group's codes . a summed first (where the thread holds them), then its zero and
    scale: one scale and zero load per (column, group) a thread holds, where dequantizing every code loaded one per
    code. Deep tiles put more of a weight stream in flight per thread than one group's 128 inputs; codes [BLOCK_N,
    BLOCK_K] (unpacked), a [BLOCK_K] fp32."""
    NG: tl.constexpr = codes.shape[1] // SBK
    q = tl.reshape(codes, [codes.shape[0], NG, SBK]).to(tl.float32)
    a3 = tl.reshape(a, [NG, SBK])
    part = tl.sum(q * a3[None, :, :], axis=2)
    blk = tl.arange(0, NG)
    ok = n_ok[:, None] & (blk * SBK < k_left)[None, :]
    idx = k0 // SBK + blk[None, :]
    sc = tl.load(s_col[:, None] + idx, mask=ok, other=0.0).to(tl.float32)
    z = tl.full(sc.shape, 8.0, tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_col[:, None] + idx, mask=ok, other=0).to(tl.float32)
    return tl.sum((part - tl.sum(a3, axis=1)[None, :] * z) * sc, axis=1)


@triton.jit
def _side_cols(s_ptr, z_ptr, e, n, stride_se, stride_sn, s_up, SBN: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Each column's row of scales for gate (or down) and for up (s_up rows further), and of int4 zeros (the same
    layout; without zeros the scales' pointers stand in, never read)."""
    off = e * stride_se + (n // SBN) * stride_sn
    z_base = s_ptr
    if HAS_ZEROS:
        z_base = z_ptr
    return s_ptr + off, s_ptr + off + s_up * stride_sn, z_base + off, z_base + off + s_up * stride_sn


@triton.jit
def _dot8(a, w, DOT_F32: tl.constexpr):
    """A8: e4m3 x e4m3 -> fp32 on the fp8 tensor cores (the interpreter: both already widened to fp32)."""
    if DOT_F32:
        return tl.dot(a, w, input_precision="ieee")
    return tl.dot(a, w)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, inter_ptr, sorted_ptr, block_expert_ptr, num_post_ptr,
    num_pairs, num_experts, H, I, stride_xt, stride_we, stride_wn, stride_it,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SORTED: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, map_ptr=None, HAS_MAP: tl.constexpr = False,
    s_ptr=None, stride_se=0, stride_sn=0, s_up=0, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1,
    WSCALE: tl.constexpr = 0, as_ptr=None, stride_as=0, A8: tl.constexpr = False,
    z_ptr=None, HAS_ZEROS: tl.constexpr = False, PACK: tl.constexpr = 1,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(I, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e, pair = _block_rows(pid_m, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, map_ptr,
                          BLOCK_M, SORTED, HAS_MAP)
    if e < 0:  # its inter1 rows stay unwritten: the down step never reads them
        return
    row_ok = pair < num_pairs
    tok = tl.where(row_ok, pair // TOPK, 0).to(tl.int64)  # padding rows read token 0, never stored
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + kk[None, :]
    kw = _kpos(BLOCK_K, PACK)
    g_ptrs = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + kw[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    if WSCALE != 0:
        gs_col, us_col, gz_col, uz_col = _side_cols(s_ptr, z_ptr, e, n, stride_se, stride_sn, s_up, SBN, HAS_ZEROS)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = kk < H - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            wm = _w_mask(kw, H - k0, n_ok, PACK, 0)
            g = tl.load(g_ptrs, mask=wm, other=0.0)
            u = tl.load(u_ptrs, mask=wm, other=0.0)
        if PACK == 8:
            g = _w4_tile(g, gz_col, k0, kk, H - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 0)
            u = _w4_tile(u, uz_col, k0, kk, H - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 0)
        if WSCALE == 2:
            g = _scale_elems(g, gs_col[None, :], ((k0 + kk) // SBK)[:, None], (kk < H - k0)[:, None] & n_ok[None, :])
            u = _scale_elems(u, us_col[None, :], ((k0 + kk) // SBK)[:, None], (kk < H - k0)[:, None] & n_ok[None, :])
        if WSCALE != 0:
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        if DOT_F32:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        if A8:  # fp8 x fp8 (WSCALE 1): the token's group scale per row, the weight block's per column
            a_s = tl.load(as_ptr + tok * stride_as + k0 // SBK)[:, None]
            acc_g += _dot8(a, g, DOT_F32) * a_s * _col_scale(gs_col, k0, n_ok, SBK)[None, :]
            acc_u += _dot8(a, u, DOT_F32) * a_s * _col_scale(us_col, k0, n_ok, SBK)[None, :]
        elif WSCALE == 1:
            acc_g += tl.dot(a, g, input_precision=PRECISION) * _col_scale(gs_col, k0, n_ok, SBK)[None, :]
            acc_u += tl.dot(a, u, input_precision=PRECISION) * _col_scale(us_col, k0, n_ok, SBK)[None, :]
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K // PACK
        u_ptrs += BLOCK_K // PACK
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = inter_ptr + pair[:, None].to(tl.int64) * stride_it + n[None, :]
    tl.store(dst, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, w_ptr, inter_ptr, ids_ptr, num_experts, H, I, stride_xt, stride_we, stride_wn, stride_it,
    TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    LATE_SUM: tl.constexpr, map_ptr=None, HAS_MAP: tl.constexpr = False,
    s_ptr=None, stride_se=0, stride_sn=0, s_up=0, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1,
    WSCALE: tl.constexpr = 0, z_ptr=None, HAS_ZEROS: tl.constexpr = False, PACK: tl.constexpr = 1,
    PDL: tl.constexpr = 0,
):
    """inter1[pair, n-tile] = silu(gate[e] @ x[t]) * (up[e] @ x[t]), e = topk_ids[pair]: step 2 for decode.
    _gate_up_kernel's tl.dot needs BLOCK_M >= 16 rows where a pair has one, so at one or two tokens the tensor cores
    idle while the weights stream; as a GEMV the same bytes feed fp32 multiply-and-reduce, and one program per
    (pair, BLOCK_N rows of I) spreads the 8-16 pairs of a decode step over every SM."""
    pdl_begin(PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(I, BLOCK_N)
    pair = pid // n_tiles
    e = _local_expert(tl.load(ids_ptr + pair).to(tl.int64), num_experts, map_ptr, HAS_MAP)
    if e < 0:  # as _block_rows without the sort: nothing to do
        return
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (pair // TOPK).to(tl.int64) * stride_xt + kk
    kw = _kpos(BLOCK_K, PACK)
    g_ptrs = w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn + kw[None, :]
    u_ptrs = w_ptr + e * stride_we + (n + I)[:, None].to(tl.int64) * stride_wn + kw[None, :]
    if WSCALE != 0:
        gs_col, us_col, gz_col, uz_col = _side_cols(s_ptr, z_ptr, e, n, stride_se, stride_sn, s_up, SBN, HAS_ZEROS)
    if LATE_SUM:  # element-wise products over the K loop, summed once after it: no cross-thread reduce per step
        acc_g2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_u2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = kk < H - k0
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            wm = _w_mask(kw, H - k0, n_ok, PACK, 1)
            g = tl.load(g_ptrs, mask=wm, other=0.0)
            u = tl.load(u_ptrs, mask=wm, other=0.0)
        if WSCALE == 3:  # int4, several whole groups a tile
            af = a.to(tl.float32)
            acc_g += _w4_deep_dot(codes_minus(g, 0.0, 1), af, gs_col, gz_col, k0, H - k0, n_ok, SBK, HAS_ZEROS)
            acc_u += _w4_deep_dot(codes_minus(u, 0.0, 1), af, us_col, uz_col, k0, H - k0, n_ok, SBK, HAS_ZEROS)
        else:
            a = a.to(tl.float32)[None, :]
            if PACK == 8 and WSCALE == 1 and not LATE_SUM:  # the codes as they are: each column's zero after the sum
                g = codes_minus(g, 0.0, 1)
                u = codes_minus(u, 0.0, 1)
            elif PACK == 8:
                g = _w4_tile(g, gz_col, k0, kk, H - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 1)
                u = _w4_tile(u, uz_col, k0, kk, H - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 1)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
            if WSCALE == 2:
                em = n_ok[:, None] & (kk < H - k0)[None, :]
                g = _scale_elems(g, gs_col[:, None], ((k0 + kk) // SBK)[None, :], em)
                u = _scale_elems(u, us_col[:, None], ((k0 + kk) // SBK)[None, :], em)
            if LATE_SUM:
                if WSCALE == 1:
                    g = g * _col_scale(gs_col, k0, n_ok, SBK)[:, None]
                    u = u * _col_scale(us_col, k0, n_ok, SBK)[:, None]
                acc_g2 += g * a
                acc_u2 += u * a
            elif WSCALE == 1 and PACK == 8:
                a_sum = tl.sum(a)
                acc_g += (tl.sum(g * a, axis=1) - _col_zero(gz_col, k0, n_ok, SBK, HAS_ZEROS) * a_sum) \
                    * _col_scale(gs_col, k0, n_ok, SBK)
                acc_u += (tl.sum(u * a, axis=1) - _col_zero(uz_col, k0, n_ok, SBK, HAS_ZEROS) * a_sum) \
                    * _col_scale(us_col, k0, n_ok, SBK)
            elif WSCALE == 1:
                acc_g += tl.sum(g * a, axis=1) * _col_scale(gs_col, k0, n_ok, SBK)
                acc_u += tl.sum(u * a, axis=1) * _col_scale(us_col, k0, n_ok, SBK)
            else:
                acc_g += tl.sum(g * a, axis=1)
                acc_u += tl.sum(u * a, axis=1)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K // PACK
        u_ptrs += BLOCK_K // PACK
    if LATE_SUM:
        acc_g = tl.sum(acc_g2, axis=1)
        acc_u = tl.sum(acc_u2, axis=1)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(inter_ptr + pair.to(tl.int64) * stride_it + n, h.to(inter_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_kernel(
    inter_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, topk_w_ptr,
    num_pairs, num_experts, H, I, stride_it, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SORTED: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, map_ptr=None, HAS_MAP: tl.constexpr = False,
    s_ptr=None, stride_se=0, stride_sn=0, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1, WSCALE: tl.constexpr = 0,
    as_ptr=None, stride_as=0, A8: tl.constexpr = False, z_ptr=None, HAS_ZEROS: tl.constexpr = False,
    PACK: tl.constexpr = 1,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e, pair = _block_rows(pid_m, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, map_ptr,
                          BLOCK_M, SORTED, HAS_MAP)
    row_ok = pair < num_pairs
    row = tl.where(row_ok, pair, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    if e < 0:
        # Pairs whose expert is elsewhere (expert map) or none (no-sort mode) get zero rows: the sum over K reads
        # every pair's row. Without a map the sorted list holds only real experts: blocks past its end just exit.
        if HAS_MAP or not SORTED:
            zero = tl.zeros([BLOCK_M, BLOCK_N], out_ptr.dtype.element_ty)
            dst = out_ptr + row[:, None] * stride_ot + n[None, :]
            tl.store(dst, zero, mask=row_ok[:, None] & n_ok[None, :])
        return
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + row[:, None] * stride_it + kk[None, :]
    kw = _kpos(BLOCK_K, PACK)
    b_ptrs = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + kw[:, None]
    if WSCALE != 0:
        s_col, _, z_col, _ = _side_cols(s_ptr, z_ptr, e, n, stride_se, stride_sn, 0, SBN, HAS_ZEROS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = kk < I - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=_w_mask(kw, I - k0, n_ok, PACK, 0), other=0.0)
        if PACK == 8:
            b = _w4_tile(b, z_col, k0, kk, I - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 0)
        if WSCALE == 2:
            b = _scale_elems(b, s_col[None, :], ((k0 + kk) // SBK)[:, None], (kk < I - k0)[:, None] & n_ok[None, :])
        if WSCALE != 0:
            b = b.to(a.dtype)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if A8:
            a_s = tl.load(as_ptr + row * stride_as + k0 // SBK)[:, None]
            acc += _dot8(a, b, DOT_F32) * a_s * _col_scale(s_col, k0, n_ok, SBK)[None, :]
        elif WSCALE == 1:
            acc += tl.dot(a, b, input_precision=PRECISION) * _col_scale(s_col, k0, n_ok, SBK)[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K // PACK
    acc = acc * tl.load(topk_w_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dst = out_ptr + row[:, None] * stride_ot + n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_sum_kernel(
    inter_ptr, w_ptr, out_ptr, ids_ptr, topk_w_ptr,
    H, I, stride_it, stride_we, stride_wn, stride_ot,
    TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    LATE_SUM: tl.constexpr, num_experts=1 << 30, map_ptr=None, HAS_MAP: tl.constexpr = False,
    s_ptr=None, stride_se=0, stride_sn=0, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1, WSCALE: tl.constexpr = 0,
    z_ptr=None, HAS_ZEROS: tl.constexpr = False, PACK: tl.constexpr = 1,
    PDL: tl.constexpr = 0,
):
    """out[t, n-tile] = sum_k w[t,k] * w2[e_k][n-tile] @ inter1[t*K + k]: steps 3 and 4 in one launch, for decode.
    One row per expert is a GEMV (no tensor cores to feed): multiply-and-reduce in fp32 registers."""
    pdl_begin(PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_N)
    t = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    kk = tl.arange(0, BLOCK_K)
    kw = _kpos(BLOCK_K, PACK)
    acc = tl.zeros([BLOCK_N], tl.float32)
    if LATE_SUM:  # weighted products of all K experts in one fp32 tile, summed over I once at the end
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in tl.static_range(TOPK):
        pair = t * TOPK + k
        e = _local_expert(tl.load(ids_ptr + pair).to(tl.int64), num_experts, map_ptr, HAS_MAP)
        wt = tl.where(e >= 0, tl.load(topk_w_ptr + pair).to(tl.float32), 0.0)
        k_end = tl.where(e >= 0, I, 0)  # a pair with no local expert: no loop, adds nothing
        a_ptrs = inter_ptr + pair.to(tl.int64) * stride_it + kk
        b_ptrs = w_ptr + tl.maximum(e, 0) * stride_we + n[:, None].to(tl.int64) * stride_wn + kw[None, :]
        if WSCALE != 0:
            s_col, _, z_col, _ = _side_cols(s_ptr, z_ptr, tl.maximum(e, 0), n, stride_se, stride_sn, 0, SBN, HAS_ZEROS)
        part = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            if EVEN_K and EVEN_N:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = kk < I - k0
                a = tl.load(a_ptrs, mask=k_ok, other=0.0)
                b = tl.load(b_ptrs, mask=_w_mask(kw, I - k0, n_ok, PACK, 1), other=0.0)
            if WSCALE == 3:  # int4, several whole groups a tile
                part += _w4_deep_dot(codes_minus(b, 0.0, 1), a.to(tl.float32), s_col, z_col, k0, I - k0, n_ok, SBK,
                                     HAS_ZEROS)
            else:
                em = n_ok[:, None] & (kk < I - k0)[None, :]
                if PACK == 8 and WSCALE == 1 and not LATE_SUM:  # the codes as they are: the zero after the sum
                    b = codes_minus(b, 0.0, 1)
                elif PACK == 8:
                    b = _w4_tile(b, z_col, k0, kk, I - k0, n_ok, SBK, WSCALE, HAS_ZEROS, 1)
                b = b.to(tl.float32)
                if WSCALE == 2:
                    b = _scale_elems(b, s_col[:, None], ((k0 + kk) // SBK)[None, :], em)
                if LATE_SUM:
                    if WSCALE == 1:
                        b = b * _col_scale(s_col, k0, n_ok, SBK)[:, None]
                    acc2 += b * (wt * a.to(tl.float32))[None, :]
                elif WSCALE == 1 and PACK == 8:
                    af = a.to(tl.float32)
                    zero = _col_zero(z_col, k0, n_ok, SBK, HAS_ZEROS)
                    part += (tl.sum(b * af[None, :], axis=1) - zero * tl.sum(af)) * _col_scale(s_col, k0, n_ok, SBK)
                elif WSCALE == 1:
                    part += tl.sum(b * a.to(tl.float32)[None, :], axis=1) * _col_scale(s_col, k0, n_ok, SBK)
                else:
                    part += tl.sum(b * a.to(tl.float32)[None, :], axis=1)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K // PACK
        if not LATE_SUM:
            acc += wt * part
    if LATE_SUM:
        acc = tl.sum(acc2, axis=1)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _topk_sum_kernel(src_ptr, out_ptr, H, stride_s, stride_o, TOPK: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = 0):
    """out[t] = the sum of the down step's K weighted rows of token t (src row t * K + k), in fp32, rounded once.
    torch.sum over the [T, K, H] view took 4.6 us a layer at batch 1 on an H200 (session 16 profile): a strided
    reduction launch for 32 KB."""
    pdl_begin(PDL)
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < H
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOPK):
        acc += tl.load(src_ptr + (t * TOPK + k).to(tl.int64) * stride_s + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + n, acc.to(out_ptr.dtype.element_ty), mask=ok)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    out: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    blocks: dict | None = None,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_weights [T, K]; topk_ids [T, K].

    fp8 experts (W8A16): w13/w2 in e4m3 with fp32 block scales w13_scale [E, 2*ceil(I/bn), ceil(H/bk)] (gate
    blocks, then up blocks) and w2_scale [E, ceil(H/bn), ceil(I/bk)], blocks {"w13": (bn, bk), "w2": (bn, bk)}
    (checkpoints: [128, 128]; per-row scales: (1, K)). The kernels widen each weight tile to x's dtype and scale
    its product once per column where the K tile lies inside one scale block (WSCALE 1), else element by element
    (WSCALE 2); the same configs, decode GEMVs and tuning as bf16 weights, which is why they share these kernels.
    int4 experts (W4A16): w13 [E, 2I, H/8] / w2 [E, H, I/8] int32, 8 codes a word along K (layers/quant/int4's
    layout); scales [E, 2I, H/G] / [E, H, I/G] (any float dtype), blocks {"w13": (1, G), "w2": (1, G)}, zeros
    uint8 of the scales' shape (None: symmetric, 8); the codes minus their zero are exact in bf16, so the scale is
    applied per column as for fp8.

    expert_map (expert parallelism): int32 [E_global], global id -> row of w13/w2 or -1 for an expert held
    elsewhere; topk_ids are then global ids and the kernels look the map up themselves (no host sync, no extra
    launch). A pair whose expert is elsewhere adds exact zeros. Without a map, ids outside [0, E) add nothing in
    the no-sort and folded paths; the sorted path drops them and leaves their token's row undefined (the router
    never makes them; DP padding rows are sliced off).
    """
    runtime.check_device("fused_moe", x, w13, w2, topk_weights, topk_ids)
    if expert_map is not None and (expert_map.dtype != torch.int32 or expert_map.dim() != 1
                                   or expert_map.device != topk_ids.device):
        raise ValueError("fused_moe: expert_map must be a 1-d int32 tensor on the ids' device")
    T, H = x.shape
    E, two_i, h_w = w13.shape
    inter = two_i // 2
    K = topk_ids.shape[1] if topk_ids.dim() == 2 else -1
    pack = 8 if w13.dtype == torch.int32 else 1  # int4 codes per stored element along K
    if two_i % 2 or h_w * pack != H or w2.shape != (E, H, inter // pack) or inter % pack:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} disagree")
    if topk_ids.shape != (T, K) or topk_weights.shape != (T, K):
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{T}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_weights.is_floating_point():
        raise ValueError(f"fused_moe: topk_ids must be int32/int64 (got {topk_ids.dtype}), weights floating")
    quant = _check_scales(w13, w2, w13_scale, w2_scale, blocks, H, inter, w13_zeros, w2_zeros)
    if not quant and (x.dtype != w13.dtype or x.dtype != w2.dtype):
        raise ValueError(f"fused_moe: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype} must share a dtype")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe: x, w13 and w2 need a contiguous last dimension")
    if chunk_size < 1:
        raise ValueError(f"fused_moe: chunk_size must be >= 1, got {chunk_size}")
    if out is None:
        out = torch.empty_like(x)
    if T == 0:
        return out
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()

    rows = min(T, chunk_size)
    num_ids = E if expert_map is None else expert_map.numel()  # the experts the ids (and the sort) range over
    key = f"T={bucket(rows)}|E={E}|K={K}|H={H}|I={inter}|{str(x.dtype).removeprefix('torch.')}"
    if expert_map is not None:
        key += f"|of={num_ids}"
    scales = None
    if quant:
        bn1, bk1 = blocks["w13"]
        key += f"|fp8={bn1}x{bk1}" if pack == 1 else f"|int4={bk1}" + ("z" if w13_zeros is not None else "")
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()  # zeros share the scales' strides
        zeros = (None, None) if w13_zeros is None else (w13_zeros.contiguous(), w2_zeros.contiguous())
        scales = (w13_scale, w2_scale, blocks, zeros, pack)
    inter1 = torch.empty(rows * K, inter, dtype=x.dtype, device=x.device)
    inter2 = torch.empty(rows * K, H, dtype=x.dtype, device=x.device)

    def run(cfg: Config, lo: int = 0) -> None:
        hi = min(lo + rows, T)
        _moe_chunk(cfg, x[lo:hi], w13, w2, topk_weights[lo:hi], topk_ids[lo:hi], out[lo:hi], inter1, inter2,
                   expert_map, scales)

    cands = tuning_candidates(bucket(rows), K, num_ids, x.element_size(), blocks if quant else None, H, inter, pack)
    cfg = get_tuner().choose("fused_moe", key, cands, run, cands[0])
    for lo in range(0, T, rows):
        run(cfg, lo)
    return out


def tuning_candidates(tokens: int, top_k: int, num_ids: int, elem_bytes: int, blocks: dict | None, H: int,
                      inter: int, pack: int = 1) -> list[Config]:
    """What fused_moe asks the tuner to time for this shape: moe_candidates with the K scale blocks of quantized
    experts (blocks as fused_moe takes them, None for unquantized; pack 8 for int4). benchmarks/kernels/
    retune_shipped.py rebuilds the same list from a tuning key."""
    scale_k = None
    if blocks is not None:
        bk1, bk2 = blocks["w13"][1], blocks["w2"][1]
        scale_k = (bk1 if bk1 < H else 0, bk2 if bk2 < inter else 0)  # 0: one block spans K
    return moe_candidates(tokens, top_k, num_ids, elem_bytes, scale_k, a8=blocks is not None and pack == 1,
                          int4=pack == 8)


def _check_scales(w13, w2, w13_scale, w2_scale, blocks, H: int, inter: int, w13_zeros=None, w2_zeros=None) -> bool:
    """True for fp8 or int4 experts with well-formed scales (and zeros); False for unquantized ones; ValueError
    otherwise."""
    if w13_scale is None and w2_scale is None and blocks is None and w13_zeros is None and w2_zeros is None:
        return False
    if w13_scale is None or w2_scale is None or blocks is None:
        raise ValueError("fused_moe: quantized experts need w13_scale, w2_scale and blocks together")
    if w13.dtype == torch.int32 and w2.dtype == torch.int32:  # int4 codes, 8 a word
        if not (w13_scale.is_floating_point() and w2_scale.is_floating_point()):
            raise ValueError(f"fused_moe: int4 experts' scales must be floating (got {w13_scale.dtype})")
        if (w13_zeros is None) != (w2_zeros is None):
            raise ValueError("fused_moe: int4 zeros for both of w13 and w2, or for neither (symmetric)")
        if blocks["w13"][0] != 1 or blocks["w2"][0] != 1:
            raise ValueError(f"fused_moe: int4 scales are per row: blocks {blocks}")
    elif w13_zeros is not None or w2_zeros is not None:
        raise ValueError("fused_moe: zeros are for int4 experts only")
    elif not (w13.dtype == w2.dtype == torch.float8_e4m3fn and w13_scale.dtype == w2_scale.dtype == torch.float32):
        raise ValueError(f"fused_moe: scaled experts must be e4m3 with fp32 scales or int4 in int32 words (w13 "
                         f"{w13.dtype}, w2 {w2.dtype}, scales {w13_scale.dtype}, {w2_scale.dtype})")
    E = w13.shape[0]
    (bn1, bk1), (bn2, bk2) = blocks["w13"], blocks["w2"]
    want = {"w13_scale": (E, 2 * -(-inter // bn1), -(-H // bk1)), "w2_scale": (E, -(-H // bn2), -(-inter // bk2))}
    for name, t in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"fused_moe: {name} {tuple(t.shape)} does not fit its weight's blocks: {want[name]}")
    for name, z, sc in (("w13_zeros", w13_zeros, w13_scale), ("w2_zeros", w2_zeros, w2_scale)):
        if z is not None and z.shape != sc.shape:
            raise ValueError(f"fused_moe: {name} {tuple(z.shape)} must have its scales' shape {tuple(sc.shape)}")
    return True


def _scale_args(s, block, k: int, bk: int, up: bool = False, z=None, pack: int = 1, deep: bool = False) -> dict:
    """The scale (and int4: zero, packing) arguments of one expert kernel launch over a K of k in tiles of bk
    (none for bf16 weights). WSCALE: 1, the tile inside one scale block; 2, a scale per element; 3, a DEEP config's
    int4 GEMV tile of whole groups (a power of two, summed group by group: _w4_deep_dot)."""
    if s is None:
        return {}
    sbn, sbk = block
    wscale = 1 if sbk >= k or sbk % bk == 0 else 2
    if wscale == 2 and deep and pack == 8 and bk % sbk == 0 and sbk & (sbk - 1) == 0:
        wscale = 3
    args = {"s_ptr": s, "stride_se": s.stride(0), "stride_sn": s.stride(1), "SBN": sbn, "SBK": sbk,
            "WSCALE": wscale, "PACK": pack}
    if z is not None:
        args.update(z_ptr=z, HAS_ZEROS=True)
    if up:
        args["s_up"] = s.shape[1] // 2
    return args


def _moe_chunk(cfg: Config, x, w13, w2, topk_weights, topk_ids, out, inter1, inter2, expert_map=None,
               scales=None) -> None:
    T, H = x.shape
    two_i = w13.shape[1]
    E = w13.shape[0] if expert_map is None else expert_map.numel()  # the id space
    mapped = {"map_ptr": expert_map, "HAS_MAP": expert_map is not None}
    inter = two_i // 2
    K = topk_ids.shape[1]
    pairs = T * K
    bm = cfg["BLOCK_M"]
    s13, s2, blocks, (z13, z2), pack = scales or (None, None, {"w13": None, "w2": None}, (None, None), 1)
    if cfg.get("SORT", 1):
        sorted_pairs, block_expert, num_post, num_blocks = align_pairs(topk_ids, E, bm)
    else:  # one pair per row block, experts straight from topk_ids
        block_expert = topk_ids.reshape(-1)
        sorted_pairs = num_post = block_expert  # unused
        num_blocks = pairs
    sort = bool(cfg.get("SORT", 1))
    dot_f32, precision = runtime.dot_flags(x.dtype)
    bn1, bk1 = cfg["BLOCK_N1"], cfg["BLOCK_K1"]
    bn2, bk2 = cfg["BLOCK_N2"], cfg["BLOCK_K2"]
    deep = bool(cfg.get("DEEP"))  # GEMV1 and FOLD, not LATE: both GEMVs take WSCALE 3
    scaled1 = _scale_args(s13, blocks["w13"], H, bk1, up=True, z=z13, pack=pack, deep=deep)
    scaled2 = _scale_args(s2, blocks["w2"], inter, bk2, z=z2, pack=pack, deep=deep)
    a8 = (bool(cfg.get("A8")) and scaled1.get("WSCALE") == 1 and scaled2.get("WSCALE") == 1
          and not cfg.get("GEMV1") and not cfg.get("FOLD"))
    if a8:  # W8A8: x quantized per token per scale block of K (the whole row for per-row scales)
        x, xs = _fp8_linear.quantize_act(x, min(blocks["w13"][1], H))
        scaled1.update(as_ptr=xs, stride_as=xs.stride(0), A8=True)
    if cfg.get("GEMV1"):  # one program per (pair, BLOCK_N1 rows of I), experts straight from topk_ids
        _gate_up_gemv_kernel[(pairs * triton.cdiv(inter, bn1),)](
            x, w13, inter1, topk_ids, E, H, inter, x.stride(0), w13.stride(0), w13.stride(1), inter1.stride(0),
            TOPK=K, BLOCK_N=bn1, BLOCK_K=bk1, EVEN_K=H % bk1 == 0, EVEN_N=inter % bn1 == 0,
            LATE_SUM=bool(cfg.get("LATE")), num_warps=cfg["W1"], num_stages=cfg["S1"], **mapped, **scaled1,
            **pdl.launch(x.device, T),
        )
    else:
        _gate_up_kernel[(num_blocks * triton.cdiv(inter, bn1),)](
            x, w13, inter1, sorted_pairs, block_expert, num_post,
            pairs, E, H, inter, x.stride(0), w13.stride(0), w13.stride(1), inter1.stride(0),
            TOPK=K, BLOCK_M=bm, BLOCK_N=bn1, BLOCK_K=bk1, EVEN_K=H % bk1 == 0, EVEN_N=inter % bn1 == 0,
            SORTED=sort, DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg["W1"], num_stages=cfg["S1"], **mapped,
            **scaled1,
            **pdl.launch(x.device, T),
        )
    if cfg.get("FOLD"):  # no-sort mode only: inter1 rows are pairs in (token, k) order
        _down_sum_kernel[(T * triton.cdiv(H, bn2),)](
            inter1, w2, out, topk_ids, topk_weights, H, inter, inter1.stride(0), w2.stride(0), w2.stride(1),
            out.stride(0), TOPK=K, BLOCK_N=bn2, BLOCK_K=bk2, EVEN_K=inter % bk2 == 0, EVEN_N=H % bn2 == 0,
            LATE_SUM=bool(cfg.get("LATE")), num_warps=cfg["W2"], num_stages=cfg["S2"], num_experts=E, **mapped,
            **scaled2,
            **pdl.launch(inter1.device, T),
        )
        return
    a = inter1
    if a8:
        a, a_s = _fp8_linear.quantize_act(inter1[:pairs], min(blocks["w2"][1], inter))
        scaled2.update(as_ptr=a_s, stride_as=a_s.stride(0), A8=True)
    _down_kernel[(num_blocks * triton.cdiv(H, bn2),)](
        a, w2, inter2, sorted_pairs, block_expert, num_post, topk_weights,
        pairs, E, H, inter, a.stride(0), w2.stride(0), w2.stride(1), inter2.stride(0),
        BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2, EVEN_K=inter % bk2 == 0, EVEN_N=H % bn2 == 0,
        SORTED=sort, DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg["W2"], num_stages=cfg["S2"], **mapped,
        **scaled2,
        **pdl.launch(a.device, T),
    )
    block = min(1024, triton.next_power_of_2(H))
    _topk_sum_kernel[(T, triton.cdiv(H, block))](inter2, out, H, inter2.stride(0), out.stride(0), TOPK=K, BLOCK=block,
                                                 num_warps=4, **pdl.launch(inter2.device, T))


def _cfg(bm, bn1, bk1, w1, s1, bn2, bk2, w2, s2, sort=1, fold=0, gemv1=0, late=0, deep=0) -> Config:
    cfg = {"BLOCK_M": bm, "BLOCK_N1": bn1, "BLOCK_K1": bk1, "W1": w1, "S1": s1,
           "BLOCK_N2": bn2, "BLOCK_K2": bk2, "W2": w2, "S2": s2, "SORT": sort}
    if fold:  # down GEMV and the sum over K in one kernel (requires sort=0)
        cfg["FOLD"] = 1
    if gemv1:  # gate/up as a GEMV per pair (used with sort=0; BLOCK_M then only shapes the non-fold down)
        cfg["GEMV1"] = 1
    if late:  # the GEMV kernels sum their fp32 products over K once after the loop, not at every step
        cfg["LATE"] = 1
    if deep:  # int4 GEMVs: K tiles of several whole groups (WSCALE 3), not fitted inside one
        cfg["DEEP"] = 1
    return cfg


def moe_candidates(tokens: int, top_k: int, num_experts: int, elem_bytes: int = 2,
                   scale_k: tuple[int, int] | None = None, a8: bool = False, int4: bool = False) -> list[Config]:
    """A handful of configs per regime of rows per expert (tokens = the bucket); the first is the heuristic.
    scale_k: quantized experts' K scale blocks (fp8) or groups (int4) of gate/up and of down (0: one block over
    all of K); None: bf16 experts. a8 (fp8 experts): with bf16 activations, also the W8A8 form (A8) of each tiled
    config. Prefill: fp8 operands double the tensor cores' rate. Decode: the W8A16 forms widen every weight element
    to bf16 (1.5 conversions an element in Triton's sm_90 PTX: e4m3x2 -> f16x2, f16 -> bf16), and fp8 experts ran at
    51-64 % of HBM bandwidth at 8-128 tokens on an H200 where bf16 experts ran at 85 % (session 16); fp8 x fp8
    feeds the weights to the tensor cores as they are. int4 (with scale_k): the decode GEMVs also get deep K tiles of
    several whole groups (DEEP), whose words per thread a step are those of bf16's tiles."""
    per_expert = tokens * top_k / num_experts
    if per_expert <= 1:  # decode: each expert sees ~1 row, weight streaming dominates
        cands = [_cfg(16, 32, 128, 4, 4, 64, 128, 4, 4), _cfg(16, 64, 128, 4, 4, 128, 64, 4, 4),
                 _cfg(16, 32, 256, 4, 3, 32, 256, 4, 3), _cfg(16, 16, 256, 2, 4, 64, 256, 4, 3)]
        if tokens * top_k <= 2 * top_k:  # one or two tokens: experts rarely repeat, skip the sort
            cands += [_cfg(16, 32, 128, 4, 4, 64, 128, 4, 4, sort=0), _cfg(16, 16, 256, 2, 4, 64, 256, 4, 3, sort=0),
                      _cfg(16, 32, 128, 4, 4, 16, 256, 4, 3, sort=0, fold=1),
                      _cfg(16, 16, 256, 2, 4, 32, 128, 4, 4, sort=0, fold=1)]
            # gate/up as a GEMV: BLOCK_N1 rows of I per program, so T=1 (8 pairs, I=768) is 384-768 programs on 132
            # SMs, each with 8-16 KB of gate+up rows in flight per k step (32 KB for the 16x512 one; its 166
            # registers still leave 3 programs an SM). Its loads are not pipelined (S1 is moot): the bytes in flight
            # come from the programs resident per SM. Tiles of at most 8192 elements keep the fp32 products in
            # registers
            cands += [_cfg(16, 8, 512, 4, 3, 16, 256, 4, 3, sort=0, fold=1, gemv1=1),
                      _cfg(16, 16, 256, 4, 4, 32, 128, 4, 4, sort=0, fold=1, gemv1=1),
                      _cfg(16, 8, 256, 2, 4, 16, 256, 4, 3, sort=0, fold=1, gemv1=1),
                      _cfg(16, 16, 512, 4, 3, 64, 256, 4, 3, sort=0, gemv1=1),
                      _cfg(16, 8, 512, 4, 3, 16, 256, 4, 3, sort=0, fold=1, gemv1=1, late=1),
                      _cfg(16, 16, 256, 4, 4, 32, 128, 4, 4, sort=0, fold=1, gemv1=1, late=1)]
    elif per_expert <= 16:
        cands = [_cfg(16, 64, 128, 4, 4, 64, 128, 4, 4), _cfg(16, 32, 128, 4, 4, 64, 128, 4, 4),
                 _cfg(32, 64, 64, 4, 4, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3, 128, 128, 4, 3),
                 _cfg(16, 128, 128, 8, 3, 128, 128, 4, 3)]  # +1-1.5 % at qwen3's E=128 shapes (bench_kernels moe_sweep)
    elif per_expert <= 128:
        cands = [_cfg(64, 64, 64, 4, 4, 128, 64, 4, 4), _cfg(32, 64, 128, 4, 3, 64, 128, 4, 3),
                 _cfg(64, 128, 64, 8, 3, 128, 64, 8, 3), _cfg(32, 128, 64, 4, 4, 128, 64, 4, 4),
                 _cfg(64, 128, 64, 4, 4, 128, 128, 4, 4)]  # Mixtral TP=2, 32 rows an expert: 10 % faster (moe_sweep)
    else:
        cands = [_cfg(128, 64, 64, 4, 4, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 3, 128, 64, 8, 4),
                 _cfg(64, 128, 64, 4, 4, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 4, 256, 64, 8, 3),
                 _cfg(64, 64, 64, 4, 4, 64, 64, 4, 4),
                 # wide gate/up tiles, 128-wide down: its W8A8 form took qwen3-30b's fp8 experts at 16k tokens from
                 # 419 to 472 TFLOP/s on an H200 (bench_kernels moe_sweep_fp8, session 21), the tuner's pick before
                 # (the candidate above) had down at ~370 TFLOP/s against gate/up's ~570 in the engine's profile
                 _cfg(64, 256, 64, 8, 3, 128, 64, 4, 3)]
    if elem_bytes > 2:  # fp32: half the K depth and at most 2 stages keep the tiles inside shared memory (GEMV tiles:
        # the same bytes per load, fewer fp32 products in registers)
        for c in cands:
            c["BLOCK_K1"], c["BLOCK_K2"] = max(16, c["BLOCK_K1"] // 2), max(16, c["BLOCK_K2"] // 2)
            c["S1"], c["S2"] = min(c["S1"], 2), min(c["S2"], 2)
    if scale_k is not None:
        if a8 and elem_bytes == 2:  # W8A8 forms of the tiled kernels: fp8 K tiles twice as deep (bf16's bytes)
            cands += [dict(c, A8=1, BLOCK_K1=2 * c["BLOCK_K1"], BLOCK_K2=2 * c["BLOCK_K2"]) for c in cands
                      if not (c.get("GEMV1") or c.get("FOLD"))]
        fitted = [_fit_scale_blocks(c, *scale_k) for c in cands]
        if int4 and per_expert <= 1 and tokens * top_k <= 2 * top_k:
            # a GEMV over one group (128 inputs: 16 words a column) keeps 4x fewer bytes in flight than bf16's
            # tiles of the same shape; these keep the words. At T=1 the fitted GEMV forms ran at 89-126 us on an
            # H200 against the tiled form's 47 (results/kernels/2026-11-28-session23-int4-h200)
            # (down tiles dividing I load whole 16-byte vectors; a masked last tile loads word by word)
            fitted += [_cfg(16, 8, 512, 2, 3, 16, 256, 2, 3, sort=0, fold=1, gemv1=1, deep=1),
                       _cfg(16, 8, 1024, 4, 3, 16, 256, 2, 3, sort=0, fold=1, gemv1=1, deep=1),
                       _cfg(16, 16, 512, 4, 3, 32, 256, 4, 3, sort=0, fold=1, gemv1=1, deep=1),
                       _cfg(16, 4, 1024, 2, 3, 8, 512, 2, 3, sort=0, fold=1, gemv1=1, deep=1)]
        # fp8 tl.dot takes K tiles of 32 or more
        cands = [c for i, c in enumerate(fitted) if c not in fitted[:i]
                 and not (c.get("A8") and min(c["BLOCK_K1"], c["BLOCK_K2"]) < 32)]
    return cands


def _fit_scale_blocks(cfg: Config, sbk1: int, sbk2: int) -> Config:
    """fp8 experts: K tiles narrowed until they lie inside one scale block (WSCALE 1: a scale per column, not per
    element), BLOCK_N widened by the same factor so that a tile keeps its element count (and registers)."""
    c = dict(cfg)
    for j, sbk in (("1", sbk1), ("2", sbk2)):
        while sbk and c["BLOCK_K" + j] > 16 and sbk % c["BLOCK_K" + j]:
            c["BLOCK_K" + j] //= 2
            c["BLOCK_N" + j] *= 2
    return c
