"""W8A8 block-scaled FP8 GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W in e4m3 with one fp32 scale per
bn x bk block (DeepSeek-V3 / Qwen3-FP8 checkpoints: [128, 128]), x quantized on the fly.

  _act_quant_kernel   x -> e4m3 per token per group of bk columns (dynamic: scale = amax / 448), fp32 scales
                      [M, ceil(K/bk)]; one program per (token, group).
  _gemm_kernel        one program per BLOCK_M x BLOCK_N tile, K walked one scale block (bk) at a time: the e4m3
                      tiles go through tl.dot (fp8 tensor cores on Hopper) into an fp32 partial, which is scaled by
                      the activation group's scale (per row) and the weight block's scale (per column) and added to
                      the fp32 accumulator; one rounding to the output dtype at the end.
Online fp8 (per output channel weight scales, one activation scale per token): the same kernel with PER_CHANNEL,
the scales applied once after the K loop (fp8_channel_linear).
Decode (M <= 16) runs the same kernel with a 16-row tile (the smallest tl.dot M) and narrower N tiles, so more
programs stream the weight.

Reference: layers/quant/fp8 (dequantize weight and, for this kernel's exact arithmetic, `quantize_act_groups`
for the activations). Requires bk a power of two >= 32 (fp8 tl.dot's smallest K; 128 in every published checkpoint); the layer falls back to the
reference otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime

FP8_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr,
                      GROUP_P: tl.constexpr, FMAX: tl.constexpr):
    m = tl.program_id(0)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, GROUP_P)
    ok = (tl.arange(0, GROUP_P) < GROUP) & (k < K)
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10) / FMAX
    q = tl.clamp(tl.math.div_rn(x, scale), -FMAX, FMAX)  # IEEE division: the codes of the torch reference
    tl.store(q_ptr + m.to(tl.int64) * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * stride_sm + g, scale)


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_asm, stride_wn,
                 stride_wsn, stride_om, SCALE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    a_ptrs = a_ptr + m[:, None].to(tl.int64) * stride_am + kk[None, :]
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * stride_wn + kk[:, None]  # [BLOCK_K, BLOCK_N]: W^T tile
    as_ptrs = as_ptr + m * stride_asm
    ws_ptrs = ws_ptr + (n // SCALE_N) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kk + kb * BLOCK_K < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PER_CHANNEL:  # one scale per token and per output row: applied once, after the loop
            acc += tl.dot(a, w)
        else:
            a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
            w_s = tl.load(ws_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PER_CHANNEL:
        acc *= tl.load(as_ptrs, mask=m_ok, other=0.0)[:, None] * tl.load(ws_ptrs, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quantize_act(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)]), per token per group of `group` columns."""
    runtime.check_device("fp8 activation quant", x)
    x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), GROUP=group,
                                       GROUP_P=runtime.next_pow2(group), FMAX=FP8_MAX)
    return q, s


def tile_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a 16-row tile for decode, 64 x 128 above."""
    if m <= 16:
        return 16, 64, 4, 4
    return 64, 128, 4, 3


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp32) @ (weight [N, K] e4m3 * block scales [ceil(N/bn), ceil(K/bk)])^T + bias -> [M, N]."""
    bn, bk = block
    if bk & (bk - 1) or bk < 32:  # fp8 tl.dot takes K tiles of 32 or more
        raise ValueError(f"fp8 block GEMM: the K block ({bk}) must be a power of two >= 32")
    runtime.check_device("fp8 block GEMM", x, weight, weight_scale)
    m, k = x.shape
    n = weight.shape[0]
    q, s = quantize_act(x, bk)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bnt, warps, stages = tile_config(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bnt))
    ws = weight_scale.contiguous()
    _gemm_kernel[grid](q, s, weight, ws, bias if bias is not None else out, out, m, n, k, q.stride(0), s.stride(0),
                       weight.stride(0), ws.stride(0), out.stride(0), SCALE_N=bn, BLOCK_M=bm, BLOCK_N=bnt,
                       BLOCK_K=bk, HAS_BIAS=bias is not None, PER_CHANNEL=False, num_warps=warps, num_stages=stages)
    return out


def fp8_channel_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       block_k: int = 128) -> torch.Tensor:
    """Online fp8 (`--quantization fp8`): x [M, K] quantized per token (one scale over K), weight [N, K] e4m3 with
    one fp32 scale per output row (weight_scale [N, 1]); y = (xq @ wq^T) * sx * sw (+ bias)."""
    runtime.check_device("fp8 per-channel GEMM", x, weight, weight_scale)
    m, k = x.shape
    n = weight.shape[0]
    q, s = quantize_act(x, k)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bnt, warps, stages = tile_config(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bnt))
    ws = weight_scale.contiguous()
    _gemm_kernel[grid](q, s, weight, ws, bias if bias is not None else out, out, m, n, k, q.stride(0), s.stride(0),
                       weight.stride(0), ws.stride(0), out.stride(0), SCALE_N=1, BLOCK_M=bm, BLOCK_N=bnt,
                       BLOCK_K=min(max(block_k, 32), max(32, runtime.next_pow2(k))), HAS_BIAS=bias is not None,
                       PER_CHANNEL=True, num_warps=warps, num_stages=stages)
    return out
