"""MLA decode over the paged latent cache, and the latent cache write, in Triton.

Cache of one layer: [num_blocks, block_size, R + rope] holding `[c_kv | k_pe]` per token (see layers/mla.py);
a token's slot is block_id * block_size + offset. Semantics: moeserve.layers.mla.mla_decode_reference.

The query arrives absorbed (q_nope @ W_UK: latent space, R values per head) with its roped part. Every head
attends to the same latents, so a program takes BLOCK_H heads of one sequence as the rows of its tile and
reads each latent tile once for all of them: scores = q_lat c^T + q_pe k_pe^T, output acc += p c (latent space;
the caller applies W_UV). The context is split into segments (split-K) so that batch 1 still fills the GPU; a
second small kernel merges them. Grid sizes depend only on tensor shapes and max_seq_len (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.attention import FP8_MAX, is_fp8, merge_segments, round_e4m3
from moeserve.kernels.autotune import DECODE_TUNING_CONTEXT, Config, bucket, decode_tuning_inputs, get_tuner

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------- cache write
@triton.jit
def _write_latent_kernel(src_ptr, cache_ptr, slot_ptr, stride_st, stride_c_blk, stride_c_tok, block_size, inv_scale,
                         L: tl.constexpr, L_P: tl.constexpr, FP8: tl.constexpr, ROUND: tl.constexpr,
                         PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, L_P)
    mask = (i < L) & (tl.broadcast_to(slot, [L_P]) >= 0)  # a block test: see attention._write_kv_kernel
    page = tl.maximum(slot, 0) // block_size
    x = tl.load(src_ptr + t * stride_st + i, mask=mask)
    if FP8:  # quantize: x / scale, saturated to e4m3's finite range
        x = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
        if ROUND:  # the interpreter's cast mis-rounds: see attention.round_e4m3
            x = round_e4m3(x)
    tl.store(cache_ptr + page * stride_c_blk + (slot % block_size) * stride_c_tok + i,
             x.to(cache_ptr.dtype.element_ty), mask=mask)


def write_latent_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_scale: float = 1.0) -> None:
    """cache[slot // page, slot % page] = latent[t] for each token t with slot >= 0. latent [T, L].
    An fp8 (e4m3) cache stores latent / kv_scale saturated to +-448 (one per-tensor scale for c_kv and k_pe)."""
    runtime.check_device("write_latent_cache", latent, cache, slot_mapping)
    _check_cache(cache)
    T, L = latent.shape
    if cache.shape[2] != L:
        raise ValueError(f"write_latent_cache: latent {tuple(latent.shape)} vs cache {tuple(cache.shape)}")
    if slot_mapping.shape != (T,):
        raise ValueError(f"write_latent_cache: slot_mapping shape {tuple(slot_mapping.shape)}, expected ({T},)")
    if latent.stride(-1) != 1:
        raise ValueError("write_latent_cache: latent needs a contiguous last dimension")
    if T == 0:
        return
    _write_latent_kernel[(T,)](latent, cache, slot_mapping, latent.stride(0), cache.stride(0), cache.stride(1),
                               cache.shape[1], 1.0 / kv_scale, L=L, L_P=runtime.next_pow2(L), FP8=is_fp8(cache),
                               ROUND=runtime.interpreting(), num_warps=4 if L >= 512 else 1,
                               **pdl.launch(latent.device, latent.shape[0]))


# ---------------------------------------------------------------------------------------------- decode
@triton.jit
def _mla_decode_kernel(
    qlat_ptr, qpe_ptr, cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, bt_ptr,
    scale_log2e, kv_scale, num_heads,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_ob, stride_oh,
    stride_c_blk, stride_c_tok, stride_bt,
    PAGE: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, P: tl.constexpr, P_P: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEG: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    seg = tl.program_id(2)
    h_ok = head < num_heads
    r = tl.arange(0, R_P)
    p = tl.arange(0, P_P)
    q_lat = tl.load(qlat_ptr + b * stride_qb + head[:, None] * stride_qh + r[None, :],
                    mask=h_ok[:, None] & (r < R)[None, :], other=0.0)
    q_pe = tl.load(qpe_ptr + b * stride_pb + head[:, None] * stride_ph + p[None, :],
                   mask=h_ok[:, None] & (p < P)[None, :], other=0.0)
    if DOT_F32:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + b)
    if NUM_SEG > 1:
        seg_len = tl.cdiv(tl.cdiv(seq_len, NUM_SEG), BLOCK_N) * BLOCK_N
        lo = seg * seg_len
        hi = tl.maximum(tl.minimum(seq_len, lo + seg_len), lo)  # empty segments stay empty
    else:
        lo = 0
        hi = seq_len

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R_P], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        row = cache_ptr + page * stride_c_blk + (pos % PAGE) * stride_c_tok
        c = tl.load(row[:, None] + r[None, :], mask=ok[:, None] & (r < R)[None, :], other=0.0)  # [N, R_P]
        k_pe = tl.load(row[:, None] + R + p[None, :], mask=ok[:, None] & (p < P)[None, :], other=0.0)
        if KV_FP8:  # dequantized as the query's dtype; kv_scale is folded into scale_log2e and the output
            c = c.to(q_lat.dtype)
            k_pe = k_pe.to(q_lat.dtype)
        if DOT_F32:
            c = c.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION) * scale_log2e
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.dot(w.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * kv_scale
    if NUM_SEG > 1:  # unnormalised partials; merge_segments combines them
        part = (b * num_heads + head) * NUM_SEG + seg
        if hi > lo:  # an empty segment leaves its partial unwritten (m = -inf tells the merge)
            tl.store(part_acc_ptr + part[:, None] * R_P + r[None, :], acc, mask=h_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=h_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_ok)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + r[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & (r < R)[None, :])


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    *,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged latents, in latent space. Returns [B, H, R].
    An fp8 cache is read as latent * kv_scale (a host float: CUDA-graph safe).

    q_lat [B, H, R] (q_nope absorbed through W_UK), q_pe [B, H, rope]; cache [blocks, page, R + rope];
    seq_lens [B] int32 (context incl. this token, already written); block_tables [B, max_blocks] int32.
    max_seq_len only bounds the context (decode graphs pass max_model_len).
    """
    runtime.check_device("mla_decode", q_lat, q_pe, cache, seq_lens, block_tables)
    _check_cache(cache)
    B, H, R = q_lat.shape
    P = cache.shape[2] - R
    if q_pe.shape != (B, H, P) or P < 1:
        raise ValueError(f"mla_decode: q_lat {tuple(q_lat.shape)} and q_pe {tuple(q_pe.shape)} do not fit "
                         f"cache {tuple(cache.shape)} (last dim must be R + rope)")
    if seq_lens.shape != (B,) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"mla_decode: seq_lens {tuple(seq_lens.shape)}, block_tables {tuple(block_tables.shape)} "
                         f"disagree with batch {B}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("mla_decode: q_lat, q_pe and block_tables need a contiguous last dimension")
    if out is None:
        out = q_lat.new_empty(B, H, R)
    elif out.shape != (B, H, R) or out.stride(-1) != 1:
        raise ValueError(f"mla_decode: out {tuple(out.shape)} must be ({B}, {H}, {R}), last dim contiguous")
    if B == 0:
        return out
    shape = DecodeShape(B, H, R, P, cache.shape[1], q_lat.dtype, max_seq_len, is_fp8(cache))
    timing = {}  # timed on long contexts (autotune.decode_tuning_inputs), made only if it is timed

    def run(c):
        if not timing:
            timing["in"] = decode_tuning_inputs(seq_lens, block_tables, cache.shape[1], cache.shape[0])
        _launch(c, shape, q_lat, q_pe, cache, *timing["in"], scale, out, kv_scale)

    cfg = get_tuner().choose("mla_decode", shape.key(), _candidates(shape), run, _candidates(shape)[1])
    _launch(cfg, shape, q_lat, q_pe, cache, seq_lens, block_tables, scale, out, kv_scale)
    return out


class DecodeShape:
    """What the launch and the tuning key depend on (host-side ints only)."""

    def __init__(self, B, H, R, P, page, dtype, max_seq_len, kv_fp8=False):
        self.B, self.H, self.R, self.P, self.page = B, H, R, P, page
        self.dtype, self.max_seq_len, self.kv_fp8 = dtype, max_seq_len, kv_fp8

    def key(self) -> str:
        return (f"B={bucket(self.B)}|ctx={DECODE_TUNING_CONTEXT}|H={self.H}|R={self.R}|P={self.P}|page={self.page}|"
                f"{str(self.dtype).removeprefix('torch.')}" + ("|kv=fp8" if self.kv_fp8 else ""))


def _candidates(s: DecodeShape) -> list[Config]:
    cands = [
        {"BLOCK_N": 16, "BLOCK_H": 16, "SEG_X": 1, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 32, "BLOCK_H": 16, "SEG_X": 1, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 32, "BLOCK_H": 16, "SEG_X": 2, "num_warps": 8, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_H": 16, "SEG_X": 1, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 32, "BLOCK_H": 32, "SEG_X": 1, "num_warps": 8, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_H": 16, "SEG_X": 1, "num_warps": 8, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_H": 32, "SEG_X": 1, "num_warps": 8, "num_stages": 1},
    ]
    if s.dtype.itemsize > 2 or s.R > 512:  # keep the latent tiles inside shared memory
        for c in cands:
            c["BLOCK_N"] = max(16, c["BLOCK_N"] // 2)
    return cands


def _num_segments(s: DecodeShape, cfg: Config, head_blocks: int, device: torch.device) -> int:
    """Split each context until there are about two programs per multiprocessor."""
    want = runtime.next_pow2(-(-2 * runtime.num_sms(device) // (s.B * head_blocks))) * cfg["SEG_X"]
    most = runtime.next_pow2(max(1, -(-s.max_seq_len // cfg["BLOCK_N"])))
    return max(1, min(want, most, 64))


def _launch(cfg, s: DecodeShape, q_lat, q_pe, cache, seq_lens, block_tables, scale, out, kv_scale=1.0) -> None:
    block_h = max(16, min(cfg["BLOCK_H"], runtime.next_pow2(s.H)))
    head_blocks = -(-s.H // block_h)
    r_p, p_p = max(16, runtime.next_pow2(s.R)), max(16, runtime.next_pow2(s.P))
    segs = _num_segments(s, cfg, head_blocks, q_lat.device)
    if segs > 1:
        part_acc = torch.empty(s.B * s.H * segs * r_p, dtype=torch.float32, device=q_lat.device)
        part_ml = torch.empty(s.B * s.H * segs * 2, dtype=torch.float32, device=q_lat.device)
    else:
        part_acc = part_ml = out  # unused
    dot_f32, precision = runtime.dot_flags(q_lat.dtype)
    _mla_decode_kernel[(s.B, head_blocks, segs)](
        q_lat, q_pe, cache, out, part_acc, part_ml, seq_lens, block_tables,
        scale * LOG2E * (kv_scale if s.kv_fp8 else 1.0), float(kv_scale), s.H,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        PAGE=s.page, R=s.R, R_P=r_p, P=s.P, P_P=p_p, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], NUM_SEG=segs,
        DOT_F32=dot_f32, PRECISION=precision, KV_FP8=s.kv_fp8, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl.launch(q_lat.device, q_lat.shape[0]),
    )
    if segs > 1:
        merge_segments(out, part_acc, part_ml, s.B, s.H, s.R, r_p, segs)


def _check_cache(cache: torch.Tensor) -> None:
    if cache.dim() != 3:
        raise ValueError(f"latent cache must be [num_blocks, block_size, R + rope], got {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError("latent cache needs a contiguous last dimension")
