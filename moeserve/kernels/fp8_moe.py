"""Fused MoE with fp8 (e4m3) expert weights and block scales, W8A16: each fp8 weight tile is widened to the
activation dtype in the kernel and multiplied on the tensor cores; activations stay bf16. It halves the bytes of
expert weights streamed per step, which is what decode of a MoE pays for. Where a K tile lies inside one scale
block (every published checkpoint, [128, 128], and online per-row scales) the tile's product is scaled by one
scale per column (fused_moe.scale_k_tile); narrower scale blocks are dequantized element by element. The W8A8
form with per-token-group activation scales (fp8 tensor cores for prefill) is not built yet.

Same plan as kernels/fused_moe (whose row-block helpers it uses): pairs sorted by expert (moe_align), gate/up GEMM
with SiLU-and-mul -> inter1 [pairs, I], down GEMM times the routing weight -> inter2 [pairs, H], sum over K.
Scales: w13_scale [E, 2*ceil(I/bn), ceil(H/bk)] (gate blocks, then up blocks), w2_scale [E, ceil(H/bn), ceil(I/bk)];
any bn, bk (block checkpoints [128, 128]; online per-row: bn = 1, bk = the whole row). Expert map as fused_moe.
Reference: layers/quant/fp8 (dequantize, then experts_reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime
from moeserve.kernels.fused_moe import _block_rows, scale_k_tile
from moeserve.kernels.moe_align import align_pairs


@triton.jit
def _fp8_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, inter_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, map_ptr,
    num_pairs, num_experts, H, I, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_it, up_row0,
    SBN: tl.constexpr, SBK: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_MAP: tl.constexpr, TILE_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(I, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e, pair = _block_rows(pid_m, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, map_ptr,
                          BLOCK_M, True, HAS_MAP)
    if e < 0:
        return
    row_ok = pair < num_pairs
    tok = tl.where(row_ok, pair // TOPK, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + kk[None, :]
    g_ptrs = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    gs_ptrs = s_ptr + e * stride_se + (n // SBN)[None, :] * stride_sn
    us_ptrs = s_ptr + e * stride_se + (up_row0 + n // SBN)[None, :] * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = kk < H - k0
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if TILE_SCALE:  # the tile lies in one scale block along K: one scale per column, after the dot
            gs = tl.load(gs_ptrs + k0 // SBK, mask=n_ok[None, :], other=0.0)
            us = tl.load(us_ptrs + k0 // SBK, mask=n_ok[None, :], other=0.0)
            acc_g += tl.dot(a, tl.load(g_ptrs, mask=wmask, other=0.0).to(a.dtype)) * gs
            acc_u += tl.dot(a, tl.load(u_ptrs, mask=wmask, other=0.0).to(a.dtype)) * us
        else:  # a scale block narrower than the tile: dequantize element by element
            kb = ((k0 + kk) // SBK)[:, None]
            g = tl.load(g_ptrs, mask=wmask, other=0.0).to(tl.float32) * tl.load(gs_ptrs + kb, mask=wmask, other=0.0)
            u = tl.load(u_ptrs, mask=wmask, other=0.0).to(tl.float32) * tl.load(us_ptrs + kb, mask=wmask, other=0.0)
            acc_g = tl.dot(a, g.to(a.dtype), acc_g)
            acc_u = tl.dot(a, u.to(a.dtype), acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = inter_ptr + pair[:, None].to(tl.int64) * stride_it + n[None, :]
    tl.store(dst, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_down_kernel(
    inter_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, topk_w_ptr, map_ptr,
    num_pairs, num_experts, H, I, stride_it, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
    SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MAP: tl.constexpr, TILE_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e, pair = _block_rows(pid_m, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, map_ptr,
                          BLOCK_M, True, HAS_MAP)
    row_ok = pair < num_pairs
    row = tl.where(row_ok, pair, 0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    if e < 0:  # an expert held elsewhere: zero rows (the sum over K reads every pair's row)
        if HAS_MAP:
            zero = tl.zeros([BLOCK_M, BLOCK_N], out_ptr.dtype.element_ty)
            tl.store(out_ptr + row[:, None] * stride_ot + n[None, :], zero, mask=row_ok[:, None] & n_ok[None, :])
        return
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + row[:, None] * stride_it + kk[None, :]
    b_ptrs = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
    s_ptrs = s_ptr + e * stride_se + (n // SBN)[None, :] * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = kk < I - k0
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # padded rows: never-written inter rows
        if TILE_SCALE:
            bs = tl.load(s_ptrs + k0 // SBK, mask=n_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.load(b_ptrs, mask=wmask, other=0.0).to(a.dtype)) * bs
        else:
            b = tl.load(b_ptrs, mask=wmask, other=0.0).to(tl.float32) * tl.load(
                s_ptrs + ((k0 + kk) // SBK)[:, None], mask=wmask, other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc = acc * tl.load(topk_w_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def fp8_fused_moe(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, blocks: dict, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] (bf16/fp32); w13 [E, 2I, H] / w2 [E, H, I] e4m3 with their block scales; blocks
    {"w13": (bn, bk), "w2": (bn, bk)}; topk_* [T, K] -> [T, H] in x's dtype."""
    runtime.check_device("fp8_fused_moe", x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids)
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    K = topk_ids.shape[1]
    out = torch.empty_like(x)
    if T == 0:
        return out
    x = x.contiguous()
    topk_weights, topk_ids = topk_weights.contiguous(), topk_ids.contiguous()
    num_ids = E if expert_map is None else expert_map.numel()
    pairs = T * K
    bm = 16 if pairs <= 4 * num_ids else 64
    bn = 64
    (sbn1, sbk1), (sbn2, sbk2) = blocks["w13"], blocks["w2"]
    bk1, tile1 = scale_k_tile(sbk1, H, x.element_size())
    bk2, tile2 = scale_k_tile(sbk2, inter, x.element_size())
    sorted_pairs, block_expert, num_post, num_blocks = align_pairs(topk_ids, num_ids, bm)
    inter1 = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    inter2 = torch.empty(pairs, H, dtype=x.dtype, device=x.device)
    emap = expert_map if expert_map is not None else topk_ids  # a placeholder pointer when there is no map
    _fp8_gate_up_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        x, w13, w13_scale, inter1, sorted_pairs, block_expert, num_post, emap,
        pairs, num_ids, H, inter, x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0),
        w13_scale.stride(1), inter1.stride(0), w13_scale.shape[1] // 2,
        SBN=sbn1, SBK=sbk1, TOPK=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk1, HAS_MAP=expert_map is not None,
        TILE_SCALE=tile1, num_warps=4, num_stages=3)
    _fp8_down_kernel[(num_blocks * triton.cdiv(H, bn),)](
        inter1, w2, w2_scale, inter2, sorted_pairs, block_expert, num_post, topk_weights, emap,
        pairs, num_ids, H, inter, inter1.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0),
        w2_scale.stride(1), inter2.stride(0),
        SBN=sbn2, SBK=sbk2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk2, HAS_MAP=expert_map is not None,
        TILE_SCALE=tile2, num_warps=4, num_stages=3)
    torch.sum(inter2.view(T, K, H), dim=1, out=out)
    return out
