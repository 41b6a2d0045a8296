"""Rotary embedding (rotate-half convention) with the optional per-head RMSNorm of Qwen3 fused in front,
applied in place to q and k: one launch for both instead of ~40 small kernels. Optionally the same launch writes
the rotated K and the V of each token into the paged KV cache (what write_kv_cache would do one launch later)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, n_q_heads, n_k_heads,
                 q_stride, k_stride, eps,
                 v_ptr, cache_ptr, slot_ptr, v_stride, stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
                 block_size,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, REST_BLOCK: tl.constexpr,
                 D_BLOCK: tl.constexpr, NORM: tl.constexpr, WRITE_KV: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    is_q = h < n_q_heads
    if is_q:
        base = q_ptr + t * q_stride + h * HEAD_DIM
        w_ptr = qw_ptr
    else:
        base = k_ptr + t * k_stride + (h - n_q_heads) * HEAD_DIM
        w_ptr = kw_ptr
    i = tl.arange(0, HALF_BLOCK)
    m = i < HALF
    x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=m, other=0.0).to(tl.float32)
    r = tl.arange(0, REST_BLOCK)
    rm = r < HEAD_DIM - 2 * HALF
    xr = tl.load(base + 2 * HALF + r, mask=rm, other=0.0).to(tl.float32)
    if NORM:
        dtype = q_ptr.dtype.element_ty
        ss = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0) + tl.sum(xr * xr, axis=0)
        rstd = 1.0 / tl.sqrt(ss / HEAD_DIM + eps)
        x1 = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32) * (x1 * rstd).to(dtype).to(tl.float32)
        x2 = tl.load(w_ptr + HALF + i, mask=m, other=0.0).to(tl.float32) * (x2 * rstd).to(dtype).to(tl.float32)
        xr = tl.load(w_ptr + 2 * HALF + r, mask=rm, other=0.0).to(tl.float32) * (xr * rstd).to(dtype).to(tl.float32)
        x1 = x1.to(dtype).to(tl.float32)
        x2 = x2.to(dtype).to(tl.float32)
        tl.store(base + 2 * HALF + r, xr.to(dtype), mask=rm)
    p = tl.load(pos_ptr + t)
    c = tl.load(cos_ptr + p * HALF + i, mask=m, other=0.0)
    s = tl.load(sin_ptr + p * HALF + i, mask=m, other=0.0)
    y1 = (x1 * c - x2 * s).to(q_ptr.dtype.element_ty)
    y2 = (x2 * c + x1 * s).to(q_ptr.dtype.element_ty)
    tl.store(base + i, y1, mask=m)
    tl.store(base + HALF + i, y2, mask=m)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if (h >= n_q_heads) & (slot >= 0):
            kvh = h - n_q_heads
            dst = (cache_ptr + (slot // block_size) * stride_c_blk + (slot % block_size) * stride_c_tok
                   + kvh * stride_c_head)
            ty = cache_ptr.dtype.element_ty
            tl.store(dst + i, y1.to(ty), mask=m)
            tl.store(dst + HALF + i, y2.to(ty), mask=m)
            tl.store(dst + 2 * HALF + r, xr.to(q_ptr.dtype.element_ty).to(ty), mask=rm)
            d = tl.arange(0, D_BLOCK)
            vx = tl.load(v_ptr + t * v_stride + kvh * HEAD_DIM + d, mask=d < HEAD_DIM)
            tl.store(dst + stride_c_kv + d, vx.to(ty), mask=d < HEAD_DIM)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
               eps: float = 1e-6, kv_write: tuple | None = None) -> None:
    """q [T, H, D], k [T, KVH, D] (last two dims contiguous), positions [T]; cos/sin [max_pos, rotary_dim/2] fp32.
    Rotates the first rotary_dim dims of every head in place, after the per-head RMSNorm when weights are given.
    kv_write = (v [T, KVH, D], kv_cache [2, blocks, block_size, KVH, D], slot_mapping [T] int64, < 0 = skip):
    also store each token's rotated K and its V at its slot."""
    runtime.check_device("apply_rope", q, k, positions, cos, sin)
    T, H, D = q.shape
    KVH = k.shape[1]
    half = cos.shape[1]
    if T == 0:
        return
    if q.stride(2) != 1 or q.stride(1) != D or k.stride(2) != 1 or k.stride(1) != D:
        raise ValueError("apply_rope: heads of q and k must be contiguous")
    norm = q_norm_weight is not None
    if kv_write is not None:
        v, cache, slots = kv_write
        runtime.check_device("apply_rope", q, v, cache, slots)
        if v.shape != k.shape or v.stride(2) != 1 or v.stride(1) != D or cache.dim() != 5 \
                or cache.shape[0] != 2 or cache.shape[3:] != (KVH, D) or cache.stride(4) != 1 or slots.shape != (T,):
            raise ValueError(f"apply_rope: v {tuple(v.shape)}, cache {tuple(cache.shape)}, slots "
                             f"{tuple(slots.shape)} do not match k {tuple(k.shape)}")
        cache_args = (v, cache, slots, v.stride(0), *cache.stride()[:4], cache.shape[2])
    else:
        cache_args = (q, q, positions, 0, 0, 0, 0, 0, 1)
    _rope_kernel[(T, H + KVH)](
        q, k, positions, cos, sin, q_norm_weight if norm else q, k_norm_weight if norm else k, H, KVH,
        q.stride(0), k.stride(0), eps, *cache_args, HEAD_DIM=D, HALF=half, HALF_BLOCK=triton.next_power_of_2(half),
        REST_BLOCK=max(triton.next_power_of_2(D - 2 * half), 1), D_BLOCK=triton.next_power_of_2(D), NORM=norm,
        WRITE_KV=kv_write is not None, num_warps=1,
        **pdl.launch(q.device, q.shape[0]),
    )
