"""MLA prefill attention: the engine's kernel beside variants that load keys and values through Hopper's tensor
memory accelerator (host TensorDescriptors: TMA) and/or chain the two score products in one accumulator.

The engine's kernel (kernels/mla_prefill.py) reaches ~505 TFLOP/s at 32k causal tokens of deepseek-v2-lite on an
H100 where cuDNN reaches ~600 (mla_prefill_peers.py). Variants (one sequence, causal; and a chunk over a cached prefix):

  engine      moeserve.kernels.mla_prefill.mla_prefill_attention as the engine runs it
  chain       s = q_pe k_pe^T accumulated onto q_nope k_nope^T in one dot chain, scale folded into the exponent
  tma         k_nope, v and k_pe tiles loaded by TMA descriptors (pointer math and masks leave the inner loop)
  tma+chain   both

Run: python3 benchmarks/kernels/mla_prefill_variants.py      (--cpu-smoke: tiny shapes in the interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moeserve.kernels import runtime  # noqa: E402
from moeserve.kernels.mla_prefill import LOG2E, mla_prefill_attention  # noqa: E402


@triton.jit
def _tile(kn_ptr, kp_ptr, v_ptr, kn_desc, kp_desc, v_desc, row0, h, j, k_ok, dn, dp, dv, s_kn_t, s_kp_t, s_v_t,
          N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, N_P: tl.constexpr, P_P: tl.constexpr,
          V_P: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
    if TMA:  # rows past the sequence are read (the next sequence's, or zeros past the tensor) and masked in scores
        kn = kn_desc.load([row0, h, 0]).reshape(BLOCK_N, N_P)
        v = v_desc.load([row0, h, N]).reshape(BLOCK_N, V_P)
        kp = kp_desc.load([row0, 0])
    else:
        jj = j.to(tl.int64)
        if MASKED:
            kn = tl.load(kn_ptr + jj[:, None] * s_kn_t + dn[None, :], mask=k_ok[:, None] & (dn[None, :] < N), other=0.0)
            kp = tl.load(kp_ptr + jj[:, None] * s_kp_t + dp[None, :], mask=k_ok[:, None] & (dp[None, :] < P), other=0.0)
            v = tl.load(v_ptr + jj[:, None] * s_v_t + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < V), other=0.0)
        else:
            kn = tl.load(kn_ptr + jj[:, None] * s_kn_t + dn[None, :], mask=dn[None, :] < N, other=0.0)
            kp = tl.load(kp_ptr + jj[:, None] * s_kp_t + dp[None, :], mask=dp[None, :] < P, other=0.0)
            v = tl.load(v_ptr + jj[:, None] * s_v_t + dv[None, :], mask=dv[None, :] < V, other=0.0)
    return kn, kp, v


@triton.jit
def _keys_v(qn, qp, m_i, l_i, acc, kn_ptr, kp_ptr, v_ptr, kn_desc, kp_desc, v_desc, k_start, h, lo, hi, k_len, q_vis,
            scale_log2e, dn, dp, dv, s_kn_t, s_kp_t, s_v_t,
            N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, N_P: tl.constexpr, P_P: tl.constexpr,
            V_P: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, CHAIN: tl.constexpr,
            DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kn, kp, v = _tile(kn_ptr, kp_ptr, v_ptr, kn_desc, kp_desc, v_desc, k_start + start, h, j, j < k_len, dn, dp,
                          dv, s_kn_t, s_kp_t, s_v_t, N, P, V, N_P, P_P, V_P, BLOCK_N, TMA, MASKED)
        if DOT_F32:
            kn = kn.to(tl.float32)
            kp = kp.to(tl.float32)
            v = v.to(tl.float32)
        if CHAIN:
            s = tl.dot(qp, tl.trans(kp), tl.dot(qn, tl.trans(kn), input_precision=PRECISION),
                       input_precision=PRECISION)
        else:
            s = tl.dot(qn, tl.trans(kn), input_precision=PRECISION) + tl.dot(qp, tl.trans(kp),
                                                                             input_precision=PRECISION)
        if MASKED:
            vis = (j[None, :] <= q_vis[:, None]) & (j[None, :] < k_len)
            s = tl.where(vis, s, float("-inf"))
        if CHAIN:  # scores stay unscaled: the scale is applied inside the exponent (one FMA)
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2e)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s * scale_log2e - m_safe[:, None])
        else:
            s = s * scale_log2e
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_v_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, out_ptr, kn_desc, kp_desc, v_desc,
    q_start_ptr, q_len_ptr, k_start_ptr, k_len_ptr, q_off_ptr, scale_log2e,
    s_qn_t, s_qn_h, s_qp_t, s_qp_h, s_kn_t, s_kn_h, s_kp_t, s_v_t, s_v_h, s_o_t, s_o_h,
    N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, N_P: tl.constexpr, P_P: tl.constexpr, V_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, CHAIN: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    h64 = h.to(tl.int64)
    n_q = tl.load(q_len_ptr + b)
    m0 = m_blk * BLOCK_M
    if m0 >= n_q:
        return
    q_start = tl.load(q_start_ptr + b).to(tl.int64)
    k_start = tl.load(k_start_ptr + b)
    k_len = tl.load(k_len_ptr + b)
    q_off = tl.load(q_off_ptr + b)
    i = m0 + tl.arange(0, BLOCK_M)
    row_ok = i < n_q
    tok = q_start + i.to(tl.int64)
    dn = tl.arange(0, N_P)
    dp = tl.arange(0, P_P)
    dv = tl.arange(0, V_P)
    qn = tl.load(qn_ptr + tok[:, None] * s_qn_t + h64 * s_qn_h + dn[None, :], mask=row_ok[:, None] & (dn[None, :] < N),
                 other=0.0)
    qp = tl.load(qp_ptr + tok[:, None] * s_qp_t + h64 * s_qp_h + dp[None, :], mask=row_ok[:, None] & (dp[None, :] < P),
                 other=0.0)
    if DOT_F32:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    q_vis = q_off + i
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V_P], tl.float32)
    k_hi = tl.maximum(tl.minimum(k_len, q_off + m0 + BLOCK_M), 0)
    k_full = tl.minimum(tl.maximum(q_off + m0 + 1, 0), k_hi) // BLOCK_N * BLOCK_N
    k64 = k_start.to(tl.int64)
    kn_base = kn_ptr + k64 * s_kn_t + h64 * s_kn_h
    kp_base = kp_ptr + k64 * s_kp_t
    v_base = v_ptr + k64 * s_v_t + h64 * s_v_h
    m_i, l_i, acc = _keys_v(qn, qp, m_i, l_i, acc, kn_base, kp_base, v_base, kn_desc, kp_desc, v_desc, k_start, h, 0,
                            k_full, k_len, q_vis, scale_log2e, dn, dp, dv, s_kn_t, s_kp_t, s_v_t, N, P, V, N_P, P_P,
                            V_P, BLOCK_N, False, TMA, CHAIN, DOT_F32, PRECISION)
    m_i, l_i, acc = _keys_v(qn, qp, m_i, l_i, acc, kn_base, kp_base, v_base, kn_desc, kp_desc, v_desc, k_start, h,
                            k_full, k_hi, k_len, q_vis, scale_log2e, dn, dp, dv, s_kn_t, s_kp_t, s_v_t, N, P, V, N_P,
                            P_P, V_P, BLOCK_N, True, TMA, CHAIN, DOT_F32, PRECISION)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * s_o_t + h64 * s_o_h + dv[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < V))


def run_variant(cfg, kv, k_pe, q_nope, q_pe, seq, scale, out):
    """kv [S, H, N + V] (k_nope | v per head), k_pe [S, P] (a view of the latents), q_* [T, H, *]."""
    S, H, NV = kv.shape
    N, P = q_nope.shape[-1], q_pe.shape[-1]
    V = NV - N
    N_P, P_P, V_P = (max(16, runtime.next_pow2(x)) for x in (N, P, V))
    bm, bn, warps, stages = cfg["bm"], cfg["bn"], cfg["warps"], cfg["stages"]
    kn_desc = TensorDescriptor(kv, [S, H, NV], list(kv.stride()), [bn, 1, N_P])
    v_desc = TensorDescriptor(kv, [S, H, NV], list(kv.stride()), [bn, 1, V_P])
    kp_desc = TensorDescriptor(k_pe, [S, P], [k_pe.stride(0), 1], [bn, P_P])
    dot_f32, precision = runtime.dot_flags(q_nope.dtype)
    B = seq["q_len"].shape[0]
    v = kv[..., N:]
    _prefill_v_kernel[(triton.cdiv(seq["max_q_len"], bm), B, H)](
        q_nope, q_pe, kv, k_pe, v, out, kn_desc, kp_desc, v_desc,
        seq["q_start"], seq["q_len"], seq["k_start"], seq["k_len"], seq["q_off"], scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), kv.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        N=N, P=P, V=V, N_P=N_P, P_P=P_P, V_P=V_P, BLOCK_M=bm, BLOCK_N=bn, TMA=cfg["tma"], CHAIN=cfg["chain"],
        DOT_F32=dot_f32, PRECISION=precision, num_warps=warps, num_stages=stages)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    H, N, P, V, R = (2, 16, 16, 16, 32) if smoke else (16, 128, 64, 128, 512)
    cases = ((40, 0, 2), (24, 30, 2)) if smoke else ((32768, 0, 1), (8192, 24576, 1), (8192, 0, 1), (2048, 6144, 4))
    cfgs = [dict(bm=128, bn=64, warps=8, stages=3, tma=t, chain=c) for t in (False, True) for c in (False, True)]
    cfgs += [dict(bm=128, bn=64, warps=8, stages=4, tma=True, chain=True),
             dict(bm=128, bn=128, warps=8, stages=2, tma=True, chain=True)]
    if smoke:
        cfgs = [dict(c, bm=16, bn=16, warps=4, stages=1) for c in cfgs[:4]]
    results = []
    for new, prefix, B in cases:
        S1 = prefix + new
        g = torch.Generator(device=dev).manual_seed(S1 + B)
        T, S = new * B, S1 * B
        q_nope = torch.randn(T, H, N, device=dev, generator=g).to(dtype)
        q_pe = torch.randn(T, H, P, device=dev, generator=g).to(dtype)
        kv = torch.randn(S, H, N + V, device=dev, generator=g).to(dtype)
        lat = torch.randn(S, R + P, device=dev, generator=g).to(dtype)
        k_pe = lat[:, R:]
        scale = (N + P) ** -0.5
        i32 = dict(dtype=torch.int32, device=dev)
        seq = dict(q_start=torch.arange(B, **i32) * new, q_len=torch.full((B,), new, **i32),
                   k_start=torch.arange(B, **i32) * S1, k_len=torch.full((B,), S1, **i32),
                   q_off=torch.full((B,), prefix, **i32), max_q_len=new)
        ref = mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale=scale, **seq).float()
        fl = 2.0 * B * new * (prefix + (new + 1) / 2) * H * (N + P + V)
        label = f"{B} x {new} new on {prefix} cached"
        timing = []
        if not smoke:
            ms = triton.testing.do_bench(lambda: mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:],
                                                                       scale=scale, **seq), warmup=10, rep=150)
            timing.append(("engine", None, ms, 0.0))
        for cfg in cfgs:
            out = torch.empty(T, H, V, device=dev, dtype=dtype)
            try:
                run_variant(cfg, kv, k_pe, q_nope, q_pe, seq, scale, out)
                err = (out.float() - ref).abs().max().item()
                ms = 0.0 if smoke else triton.testing.do_bench(
                    lambda: run_variant(cfg, kv, k_pe, q_nope, q_pe, seq, scale, out), warmup=10, rep=150)
            except Exception as exc:
                print(f"{label} {cfg}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            timing.append(("variant", cfg, ms, err))
        for name, cfg, ms, err in timing:
            tf = fl / ms / 1e9 if ms else 0.0
            print(f"{label} {name} {cfg or ''}: {ms:.3f} ms {tf:.0f} TFLOP/s max|diff| {err:.2e}", flush=True)
            results.append({"case": label, "impl": name, "cfg": cfg, "ms": ms, "TFLOPs": tf, "max_diff": err})
    if args.out:
        (Path(args.out) / "mla_prefill_variants.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
