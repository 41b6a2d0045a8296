"""Rotary embedding (rotate-half convention) with the optional per-head RMSNorm of Qwen3 fused in front,
applied in place to q and k: one launch for both instead of ~40 small kernels. Optionally the same launch writes
the rotated K and the V of each token into the paged KV cache (what write_kv_cache would do one launch later)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin


# n_tokens is not specialised: a new token count would compile a variant while serving (moe_align.py says why)
@triton.jit(do_not_specialize=["n_tokens"])
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, n_tokens, n_q_heads, n_k_heads,
                 q_stride, k_stride, eps,
                 v_ptr, cache_ptr, slot_ptr, v_stride, stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
                 block_size,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, REST_BLOCK: tl.constexpr,
                 D_BLOCK: tl.constexpr, TOKENS: tl.constexpr, NORM: tl.constexpr, WRITE_KV: tl.constexpr,
                 PDL: tl.constexpr = 0):
    """Program (token block, head): TOKENS tokens' one head, a row each."""
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    t_ok = t < n_tokens
    h = tl.program_id(1)
    is_q = h < n_q_heads
    if is_q:
        base = q_ptr + t * q_stride + h * HEAD_DIM
        w_ptr = qw_ptr
    else:
        base = k_ptr + t * k_stride + (h - n_q_heads) * HEAD_DIM
        w_ptr = kw_ptr
    i = tl.arange(0, HALF_BLOCK)
    m = t_ok[:, None] & (i < HALF)[None, :]
    x1 = tl.load(base[:, None] + i[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base[:, None] + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    r = tl.arange(0, REST_BLOCK)
    rm = t_ok[:, None] & (r < HEAD_DIM - 2 * HALF)[None, :]
    xr = tl.load(base[:, None] + 2 * HALF + r[None, :], mask=rm, other=0.0).to(tl.float32)
    if NORM:
        dtype = q_ptr.dtype.element_ty
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xr * xr, axis=1)
        rstd = (1.0 / tl.sqrt(ss / HEAD_DIM + eps))[:, None]
        w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        wr = tl.load(w_ptr + 2 * HALF + r, mask=r < HEAD_DIM - 2 * HALF, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xr = wr * (xr * rstd).to(dtype).to(tl.float32)
        tl.store(base[:, None] + 2 * HALF + r[None, :], xr.to(dtype), mask=rm)
    p = tl.load(pos_ptr + t, mask=t_ok, other=0)
    c = tl.load(cos_ptr + p[:, None] * HALF + i[None, :], mask=m, other=0.0)
    s = tl.load(sin_ptr + p[:, None] * HALF + i[None, :], mask=m, other=0.0)
    y1 = (x1 * c - x2 * s).to(q_ptr.dtype.element_ty)
    y2 = (x2 * c + x1 * s).to(q_ptr.dtype.element_ty)
    tl.store(base[:, None] + i[None, :], y1, mask=m)
    tl.store(base[:, None] + HALF + i[None, :], y2, mask=m)
    if WRITE_KV:
        if h >= n_q_heads:
            slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
            ok = (slot >= 0)[:, None]
            kvh = h - n_q_heads
            dst = (cache_ptr + (slot // block_size) * stride_c_blk + (slot % block_size) * stride_c_tok
                   + kvh * stride_c_head)[:, None]
            ty = cache_ptr.dtype.element_ty
            tl.store(dst + i[None, :], y1.to(ty), mask=m & ok)
            tl.store(dst + HALF + i[None, :], y2.to(ty), mask=m & ok)
            tl.store(dst + 2 * HALF + r[None, :], xr.to(q_ptr.dtype.element_ty).to(ty), mask=rm & ok)
            d = tl.arange(0, D_BLOCK)[None, :]
            vx = tl.load(v_ptr + t[:, None] * v_stride + kvh * HEAD_DIM + d, mask=t_ok[:, None] & (d < HEAD_DIM))
            tl.store(dst + stride_c_kv + d, vx.to(ty), mask=ok & (d < HEAD_DIM))


# Tokens a program rotates when there are many (runtime.tokens_per_program). The per-head norm's sum is ordered by
# the tile's layout, so the two forms can differ in the last bit.
ROPE_TOKENS = 16


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
    tokens = runtime.tokens_per_program(T, ROPE_TOKENS)
    _rope_kernel[(triton.cdiv(T, tokens), H + KVH)](
        q, k, positions, cos, sin, q_norm_weight if norm else q, k_norm_weight if norm else k, T, H, KVH,
        q.stride(0), k.stride(0), eps, *cache_args, HEAD_DIM=D, HALF=half, HALF_BLOCK=triton.next_power_of_2(half),
        REST_BLOCK=max(triton.next_power_of_2(D - 2 * half), 1), D_BLOCK=triton.next_power_of_2(D), TOKENS=tokens,
        NORM=norm, WRITE_KV=kv_write is not None, num_warps=4 if tokens > 1 else 1,
        **pdl.launch(q.device, q.shape[0]),
    )
