"""Paged KV-cache write and paged attention (prefill with cached prefixes, decode, mixed batches) in Triton.

Cache of one layer: kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V); a token's slot
is block_id * block_size + offset. Semantics: moeserve.kernels.reference.

One attention kernel serves every batch. A program owns BLOCK_Q query tokens of one sequence and one kv head, and
packs those tokens times the HP query heads that share the kv head into the rows of its tile, so K/V is read once
per group (GQA). Pure decode (max_query_len == 1) runs one program per (sequence, kv head, context segment) and
merges the segments in a second small kernel (split-K), so batch 1 still fills the GPU. Decode rows that share
a prefix of pages (prefix caching) can be given as groups: a prefix kernel reads each group's shared keys once for
all its rows, the decode kernel each row's own, and their partial softmaxes merge. Every grid size depends only on
tensor shapes and max_query_len; real lengths are read on the device (CUDA-graph safe, no host syncs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.autotune import DECODE_TUNING_CONTEXT, Config, bucket, decode_tuning_inputs, get_tuner

LOG2E = 1.4426950408889634
FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn


def is_fp8(cache: torch.Tensor) -> bool:
    """An fp8 KV cache (float8_e4m3fn): written quantized, read dequantized by per-tensor scales."""
    if cache.dtype == torch.float8_e4m3fn:
        return True
    if cache.dtype.itemsize == 1 and cache.dtype.is_floating_point:
        raise ValueError(f"KV cache dtype {cache.dtype} is not supported (fp8 means float8_e4m3fn)")
    return False


# ---------------------------------------------------------------------------------------------- KV write
@triton.jit
def round_e4m3(x):
    """x (fp32, already saturated) rounded to the e4m3 grid: 3 mantissa bits, subnormal step 2^-9. Only under the
    interpreter (Triton 3.9's), whose fp32 -> fp8e4nv cast drops the carry of a round-up into the exponent
    (1.99 -> 1.0, 7.9 -> 4.0): rounded first, the cast is exact. Compiled kernels cast directly (cvt.rn)."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 2.0 ** -12))), -6.0)
    step = tl.exp2(e - 3.0)
    return tl.floor(x / step + 0.5) * step


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    block_size, k_inv_scale, v_inv_scale,
    KVH: tl.constexpr, D: tl.constexpr, KVH_P: tl.constexpr, D_P: tl.constexpr, FP8: tl.constexpr,
    ROUND: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, KVH_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    # The slot test is made on a block, not a scalar: Triton 3.9's interpreter splats a scalar comparison with its
    # operands' int64 dtype, so `block & (slot >= 0)` came out int32 and was refused as a mask. Same code on GPU.
    mask = (h < KVH) & (d < D) & (tl.broadcast_to(slot, [KVH_P, D_P]) >= 0)
    page = tl.maximum(slot, 0) // block_size
    dst = cache_ptr + page * stride_c_blk + (slot % block_size) * stride_c_tok + h * stride_c_head + d
    kx = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    vx = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # quantize: x / scale, saturated to e4m3's finite range (a plain cast turns overflow into NaN)
        kx = tl.clamp(kx.to(tl.float32) * k_inv_scale, -FP8_MAX, FP8_MAX)
        vx = tl.clamp(vx.to(tl.float32) * v_inv_scale, -FP8_MAX, FP8_MAX)
        if ROUND:
            kx = round_e4m3(kx)
            vx = round_e4m3(vx)
    tl.store(dst, kx.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, vx.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """kv_cache[0/1] at each token's slot = k/v. k, v: [T, KVH, D]; slot_mapping [T] int64, < 0 = skip.
    An fp8 (e4m3) cache stores k / k_scale and v / v_scale, saturated to +-448 (per-tensor scales, host floats).

    No block sizes to tune: one program copies one token's KVH x D values of K and of V.
    """
    runtime.check_device("write_kv_cache", k, v, kv_cache, slot_mapping)
    _check_cache(kv_cache)
    T, kvh, d = k.shape
    if v.shape != k.shape or kv_cache.shape[3:] != (kvh, d):
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)}, v {tuple(v.shape)} vs cache {tuple(kv_cache.shape)}")
    if slot_mapping.shape != (T,):
        raise ValueError(f"write_kv_cache: slot_mapping shape {tuple(slot_mapping.shape)}, expected ({T},)")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("write_kv_cache: k and v need a contiguous last dimension")
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], 1.0 / k_scale, 1.0 / v_scale,
        KVH=kvh, D=d, KVH_P=runtime.next_pow2(kvh), D_P=runtime.next_pow2(d), FP8=is_fp8(kv_cache),
        ROUND=runtime.interpreting(),
        num_warps=1 if kvh * d <= 512 else 4,
        **pdl.launch(k.device, k.shape[0]),
    )


# ---------------------------------------------------------------------------------------------- attention
@triton.jit
def _attend_keys(q, q_pos, m_i, l_i, acc, kv_base, bt_row, lo, hi, scale_log2e, d,
                 stride_c_kv, stride_c_blk, stride_c_tok,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                 MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """Online softmax over keys [lo, hi) of one sequence's pages. MASKED=False: every key in whole tiles is
    visible to every row (no bounds or causal mask); MASKED=True: tail and diagonal tiles."""
    d_ok = d < D
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        if MASKED:
            p_ok = pos < hi
            page = tl.load(bt_row + pos // PAGE, mask=p_ok, other=0).to(tl.int64)
            kv_mask = p_ok[:, None] & d_ok[None, :]
        else:
            page = tl.load(bt_row + pos // PAGE).to(tl.int64)
            kv_mask = d_ok[None, :]
        off = page * stride_c_blk + (pos % PAGE) * stride_c_tok
        if MASKED or D != D_P:
            k = tl.load(kv_base + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(kv_base + stride_c_kv + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(kv_base + off[:, None] + d[None, :])
            v = tl.load(kv_base + stride_c_kv + off[:, None] + d[None, :])
        if KV_FP8:  # dequantized as q's dtype; k_scale is folded into scale_log2e, v_scale into the output
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        if MASKED:
            s = tl.where(p_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = m_new
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attend_range(q, q_pos, kv_base, bt_row, k_lo, k_full, k_hi, scale_log2e, d,
                  stride_c_kv, stride_c_blk, stride_c_tok,
                  ROWS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                  DOT_F32: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """(m, l, acc) of the ROWS query rows over keys [k_lo, k_hi) from a fresh state: the whole tiles [k_lo, k_full)
    without a mask, then the rest masked (bounds and causality)."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_P], tl.float32)
    m_i, l_i, acc = _attend_keys(q, q_pos, m_i, l_i, acc, kv_base, bt_row, k_lo, k_full, scale_log2e, d,
                                 stride_c_kv, stride_c_blk, stride_c_tok,
                                 PAGE, BLOCK_N, D, D_P, False, DOT_F32, PRECISION, KV_FP8)
    return _attend_keys(q, q_pos, m_i, l_i, acc, kv_base, bt_row, k_full, k_hi, scale_log2e, d,
                        stride_c_kv, stride_c_blk, stride_c_tok,
                        PAGE, BLOCK_N, D, D_P, True, DOT_F32, PRECISION, KV_FP8)


@triton.jit
def _tile_owner(start_ptr, n, tile, PER: tl.constexpr):
    """Runs of items laid out as tiles of PER (sequences' query tokens, a group's rows): run i's tiles start at
    start[i] // PER + i, an upper bound on the tiles before it. The last of the n runs whose first tile is <= tile."""
    lo = tile * 0
    hi = lo + n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(start_ptr + mid) // PER + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    return lo


@triton.jit(do_not_specialize=["num_seqs", "seg_base", "seg_stride"])
def _attn_kernel(
    q_ptr, kv_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, row_prefix_ptr,
    scale_log2e, v_scale, num_seqs, seg_base, seg_stride,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    stride_bt, num_heads,
    PAGE: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, NUM_SEG: tl.constexpr, DECODE: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    # seg_base > 0 (decode beside _prefix_attn_kernel): a row's keys start past its group's shared prefix
    # (row_prefix[b] tokens, 0 outside any group); its partials go to slots seg_base.. of seg_stride per (row, head),
    # the prefix kernel's to slots 0..seg_base-1; or, with one segment (seg_stride 1), the kernel folds the prefix's
    # slots (seg_base of them per (row, head)) into its own and writes the output. Otherwise seg_base = 0 and
    # seg_stride = NUM_SEG. Both are runtime values (branches uniform over the grid), so the grouped path compiles
    # no kernel of its own.
    pdl_begin(PDL)
    if DECODE:
        tile = tl.program_id(0)
    else:  # reversed: late query tiles of long sequences have the most keys, start them first
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    if DECODE:
        b = tile
    else:
        b = _tile_owner(qsl_ptr, num_seqs, tile, BLOCK_Q)
    q_begin = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - q_begin
    if DECODE:
        q0 = 0
    else:
        q0 = (tile - (q_begin // BLOCK_Q + b)) * BLOCK_Q
    if q0 >= n_q:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_start = seq_len - n_q  # absolute position of the sequence's first new token

    rows = tl.arange(0, BLOCK_Q * HP)
    q_idx = q0 + rows // HP
    hh = rows % HP
    row_ok = (q_idx < n_q) & (hh < G)
    head = kvh * G + hh
    q_pos = ctx_start + q_idx
    d = tl.arange(0, D_P)
    d_ok = d < D
    tok = (q_begin + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    kv_end = tl.minimum(seq_len, ctx_start + tl.minimum(q0 + BLOCK_Q, n_q))  # past the last visible key
    if seg_base > 0:
        k_first = tl.load(row_prefix_ptr + b)  # the shared prefix's keys are the prefix kernel's
    else:
        k_first = 0
    if NUM_SEG > 1:
        seg_len = tl.cdiv(tl.cdiv(kv_end - k_first, NUM_SEG), BLOCK_N) * BLOCK_N
        k_lo = k_first + seg * seg_len
        k_hi = tl.maximum(tl.minimum(kv_end, k_lo + seg_len), k_lo)  # empty segments stay empty
    else:
        k_lo = k_first
        k_hi = kv_end

    kv_base = kv_ptr + kvh * stride_c_head
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # Keys before the tile's first query position are visible to every row: whole tiles of them skip the mask.
    k_full = tl.minimum(tl.maximum(ctx_start + q0 + 1, k_lo), k_hi)
    k_full = k_lo + (k_full - k_lo) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _attend_range(q, q_pos, kv_base, bt_row, k_lo, k_full, k_hi, scale_log2e, d,
                                  stride_c_kv, stride_c_blk, stride_c_tok,
                                  BLOCK_Q * HP, PAGE, BLOCK_N, D, D_P, DOT_F32, PRECISION, KV_FP8)

    if KV_FP8:
        acc = acc * v_scale
    if NUM_SEG == 1:
        if (seg_base > 0) & (seg_stride == 1) & (k_first > 0):
            # one segment: fold the group's prefix partials (slots 0..seg_base-1) in here, no merge
            for s in range(seg_base):
                part = (tok * num_heads + head) * seg_base + s
                pm = tl.load(part_ml_ptr + part * 2, mask=row_ok, other=float("-inf"))
                pl = tl.load(part_ml_ptr + part * 2 + 1, mask=row_ok, other=0.0)
                live = pm != float("-inf")  # an empty split wrote no acc
                pacc = tl.load(part_acc_ptr + part[:, None] * D_P + d[None, :], mask=(row_ok & live)[:, None],
                               other=0.0)
                m_new = tl.maximum(m_i, pm)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                a_own = tl.exp2(m_i - m_safe)
                a_pre = tl.where(live, tl.exp2(pm - m_safe), 0.0)
                acc = acc * a_own[:, None] + pacc * a_pre[:, None]
                l_i = l_i * a_own + tl.where(live, pl, 0.0) * a_pre
                m_i = m_new
    if seg_stride > 1:  # unnormalised partials; _merge_segments_kernel combines them
        part = (tok * num_heads + head) * seg_stride + seg_base + seg
        if k_hi > k_lo:  # an empty segment leaves its partial unwritten (m = -inf tells the merge)
            tl.store(part_acc_ptr + part[:, None] * D_P + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        if (seg_base > 0) & (seg == 0) & (k_first == 0):  # a row in no group: the prefix slots are empty
            for s in range(seg_base):
                tl.store(part_ml_ptr + (part - seg_base + s) * 2, tl.full([BLOCK_Q * HP], float("-inf"), tl.float32),
                         mask=row_ok)
                tl.store(part_ml_ptr + (part - seg_base + s) * 2 + 1, tl.zeros([BLOCK_Q * HP], tl.float32), mask=row_ok)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_seg", "seg_stride"])
def _prefix_attn_kernel(
    q_ptr, kv_ptr, part_acc_ptr, part_ml_ptr,
    rows_ptr, start_ptr, plen_ptr, bt_ptr,
    scale_log2e, v_scale, num_seg, seg_stride,
    stride_qt, stride_qh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    stride_bt, num_heads,
    NUM_GROUPS: tl.constexpr, PAGE: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, MPT: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Decode rows that share a prefix's pages (a group) attend over that prefix together: a program packs MPT
    rows of one group x the HP query heads of one kv head into its tile and reads each prefix key once for all of
    them, split over num_seg programs along the keys. Writes unnormalised partials to slots 0..num_seg-1 of
    seg_stride per (row, head); _attn_kernel (seg_base = num_seg) writes the rows' own keys beside them.
    Group g: rows[start[g]:start[g+1]] (decode rows: row index = token index), plen[g] prefix tokens, read
    through the block table of its first row. Groups past the real ones are empty (start repeats)."""
    pdl_begin(PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    g = _tile_owner(start_ptr, NUM_GROUPS, tile, MPT)
    g0 = tl.load(start_ptr + g)
    n = tl.load(start_ptr + g + 1) - g0
    m0 = (tile - (g0 // MPT + g)) * MPT
    if m0 >= n:
        return
    plen = tl.load(plen_ptr + g)
    seg_len = tl.cdiv(tl.cdiv(plen, num_seg), BLOCK_N) * BLOCK_N
    k_lo = seg * seg_len
    k_hi = tl.maximum(tl.minimum(plen, k_lo + seg_len), k_lo)

    r = tl.arange(0, MPT * HP)
    member = m0 + r // HP
    hh = r % HP
    row_ok = (member < n) & (hh < G)
    tok = tl.load(rows_ptr + g0 + member, mask=row_ok, other=0).to(tl.int64)
    head = kvh * G + hh
    d = tl.arange(0, D_P)
    d_ok = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = tl.full([MPT * HP], 0, tl.int32) + plen  # every prefix key is visible to every row
    kv_base = kv_ptr + kvh * stride_c_head
    bt_row = bt_ptr + tl.load(rows_ptr + g0).to(tl.int64) * stride_bt
    k_full = k_lo + (k_hi - k_lo) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _attend_range(q, q_pos, kv_base, bt_row, k_lo, k_full, k_hi, scale_log2e, d,
                                  stride_c_kv, stride_c_blk, stride_c_tok,
                                  MPT * HP, PAGE, BLOCK_N, D, D_P, DOT_F32, PRECISION, KV_FP8)
    if KV_FP8:
        acc = acc * v_scale
    part = (tok * num_heads + head) * seg_stride + seg
    if k_hi > k_lo:
        tl.store(part_acc_ptr + part[:, None] * D_P + d[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_seg"])
def _merge_segments_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_ot, stride_oh, num_heads, num_seg,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_D: tl.constexpr, SEG_P2: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, SEG_P2)
    part = (t * num_heads + h) * num_seg + s
    m = tl.load(part_ml_ptr + part * 2, mask=s < num_seg, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=s < num_seg, other=0.0)
    live = m != float("-inf")  # empty segments wrote no partial: never read it
    m_max = tl.max(m, 0)
    w = tl.where(live, tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)), 0.0)
    denom = tl.sum(w * tl.where(live, l, 0.0), 0)
    acc = tl.load(part_acc_ptr + part[:, None] * D_P + d[None, :], mask=live[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def merge_segments(out: torch.Tensor, part_acc: torch.Tensor, part_ml: torch.Tensor, rows: int, num_heads: int,
                   d: int, d_p: int, segs: int) -> None:
    """out[t, h, :d] = the log-sum-exp merge of the `segs` partials of (t, h) that the split-K decode kernels
    wrote (fp32 acc rows of d_p values, then (m, l) in log2 units). Each program takes a slice of the d_p columns
    so that its segs x columns tile stays in registers (64 segments x 512 latent columns did not: 51 us per call)."""
    seg_p2 = runtime.next_pow2(segs)
    block_d = max(16, min(d_p, 4096 // seg_p2))
    _merge_segments_kernel[(rows, num_heads, d_p // block_d)](
        out, part_acc, part_ml, out.stride(0), out.stride(1), num_heads, segs,
        D=d, D_P=d_p, BLOCK_D=block_d, SEG_P2=seg_p2, num_warps=4,
        **pdl.launch(out.device, out.shape[0]),
    )


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    shared=None,
) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its paged context. Returns [T, num_heads, head_dim].
    An fp8 cache is read as k * k_scale, v * v_scale (per-tensor host floats: CUDA-graph safe).

    q: [T, H, D]; query_start_loc [B+1] int32; seq_lens [B] int32 (context incl. the new tokens, already written
    to the cache); block_tables [B, max_blocks] int32. max_query_len picks the kernel (1 = decode) and must bound
    the real query lengths; max_seq_len is only an upper bound (decode graphs pass max_model_len).
    shared (decode only): rows grouped by a shared prefix of pages, whose keys are read once per group: an
    engine/shared_prefix.SharedPrefixes (device int32 tensors rows, start, plen, row_prefix).
    """
    runtime.check_device("paged_attention", q, kv_cache, query_start_loc, seq_lens, block_tables)
    _check_cache(kv_cache)
    T, num_heads, d = q.shape
    _, _, page, kv_heads, d_cache = kv_cache.shape
    B = seq_lens.shape[0]
    if d_cache != d or num_heads % kv_heads:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit cache {tuple(kv_cache.shape)}")
    if query_start_loc.shape != (B + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"paged_attention: query_start_loc {tuple(query_start_loc.shape)}, seq_lens ({B},), "
                         f"block_tables {tuple(block_tables.shape)} disagree")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("paged_attention: q and block_tables need a contiguous last dimension")
    if max_query_len < 1:
        raise ValueError(f"paged_attention: max_query_len must be >= 1, got {max_query_len}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"paged_attention: out {tuple(out.shape)} must match q {tuple(q.shape)}, last dim contiguous")
    if T == 0 or B == 0:
        return out

    group = num_heads // kv_heads
    decode = max_query_len == 1
    if shared is not None and not decode:
        raise ValueError("paged_attention: shared prefixes are for decode batches (max_query_len 1)")
    shape = AttnShape(T, B, group, d, page, kv_heads, q.dtype, decode, max_seq_len, is_fp8(kv_cache))
    scales = (k_scale, v_scale)
    timing = {}  # decode: timed on long contexts (autotune.decode_tuning_inputs), made only if it is timed

    def run(c):
        lens, tables = seq_lens, block_tables
        if decode:
            if not timing:
                timing["in"] = decode_tuning_inputs(seq_lens, block_tables, page, kv_cache.shape[1])
            lens, tables = timing["in"]
        _launch_attention(c, shape, q, kv_cache, query_start_loc, lens, tables, scale, out, scales)

    cfg = get_tuner().choose("paged_attention", shape.key(), _attn_candidates(shape), run, _attn_default(shape))
    _launch_attention(cfg, shape, q, kv_cache, query_start_loc, seq_lens, block_tables, scale, out, scales, shared)
    return out


class AttnShape:
    """What the launch and the tuning key depend on (all host-side ints: no device reads)."""

    def __init__(self, T, B, group, d, page, kv_heads, dtype, decode, max_seq_len, kv_fp8=False):
        self.T, self.B, self.group, self.d, self.page = T, B, group, d, page
        self.kv_heads, self.dtype, self.decode, self.max_seq_len = kv_heads, dtype, decode, max_seq_len
        self.kv_fp8 = kv_fp8

    def key(self) -> str:
        mode = (f"decode|B={bucket(self.B)}|ctx={DECODE_TUNING_CONTEXT}" if self.decode
                else f"prefill|T={bucket(self.T, 16384)}")
        kv = "|kv=fp8" if self.kv_fp8 else ""
        return f"{mode}|G={self.group}|D={self.d}|page={self.page}|{str(self.dtype).removeprefix('torch.')}{kv}"


def _attn_candidates(s: AttnShape) -> list[Config]:
    cands = _attn_candidates_16bit(s)
    if s.dtype.itemsize > 2 or s.d > 128:  # keep the pipelined K/V tiles inside shared memory
        for c in cands:
            c["BLOCK_N"] = max(16, c["BLOCK_N"] // 2)
    return cands


def _attn_candidates_16bit(s: AttnShape) -> list[Config]:
    if s.decode:
        return [
            {"BLOCK_N": 16, "SEG_X": 1, "num_warps": 4, "num_stages": 2},
            {"BLOCK_N": 32, "SEG_X": 1, "num_warps": 4, "num_stages": 3},
            {"BLOCK_N": 64, "SEG_X": 1, "num_warps": 4, "num_stages": 3},
            {"BLOCK_N": 32, "SEG_X": 2, "num_warps": 4, "num_stages": 3},
            {"BLOCK_N": 64, "SEG_X": 2, "num_warps": 8, "num_stages": 2},
            {"BLOCK_N": 64, "SEG_X": 1, "num_warps": 4, "num_stages": 4},
            {"BLOCK_N": 128, "SEG_X": 1, "num_warps": 8, "num_stages": 3},
        ]
    return [
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    ]


def _attn_default(s: AttnShape) -> Config:
    return _attn_candidates(s)[1]


def _num_segments(s: AttnShape, cfg: Config, device: torch.device) -> int:
    """Split the context of decode sequences until there are about two programs per multiprocessor."""
    if not s.decode:
        return 1
    want = runtime.next_pow2(-(-2 * runtime.num_sms(device) // (s.B * s.kv_heads))) * cfg["SEG_X"]
    most = runtime.next_pow2(max(1, -(-s.max_seq_len // cfg["BLOCK_N"])))
    return max(1, min(want, most, 64))


def _launch_attention(cfg, s: AttnShape, q, kv_cache, qsl, seq_lens, block_tables, scale, out,
                      scales=(1.0, 1.0), shared=None) -> None:
    num_heads = q.shape[1]
    hp = runtime.next_pow2(s.group)
    d_p = max(16, runtime.next_pow2(s.d))
    if s.decode:
        block_q, hp = 1, max(hp, 16)  # tl.dot needs >= 16 rows
        grid0 = s.B
    else:
        block_q = max(1, cfg["BLOCK_M"] // hp)
        hp = max(hp, 16 // block_q)
        grid0 = s.T // block_q + s.B
    segs = _num_segments(s, cfg, q.device)
    prefix_segs = prefix_splits(s.B, segs) if shared is not None else 0  # the shared prefix's key splits
    # One segment per row beside the groups: the decode kernel folds the prefix partials into its own keys and
    # writes the output (slots: the prefix's only, no merge). Several: every segment's partial, then the merge.
    fold = shared is not None and segs == 1
    slots = prefix_segs if fold else prefix_segs + segs
    if slots > 1 or fold:
        part_acc = torch.empty(s.T * num_heads * slots * d_p, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(s.T * num_heads * slots * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    dot_f32, precision = runtime.dot_flags(q.dtype)
    scale_log2e = scale * LOG2E * (scales[0] if s.kv_fp8 else 1.0)
    if shared is not None:
        _launch_prefix(cfg, s, q, kv_cache, block_tables, scale_log2e, float(scales[1]), part_acc, part_ml,
                       shared, prefix_segs, slots, d_p)
    _attn_kernel[(grid0, s.kv_heads, segs)](
        q, kv_cache, out, part_acc, part_ml,
        qsl, seq_lens, block_tables, shared.row_prefix if shared is not None else seq_lens,
        scale_log2e, float(scales[1]), s.B, prefix_segs, 1 if fold else slots,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), num_heads,
        PAGE=s.page, G=s.group, HP=hp, BLOCK_Q=block_q, BLOCK_N=cfg["BLOCK_N"], D=s.d, D_P=d_p,
        NUM_SEG=segs, DECODE=s.decode, DOT_F32=dot_f32, PRECISION=precision, KV_FP8=s.kv_fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl.launch(q.device, q.shape[0]),
    )
    if slots > 1 and not fold:
        merge_segments(out, part_acc, part_ml, s.T, num_heads, s.d, d_p, slots)


# The prefix kernel's launch: tile rows (group members x the kv head's query heads), key tile, warps, stages, and
# key splits (0: max(2, the decode kernel's segments)). Not autotuned: at capture the groups are empty, and the
# groups of a real step are not known before it runs. From bench_kernels --only shared_prefix on an H100 (8 groups,
# 2048 shared keys): 64-row tiles were best up to 128 rows of batch, 128-row tiles with 8 warps at 256 (92.6 vs
# 111 us). PREFIX_CONFIG, when set (the benchmark's sweep), overrides both.
PREFIX_CONFIG: dict = {}


def prefix_launch(batch: int) -> dict:
    if PREFIX_CONFIG:
        return PREFIX_CONFIG
    if batch >= 256:
        return {"ROWS": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "SPLITS": 0}
    return {"ROWS": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "SPLITS": 0}


def prefix_splits(batch: int, segs: int) -> int:
    return prefix_launch(batch)["SPLITS"] or max(2, segs)


def _launch_prefix(cfg, s: AttnShape, q, kv_cache, block_tables, scale_log2e, v_scale, part_acc, part_ml,
                   shared, prefix_segs: int, slots: int, d_p: int) -> None:
    """_prefix_attn_kernel over every group, in tiles of prefix_launch's rows (halved past head_dim 128, and its
    key tile for 32-bit inputs: the fp32 accumulator and the K/V stages stay on chip)."""
    pc = prefix_launch(s.B)
    hp = runtime.next_pow2(s.group)
    rows = pc["ROWS"] if d_p <= 128 else pc["ROWS"] // 2
    mpt = max(1, rows // hp)
    hp = max(hp, 16 // mpt)  # tl.dot needs >= 16 rows
    num_groups = shared.start.shape[0] - 1
    block_n = pc["BLOCK_N"] if (q.dtype.itemsize <= 2 and d_p <= 128) else pc["BLOCK_N"] // 2
    dot_f32, precision = runtime.dot_flags(q.dtype)
    _prefix_attn_kernel[(-(-s.B // mpt) + num_groups, s.kv_heads, prefix_segs)](
        q, kv_cache, part_acc, part_ml,
        shared.rows, shared.start, shared.plen, block_tables,
        scale_log2e, v_scale, prefix_segs, slots,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), q.shape[1],
        NUM_GROUPS=num_groups, PAGE=s.page, G=s.group, HP=hp, MPT=mpt, BLOCK_N=block_n, D=s.d, D_P=d_p,
        DOT_F32=dot_f32, PRECISION=precision, KV_FP8=s.kv_fp8,
        num_warps=pc["num_warps"], num_stages=pc["num_stages"],
        **pdl.launch(q.device, q.shape[0]),
    )


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache needs a contiguous last dimension")
