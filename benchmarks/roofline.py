"""The physical floor of a step, per ../shared/BENCHMARKS.md, and the two ceilings it is measured against.

Pure arithmetic (importable without torch, tested on CPU):
  decode step, batch B:  t >= max(bytes / BW, FLOPs / peak), bytes = W_dense + L_moe * E_hit(B) * W_expert
                         + B * KV_read, E_hit(B) = E * (1 - (1 - k/E)^B)
  prefill of N tokens:   t >= max(FLOPs / peak, bytes / BW), FLOPs = 2 * matmul params * N + attention
The memory term is BENCHMARKS.md's formula; the compute term only makes the floor tighter where it binds.
"Matmul params" leaves out the embedding table (a lookup, not a product) and counts lm_head only for the
tokens whose logits are taken (one per sequence), so the floor never counts work an engine need not do.

Measurement (GPU, run as `python benchmarks/roofline.py --shape qwen3-30b-a3b`): a large device-to-device
copy (bytes read + written over time) and a large bf16 matmul, random data, warm-up, median of event timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelFacts:
    """What the floor needs to know about an architecture, in bytes at the benchmark dtype."""

    w_dense_bytes: float  # every non-expert weight read once per step (attention, norms, shared experts, router, dense MLPs, lm_head)
    w_expert_bytes: float  # one routed expert of one layer
    n_moe_layers: int
    n_experts: int
    top_k: int
    kv_bytes_per_token: float  # all layers
    matmul_params: float  # per-token matmul params: active params less embeddings and lm_head
    lm_head_params: float
    attn_layers: int
    attn_heads: int
    qk_head_dim: int
    v_head_dim: int
    total_weight_bytes: float

    def __post_init__(self) -> None:
        if self.n_moe_layers and not (0 < self.top_k <= self.n_experts):
            raise ValueError(f"top_k must be in [1, n_experts], got k={self.top_k}, E={self.n_experts}")


def experts_hit(batch: int, n_experts: int, top_k: int) -> float:
    """Expected distinct experts a batch of `batch` tokens touches in one layer under uniform routing."""
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if n_experts == 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** batch)


def decode_step_bytes(m: ModelFacts, batch: int, ctx_tokens: float) -> float:
    return (
        m.w_dense_bytes
        + m.n_moe_layers * experts_hit(batch, m.n_experts, m.top_k) * m.w_expert_bytes
        + batch * ctx_tokens * m.kv_bytes_per_token
    )


def attention_flops(m: ModelFacts, q_tokens: float, ctx_tokens: float) -> float:
    """QK^T and PV for `q_tokens` queries that each attend to `ctx_tokens` keys (on average)."""
    return 2.0 * m.attn_layers * m.attn_heads * q_tokens * ctx_tokens * (m.qk_head_dim + m.v_head_dim)


def decode_step_flops(m: ModelFacts, batch: int, ctx_tokens: float) -> float:
    return 2.0 * (m.matmul_params + m.lm_head_params) * batch + attention_flops(m, batch, ctx_tokens)


def decode_step_floor_s(m: ModelFacts, batch: int, ctx_tokens: float, bw_Bps: float, peak_flops: float) -> float:
    return max(decode_step_bytes(m, batch, ctx_tokens) / bw_Bps, decode_step_flops(m, batch, ctx_tokens) / peak_flops)


def prefill_flops(m: ModelFacts, num_seqs: int, seq_len: int) -> float:
    """Prefill of num_seqs sequences of seq_len tokens, causal, no cached prefix, logits of the last token only."""
    n = num_seqs * seq_len
    attn = num_seqs * attention_flops(m, seq_len, (seq_len + 1) / 2.0)  # causal: key i sees i+1 keys
    return 2.0 * m.matmul_params * n + 2.0 * m.lm_head_params * num_seqs + attn


def prefill_floor_s(m: ModelFacts, num_seqs: int, seq_len: int, bw_Bps: float, peak_flops: float) -> float:
    n = num_seqs * seq_len
    bytes_ = (
        m.w_dense_bytes
        + m.n_moe_layers * experts_hit(n, m.n_experts, m.top_k) * m.w_expert_bytes
        + n * m.kv_bytes_per_token  # the KV written once
    )
    return max(prefill_flops(m, num_seqs, seq_len) / peak_flops, bytes_ / bw_Bps)


def decode_mean_ctx(input_len: int, output_len: int) -> float:
    """Mean cached length over the decode steps of one request (context input_len .. input_len+output_len-1)."""
    return input_len + (output_len - 1) / 2.0


def latency_floor_ms(m: ModelFacts, batch_sizes, input_len: int, output_len: int, bw_Bps: float, peak_flops: float) -> dict:
    """Decode-step floor (ms) per batch size, keyed by str(batch), and the prefill (TTFT) floor per batch."""
    ctx = decode_mean_ctx(input_len, output_len)
    return {
        "ctx_tokens": ctx,
        "decode_step_ms": {str(b): 1e3 * decode_step_floor_s(m, b, ctx, bw_Bps, peak_flops) for b in batch_sizes},
        "prefill_ms": {str(b): 1e3 * prefill_floor_s(m, b, input_len, bw_Bps, peak_flops) for b in batch_sizes},
    }


def throughput_floor(m: ModelFacts, num_requests: int, input_len: int, output_len: int, concurrency: int,
                     bw_Bps: float, peak_flops: float) -> dict:
    """Floor of the offline workload: every prompt prefilled once (compute-bound), then the decode steps run
    in waves of `concurrency` sequences (the most that fit in KV at once / max_num_seqs)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    conc = min(concurrency, num_requests)
    prefill_s = prefill_floor_s(m, num_requests, input_len, bw_Bps, peak_flops)
    full_waves, rest = divmod(num_requests, conc)
    ctx = decode_mean_ctx(input_len, output_len)
    steps = output_len - 1  # the first output token comes out of prefill
    decode_s = full_waves * steps * decode_step_floor_s(m, conc, ctx, bw_Bps, peak_flops)
    if rest:
        decode_s += steps * decode_step_floor_s(m, rest, ctx, bw_Bps, peak_flops)
    total_s = prefill_s + decode_s
    return {
        "concurrency": conc,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "output_tok_s": num_requests * output_len / total_s,
        "total_tok_s": num_requests * (input_len + output_len) / total_s,
    }


def kv_concurrency(free_bytes_for_kv: float, kv_bytes_per_token: float, seq_tokens: int, max_num_seqs: int) -> int:
    """How many sequences of seq_tokens fit in free_bytes_for_kv, capped at max_num_seqs (at least 1)."""
    fit = int(free_bytes_for_kv // (kv_bytes_per_token * seq_tokens)) if kv_bytes_per_token > 0 else max_num_seqs
    return max(1, min(max_num_seqs, fit))


# ---------------------------------------------------------------- architecture facts (the planner's reading)

def facts_from_config(config: dict, dtype_bytes: int = 2) -> ModelFacts:
    """ModelFacts of a HF config.json, through moeserve.plan.arch (the one source of architecture facts).
    A block-scaled fp8 checkpoint's projections and experts count 1 byte a weight (scales neglected); an int4
    checkpoint's experts (compressed-tensors, as Kimi K2.5 ships: routed experts only) or all its projections
    (AWQ, GPTQ) half a byte; embeddings, head and norms stay at dtype_bytes, as does the KV cache."""
    from moeserve.plan.arch import read_arch, text_config  # no torch

    arch = read_arch(text_config(config))
    method = (text_config(config).get("quantization_config") or {}).get("quant_method")
    wb = {"fp8": 1, "awq": 0.5, "gptq": 0.5}.get(method, dtype_bytes)  # projections
    eb = 0.5 if method in ("compressed-tensors", "awq", "gptq") else wb  # routed experts
    pc = {k: float(v) for k, v in arch.param_counts().items()}
    # A tied table is counted once, under embeddings, but the head still reads and multiplies all of it.
    lm_head = pc["embeddings"] if arch.tie_word_embeddings else pc["lm_head"]
    projections = pc["attention"] + pc["dense_mlp"] + pc["shared_experts"] + pc["router"]
    n_moe = len(arch.moe_layers) if arch.is_moe else 0
    if arch.attention == "mla":  # counted in its naive (decompressed) form
        qk_dim, v_dim = arch.qk_nope_head_dim + arch.qk_rope_head_dim, arch.v_head_dim
    else:
        qk_dim = v_dim = arch.head_dim
    expert_params = float(arch.expert_params()) if n_moe else 0.0  # one expert's
    return ModelFacts(
        w_dense_bytes=projections * wb + (pc["norms"] + lm_head) * dtype_bytes,
        w_expert_bytes=expert_params * eb,
        n_moe_layers=n_moe,
        n_experts=arch.num_experts if n_moe else 0,
        top_k=arch.num_experts_per_tok if n_moe else 0,
        kv_bytes_per_token=float(arch.kv_bytes_per_token(dtype_bytes)),
        # active counts embeddings and (untied) lm_head; norms are elementwise
        matmul_params=pc["active"] - pc["embeddings"] - pc["lm_head"] - pc["norms"],
        lm_head_params=lm_head,
        attn_layers=arch.num_layers,
        attn_heads=arch.num_heads,
        qk_head_dim=int(qk_dim),
        v_head_dim=int(v_dim),
        total_weight_bytes=(pc["total"] - pc["embeddings"] - pc["lm_head"] - pc["norms"] - pc["routed_experts"]) * wb
        + pc["routed_experts"] * eb + (pc["embeddings"] + pc["lm_head"] + pc["norms"]) * dtype_bytes,
    )


# ---------------------------------------------------------------- measurement (GPU)

def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("roofline: CUDA is not available; the ceilings can only be measured on the GPU")
    return torch


def _time_ms(torch, fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def measure_bandwidth(nbytes: int = 2 << 30, warmup: int = 3, iters: int = 20) -> dict:
    """Device-to-device copy of nbytes (>> L2): (read + written) / median time."""
    torch = _require_cuda()
    from workloads import median

    n = nbytes // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = _time_ms(torch, lambda: dst.copy_(src), warmup, iters)
    if not torch.equal(dst[:: max(1, n // 4096)], src[:: max(1, n // 4096)]):
        raise RuntimeError("roofline: the copy did not copy")
    t = median(times) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_copied": 2 * n, "median_ms": t * 1e3, "min_ms": min(times), "iters": iters, "bw_TBps": 2 * 2 * n / t / 1e12}


def measure_matmul_peak(shapes=((8192, 8192, 8192), (16384, 8192, 8192)), warmup: int = 5, iters: int = 20) -> dict:
    """bf16 matmul through torch (cuBLAS), random data, two rotating input sets; best median over shapes."""
    torch = _require_cuda()
    from workloads import median

    runs = []
    for (m, n, k) in shapes:
        sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                 torch.randn(k, n, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        i = [0]

        def step():
            a, b = sets[i[0] % 2]
            i[0] += 1
            torch.mm(a, b, out=out)

        times = _time_ms(torch, step, warmup, iters)
        if not torch.isfinite(out).all():
            raise RuntimeError("roofline: matmul produced non-finite values")
        t = median(times) / 1e3
        runs.append({"mnk": [m, n, k], "median_ms": t * 1e3, "TFLOPs": 2.0 * m * n * k / t / 1e12})
        del sets, out
    torch.cuda.empty_cache()
    best = max(runs, key=lambda r: r["TFLOPs"])
    return {"runs": runs, "peak_TFLOPs": best["TFLOPs"]}


def measure_ceilings() -> dict:
    torch = _require_cuda()
    bw = measure_bandwidth()
    mm = measure_matmul_peak()
    free, total = torch.cuda.mem_get_info()
    return {
        "bw_TBps": bw["bw_TBps"],
        "peak_TFLOPs": mm["peak_TFLOPs"],
        "gpu": torch.cuda.get_device_name(),
        "gpu_total_bytes": total,
        "copy": bw,
        "matmul": mm,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", help="also print the floors of this pinned shape")
    p.add_argument("--json", help="write the measured ceilings here")
    p.add_argument("--bw-TBps", type=float, help="skip measuring: use this bandwidth (for floors on a CPU machine)")
    p.add_argument("--peak-TFLOPs", type=float, help="skip measuring: use this bf16 peak")
    a = p.parse_args(argv)
    if a.bw_TBps and a.peak_TFLOPs:
        ceil = {"bw_TBps": a.bw_TBps, "peak_TFLOPs": a.peak_TFLOPs, "given": True}
    else:
        ceil = measure_ceilings()
    print(f"copy bandwidth {ceil['bw_TBps']:.3f} TB/s, bf16 matmul {ceil['peak_TFLOPs']:.1f} TFLOP/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(ceil, f, indent=1)
    if a.shape:
        from shapes import get_shape, load_config
        from workloads import LatencySpec, ThroughputSpec

        m = facts_from_config(load_config(get_shape(a.shape)))
        bw, peak = ceil["bw_TBps"] * 1e12, ceil["peak_TFLOPs"] * 1e12
        print(json.dumps(asdict(m), indent=1))
        lat = LatencySpec()
        fl = latency_floor_ms(m, lat.batch_sizes, lat.input_len, lat.output_len, bw, peak)
        for b, ms in fl["decode_step_ms"].items():
            print(f"decode step floor, batch {b:>4}: {ms:7.3f} ms  (prefill of {b} x {lat.input_len}: {fl['prefill_ms'][b]:.2f} ms)")
        tp = ThroughputSpec()
        for conc in (64, 128, 256):
            f = throughput_floor(m, tp.num_requests, tp.input_len, tp.output_len, conc, bw, peak)
            print(f"throughput floor at concurrency {conc}: {f['total_s']:.1f} s, {f['output_tok_s']:.0f} output tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
