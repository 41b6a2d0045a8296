"""MLA prefill attention at long prompts: moeserve's kernel beside the flash attentions on the device image.

Times only the attention of the expanded form (deepseek-v2-lite: 16 heads, key 128 nope + 64 rope, value 128), on
the same q/k/v: moeserve.kernels.mla_prefill (key parts kept apart, k_pe shared by heads) against PyTorch's
scaled_dot_product_attention backends (cuDNN, flash, efficient) over q/k [1, H, T, 192] and v [1, H, T, 128], and
vLLM's FA3 (vllm.vllm_flash_attn, when vLLM is installed beside). Causal, one sequence of T tokens, bf16.
Run: python3 benchmarks/kernels/mla_prefill_peers.py [--tokens 8192,32768]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton.testing

H, N, P, V = 16, 128, 64, 128


def flops(T: int) -> float:
    return 2.0 * (T * (T + 1) / 2) * H * (N + P + V)


def cudnn_lse(q, k, v, causal: bool, scale: float):
    """(out [1, H, Tq, V], lse [1, H, Tq] natural log) through PyTorch's cuDNN attention op."""
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                scale=scale)[:2]
    return o, lse


def inputs(new: int, prefix: int):
    """One sequence of `new` query tokens at the end of `prefix + new` keys: q_nope, q_pe, kv [S, H, N + V],
    k_pe [S, P], mla_prefill_attention's sequence arguments, and the scale (bf16, seeded by the shape)."""
    S = prefix + new
    g = torch.Generator(device="cuda").manual_seed(S)
    q_nope = torch.randn(new, H, N, device="cuda", generator=g, dtype=torch.bfloat16)
    q_pe = torch.randn(new, H, P, device="cuda", generator=g, dtype=torch.bfloat16)
    kv = torch.randn(S, H, N + V, device="cuda", generator=g, dtype=torch.bfloat16)
    k_pe = torch.randn(S, P, device="cuda", generator=g, dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32, device="cuda")
    seq = dict(q_start=torch.zeros(1, **i32), q_len=torch.full((1,), new, **i32), k_start=torch.zeros(1, **i32),
               k_len=torch.full((1,), S, **i32), q_off=torch.full((1,), prefix, **i32), max_q_len=new)
    return q_nope, q_pe, kv, k_pe, seq, (N + P) ** -0.5


def chunk_case(new: int, prefix: int) -> list[dict]:
    """The chunk of `new` tokens at the end of a `prefix + new` context (chunked prefill of a long prompt):
    moeserve's kernel in one pass (q_off = prefix) against cuDNN in two calls (the prefix unmasked, the chunk's own
    keys causal) merged by log-sum-exp."""
    from moeserve.kernels.mla_prefill import merge_partials, mla_prefill_attention

    S = prefix + new
    q_nope, q_pe, kv, k_pe, seq, scale = inputs(new, prefix)
    ours = lambda: mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale=scale, **seq)  # noqa: E731

    def cudnn():
        q = torch.cat([q_nope, q_pe], -1).transpose(0, 1).unsqueeze(0)
        k = torch.cat([kv[..., :N], k_pe[:, None, :].expand(S, H, P)], -1).transpose(0, 1).unsqueeze(0)
        v = kv[..., N:].transpose(0, 1).unsqueeze(0)
        o1, l1 = cudnn_lse(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
        o2, l2 = cudnn_lse(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
        o, _ = merge_partials(o1[0].transpose(0, 1), l1.reshape(H, new).t().float().contiguous(),
                              o2[0].transpose(0, 1), l2.reshape(H, new).t().float().contiguous())
        return o

    ref = ours().float()
    fl = 2.0 * new * (prefix + (new + 1) / 2) * H * (N + P + V)
    out = []
    for name, fn in (("moeserve", ours), ("cudnn-2-calls+merge", cudnn)):
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
        except Exception as exc:
            print(f"chunk {new} on {prefix} {name}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        print(f"chunk {new} on {prefix} {name}: {ms:.2f} ms {fl / ms / 1e9:.0f} TFLOP/s (max |diff| {err:.2e})",
              flush=True)
        out.append({"tokens": new, "prefix": prefix, "impl": name, "ms": ms, "TFLOPs": fl / ms / 1e9, "max_diff": err})
    return out


def main() -> int:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from moeserve.kernels.mla_prefill import mla_prefill_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    results = []
    for T in (int(t) for t in args.tokens.split(",")):
        q_nope, q_pe, kv, k_pe, seq, scale = inputs(T, 0)
        i32 = dict(dtype=torch.int32, device="cuda")
        ours = lambda: mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale=scale, **seq)  # noqa: E731
        q = torch.cat([q_nope, q_pe], -1).transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, 192]
        k = torch.cat([kv[..., :N], k_pe[:, None, :].expand(T, H, P)], -1).transpose(0, 1).unsqueeze(0).contiguous()
        v = kv[..., N:].transpose(0, 1).unsqueeze(0).contiguous()
        o_ours = ours().float()
        cands = {"moeserve": ours}
        from moeserve.kernels import mla_prefill as mp
        default_cfg = mp._cfg

        for cfg in ((128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3), (128, 32, 8, 4)):
            def swept(cfg=cfg):
                mp._cfg = lambda *a: cfg
                try:
                    return ours()
                finally:
                    mp._cfg = default_cfg
            cands[f"moeserve{cfg}"] = swept
        for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),):
            def call(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            cands[name] = call
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func

            qv = torch.cat([q_nope, q_pe], -1)
            kk = torch.cat([kv[..., :N], k_pe[:, None, :].expand(T, H, P)], -1)
            vv = kv[..., N:].contiguous()
            cu = torch.tensor([0, T], **i32)
            cands["vllm-fa3"] = lambda: flash_attn_varlen_func(qv, kk, vv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                               max_seqlen_q=T, max_seqlen_k=T, softmax_scale=scale,
                                                               causal=True, fa_version=3)
        except Exception as exc:  # not installed here
            print(f"vllm-fa3: not available ({type(exc).__name__}: {str(exc)[:120]})")
        for name, fn in cands.items():
            try:
                o = fn()
                o = o.float() if name.startswith("moeserve") or name == "vllm-fa3" else o[0].transpose(0, 1).float()
                err = (o - o_ours).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=10, rep=200 if T > 16384 else 100, return_mode="median")
            except Exception as exc:
                print(f"T={T} {name}: failed {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            tf = flops(T) / ms / 1e9
            print(f"T={T} {name}: {ms:.2f} ms {tf:.0f} TFLOP/s (max |diff| vs moeserve {err:.2e})", flush=True)
            results.append({"tokens": T, "impl": name, "ms": ms, "TFLOPs": tf, "max_diff": err})
        del q, k, v, kv, q_nope, q_pe
        torch.cuda.empty_cache()
    for new, prefix in ((8192, 24576), (8192, 8192), (2048, 8192)):
        results += chunk_case(new, prefix)
    if args.out:
        (Path(args.out) / "mla_prefill_peers.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
