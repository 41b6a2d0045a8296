"""MLA's inputs to attention in one kernel: rope on the query's rope part, RMSNorm on c_kv, rope on k_pe.

Done with torch this was ~25 launches per layer (a gather of cos/sin per tensor, fp32 casts, the rotation's
elementwise ops and concatenations for q_pe and k_pe, RMSNorm's five ops on the strided c_kv, the latent's cat,
q_pe's contiguous copy): at 252 decode rows of DeepSeek-V2-Lite, ~1.5 ms of a 21.7-ms step. One program per
token reads its q row's rope slices (every head), its kv_a row, and writes the roped q_pe (contiguous) and the
latent [RMSNorm(c_kv) | rope(k_pe)], with the torch path's roundings (semantics: layers/mla.rope_and_norm_latent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin


@triton.jit
def _rotate(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _mla_rope_norm_kernel(q_ptr, kv_ptr, pos_ptr, cos_ptr, sin_ptr, w_ptr, qpe_ptr, lat_ptr,
                          num_heads, stride_qt, stride_qh, stride_kv, eps,
                          NOPE: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, HALF: tl.constexpr,
                          H_P: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    P: tl.constexpr = 2 * HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * HALF + i)
    sin = tl.load(sin_ptr + pos * HALF + i)
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3), ...
        lo, hi = 2 * i, 2 * i + 1
    else:  # halves
        lo, hi = i, i + HALF
    dtype = lat_ptr.dtype.element_ty

    # latent = [RMSNorm(c_kv) | rope(k_pe)]
    r = tl.arange(0, R_P)
    rm = r < R
    kv_row = kv_ptr + t * stride_kv
    c = tl.load(kv_row + r, mask=rm, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / R + eps)
    y = (c * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + r, mask=rm, other=0.0).to(tl.float32)
    lat_row = lat_ptr + t * (R + P)
    tl.store(lat_row + r, (w * y).to(dtype), mask=rm)
    k1, k2 = _rotate(tl.load(kv_row + R + lo).to(tl.float32), tl.load(kv_row + R + hi).to(tl.float32), cos, sin)
    tl.store(lat_row + R + lo, k1.to(dtype))
    tl.store(lat_row + R + hi, k2.to(dtype))

    # q_pe of every head, roped, contiguous
    h = tl.arange(0, H_P)[:, None]
    hm = h < num_heads
    q_row = q_ptr + t * stride_qt + h * stride_qh + NOPE
    q1, q2 = _rotate(tl.load(q_row + lo[None, :], mask=hm, other=0.0).to(tl.float32),
                     tl.load(q_row + hi[None, :], mask=hm, other=0.0).to(tl.float32), cos[None, :], sin[None, :])
    out_row = qpe_ptr + (t * num_heads + h) * P
    tl.store(out_row + lo[None, :], q1.to(dtype), mask=hm)
    tl.store(out_row + hi[None, :], q2.to(dtype), mask=hm)


def mla_rope_norm(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  norm_weight: torch.Tensor, eps: float, nope_dim: int,
                  interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, nope + rope] (last dim contiguous), kv [T, R + rope] (kv_a's output), positions [T];
    cos/sin [max_pos, rope/2] fp32 (attention factor included) -> (q_pe [T, H, rope] roped, contiguous;
    latent [T, R + rope] = [RMSNorm(c_kv) * norm_weight | rope(k_pe)])."""
    runtime.check_device("mla_rope_norm", q, kv, positions, cos, sin, norm_weight)
    T, H, D = q.shape
    half = cos.shape[1]
    P = 2 * half
    R = kv.shape[1] - P
    if D != nope_dim + P or R < 1 or kv.shape[0] != T or positions.shape != (T,) or norm_weight.shape != (R,):
        raise ValueError(f"mla_rope_norm: q {tuple(q.shape)}, kv {tuple(kv.shape)}, positions "
                         f"{tuple(positions.shape)}, norm {tuple(norm_weight.shape)} and rope {P} do not agree")
    if q.stride(2) != 1 or kv.stride(1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("mla_rope_norm: q's and kv's last dims and the cos/sin tables must be contiguous")
    if half & (half - 1):
        raise ValueError(f"mla_rope_norm: rope dim {P} must be twice a power of two")
    q_pe = torch.empty(T, H, P, dtype=q.dtype, device=q.device)
    latent = torch.empty(T, R + P, dtype=kv.dtype, device=kv.device)
    if T:
        _mla_rope_norm_kernel[(T,)](q, kv, positions, cos, sin, norm_weight, q_pe, latent, H, q.stride(0),
                                    q.stride(1), kv.stride(0), eps, NOPE=nope_dim, R=R, R_P=runtime.next_pow2(R),
                                    HALF=half, H_P=runtime.next_pow2(H), INTERLEAVED=interleaved,
                                    num_warps=4 if R >= 256 else 1, **pdl.launch(q.device, q.shape[0]))
    return q_pe, latent
