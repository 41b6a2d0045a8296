"""MLA prefill: varlen causal flash attention over contiguous, expanded per-head K/V (no page indirection).

The expanded form of MLA (layers/mla.py) has per head a 192-wide key [k_nope (128) | k_pe (64)] whose rope part is
shared by all heads, and a 128-wide value. The generic paged kernel pads both to next_pow2(max(192, 128)) = 256
values, which is 512 multiply-accumulate lanes per (query, key) pair where 320 are needed (1.6x the FLOPs), and
reads every key through a block table. This kernel keeps the three parts apart:

    s_ij = (q_nope_i . k_nope_j + q_pe_i . k_pe_j) * scale,      o_i = sum_j softmax_j(s_ij) v_j

with k_nope / v as strided views of one [T, H, nope + v] GEMM output (c @ kv_b_proj^T, no copy) and k_pe read
straight from the latents [T, R + rope] (one row for all heads).

Sequences are described by per-sequence arrays (int32): q_start, q_len (queries, rows of q / out), k_start, k_len
(keys, rows of k/v in this call) and q_off: key j of a sequence is visible to its query i iff j <= q_off + i
(q_off = 0 for a plain prompt; for a chunk of a cached context starting at absolute position c0,
q_off = ctx_len - q_len - c0). With `lse` given, the kernel also writes each row's natural-log sum-exp of the
scaled scores (-inf where a query saw no key), so that chunks of a long context can be merged (merge_partials).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LN2_C = tl.constexpr(LN2)


@triton.jit
def _keys(qn, qp, m_i, l_i, acc, kn_base, kp_base, v_base, lo, hi, k_len, q_vis, scale_log2e,
          dn, dp, dv, s_kn_t, s_kp_t, s_v_t,
          N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
          DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jj = j.to(tl.int64)
        if MASKED:
            k_ok = j < k_len
            kn = tl.load(kn_base + jj[:, None] * s_kn_t + dn[None, :], mask=k_ok[:, None] & (dn[None, :] < N), other=0.0)
            kp = tl.load(kp_base + jj[:, None] * s_kp_t + dp[None, :], mask=k_ok[:, None] & (dp[None, :] < P), other=0.0)
            v = tl.load(v_base + jj[:, None] * s_v_t + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < V), other=0.0)
        else:
            kn = tl.load(kn_base + jj[:, None] * s_kn_t + dn[None, :], mask=dn[None, :] < N, other=0.0)
            kp = tl.load(kp_base + jj[:, None] * s_kp_t + dp[None, :], mask=dp[None, :] < P, other=0.0)
            v = tl.load(v_base + jj[:, None] * s_v_t + dv[None, :], mask=dv[None, :] < V, other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16 as raw bits (runtime.dot_flags)
            kn = kn.to(tl.float32)
            kp = kp.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(qn, tl.trans(kn), input_precision=PRECISION) + tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
        s = s * scale_log2e
        if MASKED:
            vis = (j[None, :] <= q_vis[:, None]) & (j[None, :] < k_len)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _mla_prefill_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, out_ptr, lse_ptr,
    q_start_ptr, q_len_ptr, k_start_ptr, k_len_ptr, q_off_ptr,
    scale_log2e,
    s_qn_t, s_qn_h, s_qp_t, s_qp_h, s_kn_t, s_kn_h, s_kp_t, s_v_t, s_v_h, s_o_t, s_o_h,
    N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, N_P: tl.constexpr, P_P: tl.constexpr, V_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_begin(PDL)
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)  # late tiles see the most keys: start them first
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    n_q = tl.load(q_len_ptr + b)
    m0 = m_blk * BLOCK_M
    if m0 >= n_q:
        return
    q_start = tl.load(q_start_ptr + b).to(tl.int64)
    k_start = tl.load(k_start_ptr + b).to(tl.int64)
    k_len = tl.load(k_len_ptr + b)
    q_off = tl.load(q_off_ptr + b)

    i = m0 + tl.arange(0, BLOCK_M)
    row_ok = i < n_q
    tok = q_start + i.to(tl.int64)
    dn = tl.arange(0, N_P)
    dp = tl.arange(0, P_P)
    dv = tl.arange(0, V_P)
    qn = tl.load(qn_ptr + tok[:, None] * s_qn_t + h * s_qn_h + dn[None, :],
                 mask=row_ok[:, None] & (dn[None, :] < N), other=0.0)
    qp = tl.load(qp_ptr + tok[:, None] * s_qp_t + h * s_qp_h + dp[None, :],
                 mask=row_ok[:, None] & (dp[None, :] < P), other=0.0)
    if DOT_F32:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    q_vis = q_off + i  # the last key each row may see

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V_P], tl.float32)
    # keys [0, k_hi) are visible to some row of the tile; [0, k_full) to every row (no mask needed)
    k_hi = tl.maximum(tl.minimum(k_len, q_off + m0 + BLOCK_M), 0)
    k_full = tl.minimum(tl.maximum(q_off + m0 + 1, 0), k_hi) // BLOCK_N * BLOCK_N
    kn_base = kn_ptr + k_start * s_kn_t + h * s_kn_h
    kp_base = kp_ptr + k_start * s_kp_t
    v_base = v_ptr + k_start * s_v_t + h * s_v_h
    m_i, l_i, acc = _keys(qn, qp, m_i, l_i, acc, kn_base, kp_base, v_base, 0, k_full, k_len, q_vis, scale_log2e,
                          dn, dp, dv, s_kn_t, s_kp_t, s_v_t, N, P, V, BLOCK_N, False, DOT_F32, PRECISION)
    m_i, l_i, acc = _keys(qn, qp, m_i, l_i, acc, kn_base, kp_base, v_base, k_full, k_hi, k_len, q_vis, scale_log2e,
                          dn, dp, dv, s_kn_t, s_kp_t, s_v_t, N, P, V, BLOCK_N, True, DOT_F32, PRECISION)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * s_o_t + h * s_o_h + dv[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < V))
    if WRITE_LSE:  # natural log: (m * log2 e ... ) back to base e
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * LN2_C)
        tl.store(lse_ptr + tok * tl.num_programs(2) + h, lse, mask=row_ok)



def _cfg(n_p: int, v_p: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Interpreter: small tiles; GPU: the FA2 shape for d=128, three
    key tiles in flight (on an H100, 32k causal tokens of deepseek-v2-lite: 12.7 ms with two, 10.9 with three; the
    sweep is benchmarks/kernels/mla_prefill_peers.py)."""
    if runtime.interpreting():
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return 128, 64, 8, 3


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                          v: torch.Tensor, *, q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor,
                          k_len: torch.Tensor, q_off: torch.Tensor, max_q_len: int, scale: float,
                          out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """q_nope [T, H, N], q_pe [T, H, P], k_nope [S, H, N], k_pe [S, P], v [S, H, V] (any strides, unit last
    dimension) -> out [T, H, V]. Per-sequence int32 arrays on the device as in the module docstring.
    lse, if given: float32 [T, H], written with each row's log-sum-exp (natural log) of the scaled scores."""
    runtime.check_device("mla_prefill_attention", q_nope, q_pe, k_nope, k_pe, v, q_start, q_len, k_start, k_len, q_off)
    T, H, N = q_nope.shape
    P, V = q_pe.shape[-1], v.shape[-1]
    if q_pe.shape != (T, H, P) or k_nope.shape[1:] != (H, N) or k_pe.shape[1:] != (P,) or v.shape[1] != H:
        raise ValueError(f"mla_prefill_attention: shapes q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"k_nope {tuple(k_nope.shape)}, k_pe {tuple(k_pe.shape)}, v {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q_nope, q_pe, k_nope, k_pe, v)):
        raise ValueError("mla_prefill_attention: inputs need a unit last-dimension stride")
    if out is None:
        out = q_nope.new_empty(T, H, V)
    if lse is not None and (lse.shape != (T, H) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError("mla_prefill_attention: lse must be a contiguous float32 [T, H]")
    B = q_len.shape[0]
    if T == 0 or B == 0 or max_q_len == 0:
        return out
    N_P, P_P, V_P = (max(16, runtime.next_pow2(x)) for x in (N, P, V))
    bm, bn, warps, stages = _cfg(N_P, V_P, q_nope.dtype)
    grid = (triton.cdiv(max_q_len, bm), B, H)
    dot_f32, precision = runtime.dot_flags(q_nope.dtype)
    _mla_prefill_kernel[grid](
        q_nope, q_pe, k_nope, k_pe, v, out, lse if lse is not None else out,
        q_start, q_len, k_start, k_len, q_off,
        scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        N=N, P=P, V=V, N_P=N_P, P_P=P_P, V_P=V_P, BLOCK_M=bm, BLOCK_N=bn, WRITE_LSE=lse is not None,
        DOT_F32=dot_f32, PRECISION=precision,
        num_warps=warps, num_stages=stages,
        **pdl.launch(q_nope.device, q_nope.shape[0]),
    )
    return out


def merge_partials(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-normalised partial results over disjoint key sets -> the result over their union.
    o [T, H, V], lse [T, H] (natural log, -inf for an empty set). Small elementwise torch ops, fp32 inside."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)
    tot = wa + wb
    denom = torch.where(tot == 0, torch.ones_like(tot), tot)
    o = (o_a.float() * (wa / denom)[..., None] + o_b.float() * (wb / denom)[..., None]).to(o_a.dtype)
    return o, torch.where(tot == 0, torch.full_like(m, float("-inf")), m_safe + torch.log(denom))
