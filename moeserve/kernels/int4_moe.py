"""Fused MoE with int4 (W4A16) expert weights: the 4-bit codes are unpacked and dequantized in the kernel
((q - zero) * scale per group of G inputs -> the activation dtype) and multiplied on the tensor cores; activations
stay bf16. A quarter of the bf16 expert bytes streamed per step, which is what MoE decode pays for (Kimi K2.5 ships
its routed experts this way).

Same plan as kernels/fused_moe (its row-block helper): pairs sorted by expert (moe_align),
gate/up GEMM with SiLU-and-mul -> inter1 [pairs, I], down GEMM times the routing weight -> inter2 [pairs, H], sum
over K. Weights in layers/quant/int4's in-memory layout: w13 packed int32 [E, 2I, H/8] (gate rows, then up rows),
scales fp32 / zeros uint8 [E, 2I, H/G]; w2 [E, H, I/8], [E, H, I/G]. Expert map as fused_moe.
Where a K tile lies inside one group (scale_k_tile: Kimi K2.5's 32, AWQ/GPTQ's 128) the codes minus
their zero go through the dot and the product is scaled once per column, as fused_moe does for fp8
scale blocks; narrower groups keep the element-wise path. Reference: layers/quant/int4 (dequantize, then
experts_reference). Not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime
from moeserve.kernels.fused_moe import _block_rows
from moeserve.kernels.moe_align import align_pairs


def scale_k_tile(scale_k: int, k: int, elem_bytes: int) -> tuple[int, bool]:
    """BLOCK_K of the int4 expert kernels and whether each K tile lies inside one quantization group of `scale_k`
    inputs: the widest tile (64; 32 for fp32 activations; at least 16 for tl.dot) that divides it, or any tile
    when one group spans all k inputs. Inside one group a kernel scales each tile's product once per column
    instead of gathering a scale per weight element (such gathers once made fp8 R1's experts ~16x slower than
    their bytes)."""
    widest = 32 if elem_bytes > 2 else 64
    if scale_k >= k:
        return widest, True
    for bk in (64, 32, 16):
        if bk <= widest and scale_k % bk == 0:
            return bk, True
    return widest, False


@triton.jit
def _w4_tile(w_ptrs, s_ptrs, z_ptrs, k, wmask, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """[BLOCK_K, BLOCK_N] fp32 tile: w_ptrs at each column's word row start, s/z_ptrs at its group row start."""
    words = tl.load(w_ptrs + (k // 8)[:, None], mask=wmask, other=0)
    q = (words >> ((k % 8) * 4)[:, None]) & 0xF
    s = tl.load(s_ptrs + (k // GROUP)[:, None], mask=wmask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptrs + (k // GROUP)[:, None], mask=wmask, other=0).to(tl.float32)
        return (q.to(tl.float32) - z) * s
    return (q.to(tl.float32) - 8.0) * s


@triton.jit
def _w4_dot(acc, a, w_ptrs, s_ptrs, z_ptrs, k, k0, wmask, n_ok, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
            TILE_SCALE: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ the dequantized tile. TILE_SCALE (the K tile inside one group): the tile's codes minus their
    zero (small integers, exact in bf16) go through the dot and the product is scaled once per column, instead
    of gathering a scale (and a zero) for every element."""
    if TILE_SCALE:
        words = tl.load(w_ptrs + (k // 8)[:, None], mask=wmask, other=0)
        q = ((words >> ((k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        s = tl.load(s_ptrs + k0 // GROUP, mask=n_ok[None, :], other=0.0).to(tl.float32)
        if HAS_ZEROS:
            q = q - tl.load(z_ptrs + k0 // GROUP, mask=n_ok[None, :], other=0).to(tl.float32)
        else:
            q = q - 8.0
        q = tl.where(wmask, q, 0.0)
        if DOT_F32:
            return acc + tl.dot(a.to(tl.float32), q, input_precision="ieee") * s
        return acc + tl.dot(a, q.to(a.dtype)) * s
    w = _w4_tile(w_ptrs, s_ptrs, z_ptrs, k, wmask, GROUP, HAS_ZEROS)
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def _int4_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, inter_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, map_ptr,
    num_pairs, num_experts, H, I, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_it,
    GROUP: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MAP: tl.constexpr, DOT_F32: tl.constexpr, HAS_ZEROS: tl.constexpr, TILE_SCALE: tl.constexpr,
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
    g_w = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn
    u_w = g_w + I * stride_wn
    g_s = e * stride_se + n[None, :].to(tl.int64) * stride_sn
    u_s = g_s + I * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        k_ok = k < H
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :], mask=k_ok[None, :], other=0.0)
        acc_g = _w4_dot(acc_g, a, g_w, s_ptr + g_s, z_ptr + g_s, k, k0, wmask, n_ok, GROUP, HAS_ZEROS, TILE_SCALE,
                        DOT_F32)
        acc_u = _w4_dot(acc_u, a, u_w, s_ptr + u_s, z_ptr + u_s, k, k0, wmask, n_ok, GROUP, HAS_ZEROS, TILE_SCALE,
                        DOT_F32)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = inter_ptr + pair[:, None].to(tl.int64) * stride_it + n[None, :]
    tl.store(dst, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_down_kernel(
    inter_ptr, w_ptr, s_ptr, z_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, topk_w_ptr, map_ptr,
    num_pairs, num_experts, H, I, stride_it, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MAP: tl.constexpr, DOT_F32: tl.constexpr, HAS_ZEROS: tl.constexpr, TILE_SCALE: tl.constexpr,
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
    b_w = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn
    b_s = e * stride_se + n[None, :].to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + kk
        k_ok = k < I
        wmask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(inter_ptr + row[:, None] * stride_it + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # padded rows: never-written inter rows
        acc = _w4_dot(acc, a, b_w, s_ptr + b_s, z_ptr + b_s, k, k0, wmask, n_ok, GROUP, HAS_ZEROS, TILE_SCALE,
                      DOT_F32)
    acc = acc * tl.load(topk_w_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def int4_fused_moe(x: torch.Tensor, w13: tuple, w2: tuple, group: int, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] (bf16/fp32); w13 = (packed [E, 2I, H/8], scales, zeros [E, 2I, H/G]), w2 = ([E, H, I/8], [E, H,
    I/G] x2; zeros None: symmetric, 8); topk_* [T, K] -> [T, H] in x's dtype."""
    (p13, s13, z13), (p2, s2, z2) = w13, w2
    has_zeros = z13 is not None
    z13, z2 = (z13, z2) if has_zeros else (s13, s2)  # placeholder pointers when symmetric
    runtime.check_device("int4_fused_moe", x, p13, s13, z13, p2, s2, z2, topk_weights, topk_ids)
    T, H = x.shape
    E, two_i, _ = p13.shape
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
    bk, tile = scale_k_tile(group, max(H, inter), x.element_size())  # one K tile for both GEMMs
    sorted_pairs, block_expert, num_post, num_blocks = align_pairs(topk_ids, num_ids, bm)
    inter1 = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    inter2 = torch.empty(pairs, H, dtype=x.dtype, device=x.device)
    emap = expert_map if expert_map is not None else topk_ids  # a placeholder pointer when there is no map
    dot_f32 = runtime.interpreting() or x.dtype == torch.float32
    s13, z13, s2, z2 = s13.contiguous(), z13.contiguous(), s2.contiguous(), z2.contiguous()
    assert s13.stride() == z13.stride() and s2.stride() == z2.stride()
    _int4_gate_up_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        x, p13, s13, z13, inter1, sorted_pairs, block_expert, num_post, emap,
        pairs, num_ids, H, inter, x.stride(0), p13.stride(0), p13.stride(1), s13.stride(0), s13.stride(1),
        inter1.stride(0), GROUP=group, TOPK=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_MAP=expert_map is not None,
        DOT_F32=dot_f32, HAS_ZEROS=has_zeros, TILE_SCALE=tile, num_warps=4, num_stages=3)
    _int4_down_kernel[(num_blocks * triton.cdiv(H, bn),)](
        inter1, p2, s2, z2, inter2, sorted_pairs, block_expert, num_post, topk_weights, emap,
        pairs, num_ids, H, inter, inter1.stride(0), p2.stride(0), p2.stride(1), s2.stride(0), s2.stride(1),
        inter2.stride(0), GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_MAP=expert_map is not None,
        DOT_F32=dot_f32, HAS_ZEROS=has_zeros, TILE_SCALE=tile, num_warps=4, num_stages=3)
    torch.sum(inter2.view(T, K, H), dim=1, out=out)
    return out
