"""Check, then time, every moeserve kernel on the GPU, beside the two ceilings measured in the same run.

1. ceilings: device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul, on random data;
2. checks: every kernel against moeserve.kernels.reference on fresh random inputs (bf16 and fp32, odd lengths,
   poisoned outputs), plus CUDA-graph capture/replay with new inputs written in place; any miss -> exit 1;
3. timings: fused_moe at qwen3-30b-a3b shapes (E=128, K=8, H=2048, I=768) for several token counts, beside a
   plain torch per-expert loop; the decode projections (kernels.linear, every candidate beside cuBLAS; R1's fp8
   projections, kernels.fp8_linear, every candidate); paged-attention decode (batch 1/32/128, context 384/4096), prefill 8k, chunked
   prefill over a cached prefix; KV write; MLA decode (a config sweep, distinct and shared-prefix pages); routing
   (the router kernels beside the torch path). Decode-sized work is timed as CUDA-graph replays over rotating
   inputs larger than L2, large work with triton.testing.do_bench (median).
Writes kernels-<date>-<gpu>.json and .log under $OUT (or --out); prints a compact table last.

    python benchmarks/kernels/bench_kernels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

LOG: list[str] = []
E, K, H, INTER = 128, 8, 2048, 768  # qwen3-30b-a3b experts
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 4, 128, 16  # qwen3-30b-a3b attention
MAX_MODEL_LEN = 40960  # what the decode graphs pass as max_seq_len
DEV = "cuda"
SMOKE = False  # --cpu-smoke: tiny shapes through the Triton interpreter, to test this script without a GPU


def _smoke_mode() -> None:
    """Shrink every shape and run on CPU through the interpreter (timings there mean nothing)."""
    global E, K, H, INTER, HEADS, KV_HEADS, HEAD_DIM, MAX_MODEL_LEN, DEV, SMOKE
    os.environ["TRITON_INTERPRET"] = "1"
    E, K, H, INTER, HEADS, KV_HEADS, HEAD_DIM, MAX_MODEL_LEN, DEV, SMOKE = 8, 2, 64, 32, 4, 2, 64, 256, "cpu", True


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------- ceilings
def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def measure_ceilings() -> dict:
    n = (1 << 30) if not SMOKE else (1 << 20)  # bytes per buffer
    a = torch.randn(n // 2, dtype=torch.bfloat16, device=DEV)
    b = torch.empty_like(a)
    ms = eager_ms(lambda: b.copy_(a), rep=300)
    bw = 2 * n / (ms * 1e-3)
    m = 8192 if not SMOKE else 128
    x = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    ms_mm = eager_ms(lambda: x @ y, rep=500)
    peak = 2 * m ** 3 / (ms_mm * 1e-3)
    del a, b, x, y
    empty_cache()
    say(f"ceilings: copy {bw / 1e12:.2f} TB/s ({n >> 20} MiB read + written in {ms:.3f} ms), "
        f"bf16 matmul {peak / 1e12:.0f} TFLOP/s ({m}^3 in {ms_mm:.3f} ms)")
    return {"copy_TBps": bw / 1e12, "bf16_TFLOPs": peak / 1e12}


# ---------------------------------------------------------------------------------------------- inputs
def attn_batch(ctx_lens, q_lens, heads, kv_heads, d, page, dtype, spare=4, rotations=1):
    """Random cache pages (shuffled ids), `rotations` independent block tables over disjoint pages, and q."""
    pages = [-(-c // page) for c in ctx_lens]
    per_set = sum(pages)
    num_blocks = per_set * rotations + spare
    cache = torch.randn(2, num_blocks, page, kv_heads, d, device=DEV).to(dtype)
    perm = torch.randperm(num_blocks, device=DEV).int()
    tables = []
    for r in range(rotations):
        t = torch.full((len(ctx_lens), max(pages) + 1), num_blocks - 1, dtype=torch.int32, device=DEV)
        used = r * per_set
        for b, n in enumerate(pages):
            t[b, :n] = perm[used:used + n]
            used += n
        tables.append(t)
    qsl = torch.zeros(len(ctx_lens) + 1, dtype=torch.int32, device=DEV)
    qsl[1:] = torch.tensor(q_lens, device=DEV).cumsum(0)
    q = torch.randn(int(sum(q_lens)), heads, d, device=DEV).to(dtype)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    return q, cache, qsl, seq_lens, tables


def moe_inputs(T, e, k, h, inter, dtype, weights=None):
    x = torch.randn(T, h, device=DEV).to(dtype)
    if weights is None:
        w13 = (torch.randn(e, 2 * inter, h, device=DEV) / h ** 0.5).to(dtype)
        w2 = (torch.randn(e, h, inter, device=DEV) / inter ** 0.5).to(dtype)
    else:
        w13, w2 = weights
    topk_w, ids = torch.randn(T, e, device=DEV).softmax(-1).topk(k)
    return x, w13, w2, topk_w, ids.int()


def rel_err(out, ref) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- checks
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}


def run_checks() -> list[dict]:
    from moeserve.kernels import attention, fused_moe, reference

    results = []

    def record(name, err, tol):
        ok = math.isfinite(err) and err < tol
        results.append({"name": name, "rel_err": err, "tol": tol, "ok": ok})
        say(f"  {'ok  ' if ok else 'FAIL'} {name:<66} rel err {err:.2e} (tol {tol:.0e})")

    say("checks (fresh random inputs, outputs poisoned with NaN):")
    attn_cases = [
        ("decode", [5, 17, 40, 1], [1, 1, 1, 1], 32, 4, 128, 16),
        ("decode long", [4096, 1000, 17], [1, 1, 1], 32, 4, 128, 16),
        ("decode MHA page32", [383, 384, 385], [1, 1, 1], 16, 16, 128, 32),
        ("prefill", [1024, 777], [1024, 777], 32, 4, 128, 16),
        ("prefill on cached prefix", [2000, 513], [257, 100], 32, 8, 96, 16),
        ("mixed chunked prefill + decodes", [3000, 129, 64, 1], [512, 129, 1, 1], 32, 4, 128, 16),
        ("prefill head_dim 64 group 1", [300, 45], [300, 45], 8, 8, 64, 16),
    ]
    moe_cases = [(1, 128, 8, 2048, 768), (7, 128, 8, 2048, 768), (333, 60, 4, 2048, 1408),
                 (4099, 128, 8, 1024, 384), (257, 8, 2, 4096, 3584)]
    kv_write = (1001, 4, 128, 80)
    long_moe = (40000, 16, 2, 256, 128, 16384)
    if SMOKE:
        attn_cases = [("decode", [5, 17, 40], [1, 1, 1], 4, 2, 64, 16),
                      ("mixed", [37, 50, 3], [20, 3, 1], 4, 2, 80, 32)]
        moe_cases = [(1, 8, 2, 64, 32), (37, 16, 4, 96, 40)]
        kv_write = (13, 2, 64, 3)
        long_moe = (700, 4, 2, 32, 16, 256)
    for dtype in (torch.bfloat16, torch.float32):
        for name, ctx, ql, h, kvh, d, page in attn_cases:
            q, cache, qsl, lens, tables = attn_batch(ctx, ql, h, kvh, d, page, dtype)
            out = torch.full_like(q, float("nan"))
            attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables[0],
                                      scale=d ** -0.5, max_query_len=max(ql), max_seq_len=MAX_MODEL_LEN, out=out)
            ref = reference.ref_paged_attention(q.double(), cache.double(), query_start_loc=qsl, seq_lens=lens,
                                                block_tables=tables[0], scale=d ** -0.5)
            record(f"paged_attention {name} {str(dtype)[6:]} ctx={ctx} q={ql} H{h}/{kvh} D{d}", rel_err(out, ref),
                   TOL[dtype])
        T, kvh, d, blocks = kv_write
        k, v = torch.randn(2, T, kvh, d, device=DEV).to(dtype)
        slots = torch.randperm(blocks * 16, device=DEV)[:T]
        slots[::7] = -1
        cache = torch.randn(2, blocks, 16, kvh, d, device=DEV).to(dtype)
        expect = cache.clone()
        reference.ref_write_kv_cache(k, v, expect, slots)
        attention.write_kv_cache(k, v, cache, slots)
        record(f"write_kv_cache {str(dtype)[6:]} T={T} (exact)", 0.0 if torch.equal(cache, expect) else 1.0, 1e-30)
        for T, e, k_, h, i in moe_cases:
            x, w13, w2, tw, ids = moe_inputs(T, e, k_, h, i, dtype)
            out = torch.full_like(x, float("nan"))
            fused_moe.fused_moe(x, w13, w2, tw, ids, out=out)
            ref = reference.ref_fused_moe(x.double(), w13.double(), w2.double(), tw, ids)
            record(f"fused_moe {str(dtype)[6:]} T={T} E={e} K={k_} H={h} I={i}", rel_err(out, ref), TOL[dtype])
    T, e, k_, h, i, chunk = long_moe
    x, w13, w2, tw, ids = moe_inputs(T, e, k_, h, i, torch.bfloat16)
    out = fused_moe.fused_moe(x, w13, w2, tw, ids, chunk_size=chunk)
    ref = reference.ref_fused_moe(x.double(), w13.double(), w2.double(), tw, ids)
    record(f"fused_moe bf16 T={T} in {chunk}-token chunks", rel_err(out, ref), TOL[torch.bfloat16])
    if DEV == "cuda":
        results += check_graph_replay()
    else:
        say("  skip CUDA graph replay check (no CUDA)")
    return results


def check_graph_replay() -> list[dict]:
    """Capture decode attention and fused_moe once, write new inputs in place, replay: must match the reference."""
    from moeserve.kernels import attention, fused_moe, reference

    out_rows = []
    B = 8
    q, cache, qsl, lens, tables = attn_batch([700] * B, [1] * B, HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16)
    tables = tables[0]
    x, w13, w2, tw, ids = moe_inputs(B, E, K, H, INTER, torch.bfloat16)

    def step():
        a = attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables,
                                      scale=HEAD_DIM ** -0.5, max_query_len=1, max_seq_len=MAX_MODEL_LEN)
        m = fused_moe.fused_moe(x, w13, w2, tw, ids)
        return a, m

    step()  # eager warm-up: compiles and tunes before capture, as the runner must
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a_out, m_out = step()
    # new inputs in place: other lengths, other pages, other routing
    lens.copy_(torch.tensor([1, 15, 16, 17, 300, 699, 700, 2], dtype=torch.int32))
    tables.copy_(tables[torch.randperm(B, device=DEV)])
    q.copy_(torch.randn_like(q))
    x.copy_(torch.randn_like(x))
    _, new_ids = torch.randn(B, E, device=DEV).topk(K)
    ids.copy_(new_ids.int())
    tw.copy_(torch.rand_like(tw))
    g.replay()
    torch.cuda.synchronize()
    ref_a = reference.ref_paged_attention(q.double(), cache.double(), query_start_loc=qsl, seq_lens=lens,
                                          block_tables=tables, scale=HEAD_DIM ** -0.5)
    ref_m = reference.ref_fused_moe(x.double(), w13.double(), w2.double(), tw, ids)
    for name, out, ref in (("paged_attention decode", a_out, ref_a), ("fused_moe T=8", m_out, ref_m)):
        err = rel_err(out, ref)
        ok = math.isfinite(err) and err < TOL[torch.bfloat16]
        out_rows.append({"name": f"CUDA graph replay, new inputs: {name}", "rel_err": err,
                         "tol": TOL[torch.bfloat16], "ok": ok})
        say(f"  {'ok  ' if ok else 'FAIL'} {'CUDA graph replay, new inputs: ' + name:<66} rel err {err:.2e}")
    return out_rows


POST_CHECKS: list[dict] = []


def post_check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """The output of a timed call (so with the tuned config) against the reference (fp32: big shapes)."""
    err = rel_err(out, ref)
    ok = math.isfinite(err) and err < TOL[torch.bfloat16]
    POST_CHECKS.append({"name": f"tuned: {name}", "rel_err": err, "tol": TOL[torch.bfloat16], "ok": ok})
    if not ok:
        say(f"    FAIL tuned config output of {name}: rel err {err:.2e}")


# ---------------------------------------------------------------------------------------------- timing
def graph_ms(calls, min_total_ms: float = 20.0) -> float:
    """Per-call time of `calls` captured in one CUDA graph (cycled, repeated), median over replays."""
    for c in calls:  # eager first: compile and tune outside the capture
        c()
    sync()
    if DEV != "cuda":
        return eager_ms(calls[0])
    t0 = time.perf_counter()
    for c in calls:
        c()
    sync()
    est_ms = max((time.perf_counter() - t0) * 1e3 / len(calls), 1e-3)
    reps = max(1, min(200, int(min_total_ms / (est_ms * len(calls))) + 1))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for c in calls:
                c()
    g.replay()
    sync()
    times = []
    for _ in range(9):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(calls)))
    del g
    return statistics.median(times)



def time_candidates(label: str, candidates, bytes_: int, make_calls) -> list:
    """[(ms, cfg)] of each candidate config timed by graph replay over make_calls(cfg); failures reported, skipped."""
    timed = []
    for cfg in candidates:
        try:
            ms = graph_ms(make_calls(cfg))
        except Exception as exc:  # report, go on
            say(f"    {label} {cfg}: failed ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        timed.append((ms, cfg))
        say(f"    {label} {cfg}: {ms * 1e3:.1f} us, {bytes_ / (ms * 1e-3) / 1e9:.0f} GB/s")
    return timed

def eager_ms(fn, rep=200) -> float:
    if DEV != "cuda":  # smoke mode: one wall-clock run
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def row(name, ms, *, bytes_=0.0, flops=0.0, ceil, mode, target=None, extra=None) -> dict:
    t_bw = bytes_ / (ceil["copy_TBps"] * 1e12) * 1e3
    t_fl = flops / (ceil["bf16_TFLOPs"] * 1e12) * 1e3
    floor = max(t_bw, t_fl)
    r = {"name": name, "mode": mode, "ms": ms, "floor_ms": floor, "bound": "memory" if t_bw >= t_fl else "compute",
         "bytes": bytes_, "flops": flops, "GBps": bytes_ / (ms * 1e-3) / 1e9, "TFLOPs": flops / (ms * 1e-3) / 1e12,
         "pct_bw": 100 * t_bw / ms, "pct_peak": 100 * t_fl / ms, "pct_floor": 100 * floor / ms}
    if target:
        r["target"] = target
    r.update(extra or {})
    say(f"  {name:<44} {ms * 1e3:9.1f} us  floor {floor * 1e3:8.1f} us ({r['bound']})  "
        f"{r['GBps']:7.0f} GB/s = {r['pct_bw']:5.1f}% BW  {r['TFLOPs']:6.1f} TFLOP/s = {r['pct_peak']:5.1f}% peak"
        + (f"  [{mode}]" if mode else ""))
    return r


def torch_moe_loop(x, w13, w2, tw, ids):
    """The plain torch baseline: per hit expert, gather tokens, two matmuls, scatter-add (model dtype)."""
    out = torch.zeros_like(x)
    flat = ids.reshape(-1).long()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tok = order // ids.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n:
            sel = tok[start:start + n]
            gu = x[sel] @ w13[e].t()
            h = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
            out.index_add_(0, sel, (h @ w2[e].t()) * tw.reshape(-1)[order[start:start + n]].unsqueeze(1).to(x.dtype))
            start += n
    return out


def bench_moe(ceil, token_counts) -> list[dict]:
    from moeserve.kernels import fused_moe, reference

    say(f"fused_moe, qwen3-30b-a3b experts (E={E}, K={K}, H={H}, I={INTER}), bf16:")
    rows = []
    weights = moe_inputs(1, E, K, H, INTER, torch.bfloat16)[1:3]
    w_expert = 3 * H * INTER * 2
    for T in token_counts:
        sets = 8 if T <= 512 else 1  # rotate routing (and so the experts read) across calls
        ins = [moe_inputs(T, E, K, H, INTER, torch.bfloat16, weights) for _ in range(sets)]
        outs = [torch.empty(T, H, dtype=torch.bfloat16, device=DEV) for _ in range(sets)]
        hit = statistics.mean(len(torch.unique(i[4])) for i in ins)
        bytes_ = hit * w_expert + 2 * T * H * 2 + T * K * 8
        flops = 2 * T * K * 3 * H * INTER
        calls = [lambda i=i: fused_moe.fused_moe(*ins[i], out=outs[i]) for i in range(sets)]
        if T <= 512:
            ms = graph_ms(calls)
            mode = "graph"
        else:
            ms = eager_ms(calls[0])
            mode = "eager"
        target = {1: ">=70% of BW", 8192: ">=50% of bf16 peak"}.get(T)
        ref_ms = None
        if T in (1, 128, 8192):
            ref_ms = eager_ms(lambda: torch_moe_loop(*ins[0]), rep=100)
        r = row(f"fused_moe T={T}", ms, bytes_=bytes_, flops=flops, ceil=ceil, mode=mode, target=target,
                extra={"tokens": T, "experts_hit": hit, "torch_loop_ms": ref_ms})
        if ref_ms:
            say(f"    plain torch per-expert loop: {ref_ms * 1e3:.1f} us (x{ref_ms / ms:.1f} slower)")
        if T <= 8:
            eager = eager_ms(calls[0])
            r["eager_ms"] = eager
            say(f"    eager (no graph, includes Python launch cost): {eager * 1e3:.1f} us")
        x, w13, w2, tw, ids = ins[0]
        post_check(f"fused_moe T={T}", fused_moe.fused_moe(x, w13, w2, tw, ids), reference.ref_fused_moe(x.float(), w13.float(), w2.float(), tw, ids))
        rows.append(r)
        del ins, outs
    return rows


MOE_SWEEP_SHAPES = [  # (name, E, K, H, I per rank): where moeserve trailed vLLM at batch 32-128 (NOTES.md)
    ("qwen3-30b-a3b", 128, 8, 2048, 768),
    ("qwen3-235b-a22b TP=4", 128, 8, 4096, 384),
    ("mixtral-8x7b TP=2", 8, 2, 4096, 7168),
]
GATE_UP_TILES = [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3),
                 (128, 128, 8, 3), (64, 256, 4, 3), (32, 256, 4, 3)]  # (BLOCK_N1, BLOCK_K1, W1, S1)
DOWN_TILES = [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 4, 4), (256, 64, 8, 3),
              (256, 128, 8, 3), (64, 256, 4, 3), (32, 256, 4, 3)]  # (BLOCK_N2, BLOCK_K2, W2, S2)


def gate_up_tiles(cfg: dict, tiles=GATE_UP_TILES) -> list[dict]:
    return [{**cfg, "BLOCK_N1": a, "BLOCK_K1": b, "W1": w, "S1": st} for a, b, w, st in tiles]


def down_tiles(cfg: dict, tiles=DOWN_TILES) -> list[dict]:
    return [{**cfg, "BLOCK_N2": a, "BLOCK_K2": b, "W2": w, "S2": st} for a, b, w, st in tiles]


def block_ms(cfg: dict, ms=(16, 32, 64)) -> list[dict]:
    return [{**cfg, "BLOCK_M": m} for m in ms]


def coordinate_search(label: str, start, steps, bytes_: int, calls, keep=lambda c: True):
    """From start (ms, cfg): each step varies one part of the best so far (step(cfg) -> configs), keeps the best."""
    best = start
    for step in steps:
        cands = [c for c in step(best[1]) if c != best[1] and keep(c)]
        best = min(time_candidates(label + " [search]", cands, bytes_, calls) + [best], key=lambda t: t[0])
    return best


def bench_moe_sweep(ceil) -> list[dict]:
    """The sorted fused-MoE path at 32 and 128 tokens on the shapes where batches of 32-128 trailed vLLM: today's
    candidates (what the tuner picks from), then a coordinate search from their best: the gate/up tile, the down
    tile, then BLOCK_M. Each config is timed as a graph over 8 routings (weights > L2); the search's best is
    checked against the reference. Tells whether a better config exists outside moe_candidates."""
    from moeserve.kernels import fused_moe, reference
    from moeserve.kernels.autotune import bucket

    shapes = MOE_SWEEP_SHAPES if not SMOKE else [("smoke", 8, 2, 64, 32)]
    rows = []
    for name, e, k, h, inter in shapes:
        weights = moe_inputs(1, e, k, h, inter, torch.bfloat16)[1:3]
        w_expert = 3 * h * inter * 2
        for T in (32, 128) if not SMOKE else (5,):
            ins = [moe_inputs(T, e, k, h, inter, torch.bfloat16, weights) for _ in range(8)]
            outs = [torch.empty(T, h, dtype=torch.bfloat16, device=DEV) for _ in range(8)]
            inter1 = torch.empty(T * k, inter, dtype=torch.bfloat16, device=DEV)
            inter2 = torch.empty(T * k, h, dtype=torch.bfloat16, device=DEV)
            hit = statistics.mean(len(torch.unique(i[4])) for i in ins)
            bytes_ = hit * w_expert + 2 * T * h * 2
            label = f"moe sweep {name} T={T}"
            say(f"{label}: E={e} K={k} H={h} I={inter}, {hit:.0f} experts hit, {bytes_ / 1e6:.0f} MB a call")

            def calls(cfg):
                return [lambda i=i: fused_moe._moe_chunk(cfg, *ins[i], outs[i], inter1, inter2) for i in range(8)]

            base = [c for c in fused_moe.moe_candidates(bucket(T), k, e) if not c.get("GEMV1")]
            timed = time_candidates(label + " [today]", base, bytes_, calls)
            today = min(timed, key=lambda t: t[0])
            best = coordinate_search(label, today, (gate_up_tiles, down_tiles, block_ms), bytes_, calls)
            x, w13, w2, tw, ids = ins[0]
            fused_moe._moe_chunk(best[1], x, w13, w2, tw, ids, outs[0], inter1, inter2)
            post_check(f"{label} best", outs[0], reference.ref_fused_moe(x.float(), w13.float(), w2.float(), tw, ids))
            say(f"    today's best {today[0] * 1e3:.1f} us {today[1]}; search's best {best[0] * 1e3:.1f} us {best[1]} "
                f"({today[0] / best[0]:.3f}x)")
            rows.append(row(f"{label} [today]", today[0], bytes_=bytes_, ceil=ceil, mode="graph",
                            extra={"config": today[1], "experts_hit": hit}))
            rows.append(row(f"{label} [search]", best[0], bytes_=bytes_, ceil=ceil, mode="graph",
                            extra={"config": best[1], "experts_hit": hit}))
            del ins, outs, inter1, inter2
        del weights
        empty_cache()
    return rows


FP8_PREFILL_DOWN_TILES = [(64, 128, 4, 3), (64, 128, 8, 4), (64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3),
                          (128, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (256, 128, 8, 3), (256, 64, 8, 4)]
FP8_PREFILL_GATE_UP_TILES = [(64, 128, 4, 3), (64, 128, 8, 4), (128, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4),
                             (256, 128, 8, 3), (128, 64, 4, 4)]  # (BLOCK_N, BLOCK_K, warps, stages); K <= the block


def bench_moe_sweep_fp8(ceil) -> list[dict]:
    """qwen3-30b-a3b's fp8 experts ([128, 128] blocks, the W8A8 form) at a prefill step's 16,384 and 8,192 tokens,
    where the down kernel ran at ~370 TFLOP/s against gate/up's ~570 in the engine's profile (session 21): today's
    candidates, then a coordinate search from their best over the down tile, the gate/up tile, BLOCK_M, and the down
    tile again. The tuner times both kernels under one config, so a down tile better on its own can hide behind a
    worse gate/up tile of the same candidate. The search's best is checked against today's best output (the same
    arithmetic, other tiles)."""
    from moeserve.kernels import fused_moe as fm
    from moeserve.kernels.autotune import bucket
    from moeserve.layers.quant.fp8 import quantize_blocks

    block = (128, 128) if not SMOKE else (32, 32)
    e, k, h, inter = (E, K, H, INTER) if not SMOKE else (8, 2, 64, 64)
    w13, w2 = moe_inputs(1, e, k, h, inter, torch.bfloat16)[1:3]
    q13, s13 = (torch.stack(t) for t in zip(*[quantize_blocks(w13[i], block) for i in range(e)]))
    q2, s2 = (torch.stack(t) for t in zip(*[quantize_blocks(w2[i], block) for i in range(e)]))
    del w13, w2
    scales = (s13, s2, {"w13": block, "w2": block}, (None, None), 1)
    scale_k = (block[1] if block[1] < h else 0, block[1] if block[1] < inter else 0)

    def down(c):
        return down_tiles(c, FP8_PREFILL_DOWN_TILES)

    def fits(c):  # W8A8: each K tile inside one scale block
        return max(c["BLOCK_K1"], c["BLOCK_K2"]) <= block[1]

    steps = (down, lambda c: gate_up_tiles(c, FP8_PREFILL_GATE_UP_TILES), lambda c: block_ms(c, (32, 64, 128)), down)
    rows = []
    for T in (16384, 8192) if not SMOKE else (40,):
        ins = [moe_inputs(T, e, k, h, inter, torch.bfloat16, (q13, q2)) for _ in range(2)]
        outs = [torch.empty(T, h, dtype=torch.bfloat16, device=DEV) for _ in range(2)]
        inter1 = torch.empty(T * k, inter, dtype=torch.bfloat16, device=DEV)
        inter2 = torch.empty(T * k, h, dtype=torch.bfloat16, device=DEV)
        flops = 2 * T * k * 3 * h * inter
        hit = len(torch.unique(ins[0][4]))
        bytes_ = hit * (3 * h * inter + (s13[0].numel() + s2[0].numel()) * 4) + 2 * T * h * 2  # fp8 experts, x, out
        label = f"moe sweep fp8 T={T}"
        say(f"{label}: E={e} K={k} H={h} I={inter}, {block[0]}x{block[1]} blocks, W8A8; {flops / 1e12:.2f} TFLOP a "
            f"call")

        def calls(cfg):
            return [lambda i=i: fm._moe_chunk(cfg, ins[i][0], q13, q2, *ins[i][3:], outs[i], inter1, inter2, None,
                                              scales) for i in range(2)]

        base = [c for c in fm.moe_candidates(bucket(T), k, e, 2, scale_k, a8=True) if c.get("A8")]
        today = min(time_candidates(label + " [today]", base, bytes_, calls), key=lambda t: t[0])
        fm._moe_chunk(today[1], ins[0][0], q13, q2, *ins[0][3:], outs[0], inter1, inter2, None, scales)
        ref = outs[0].clone()
        best = coordinate_search(label, today, steps, bytes_, calls, keep=fits)
        fm._moe_chunk(best[1], ins[0][0], q13, q2, *ins[0][3:], outs[0], inter1, inter2, None, scales)
        post_check(f"{label} search's best against today's best", outs[0], ref)
        say(f"    today's best {today[0] * 1e3:.1f} us ({flops / today[0] / 1e9:.0f} TFLOP/s) {today[1]}; search's "
            f"best {best[0] * 1e3:.1f} us ({flops / best[0] / 1e9:.0f} TFLOP/s) {best[1]} ({today[0] / best[0]:.3f}x)")
        for which, (ms, cfg) in (("today", today), ("search", best)):
            rows.append(row(f"{label} [{which}]", ms, bytes_=bytes_, flops=flops, ceil=ceil, mode="graph",
                            extra={"config": cfg, "experts_hit": hit}))
        del ins, outs, inter1, inter2, ref
        empty_cache()
    return rows


def bench_linear(ceil) -> list[dict]:
    """Decode projections of qwen3-30b-a3b: every candidate of kernels.linear (cuBLAS first) and the tuned choice,
    on weight sets rotated past L2 so that each call streams its weight from HBM."""
    from moeserve.kernels import linear
    from moeserve.kernels.autotune import bucket

    shapes = (("qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM, H), ("o_proj", H, HEADS * HEAD_DIM), ("router", E, H))
    say("linear (decode projections, qwen3-30b-a3b), bf16, one layer; every candidate, then the tuned choice:")
    rows = []
    for name, N, Kd in shapes:
        w_bytes = N * Kd * 2
        sets = max(2, min(64, math.ceil(120e6 / w_bytes))) if not SMOKE else 2
        ws = [torch.randn(N, Kd, device=DEV, dtype=torch.bfloat16) / Kd ** 0.5 for _ in range(sets)]
        for M in (1, 2, 8) if not SMOKE else (1, 3):
            x = torch.randn(M, Kd, device=DEV, dtype=torch.bfloat16)
            bytes_ = w_bytes + (M * Kd + M * N) * 2
            timed = time_candidates(f"{name} M={M}", linear.linear_candidates(bucket(M), N), bytes_,
                                    lambda c: [lambda w=w: linear.apply_config(c, x, w, None) for w in ws])
            ms = graph_ms([lambda w=w: linear.linear(x, w) for w in ws])
            cublas = next((t for t, c in timed if c.get("CUBLAS")), None)
            rows.append(row(f"linear {name} M={M} ({N}x{Kd})", ms, bytes_=bytes_, flops=2 * M * N * Kd, ceil=ceil,
                            mode="graph", extra={"cublas_ms": cublas, "candidates": [[c, t] for t, c in timed]}))
            if cublas:
                say(f"    cuBLAS alone: {cublas * 1e3:.1f} us (tuned choice x{cublas / ms:.2f} as fast)")
            post_check(f"linear {name} M={M}", linear.linear(x, ws[0]), torch.nn.functional.linear(x.float(),
                                                                                                    ws[0].float()))
        del ws
        empty_cache()
    return rows


def bench_fp8_linear(ceil) -> list[dict]:
    """DeepSeek-R1's and qwen3-30b-a3b's fp8 (e4m3, [128, 128] block scales) dense projections at decode: every
    candidate of kernels.fp8_linear (the W8A8 GEMM after its activation quant, or quantizing inside it), then the
    tuned choice, on weight sets rotated past L2. Bytes: the weight and its scales, x read, y written."""
    from moeserve.kernels import fp8_linear
    from moeserve.kernels.autotune import bucket
    from moeserve.layers.quant.fp8 import _expand

    shapes = (("q_a_proj", 1536, 7168), ("q_b_proj", 24576, 1536), ("kv_a_proj", 576, 7168),
              ("o_proj", 7168, 16384), ("shared gate_up", 4096, 7168), ("shared down", 7168, 2048),
              ("qwen3-30b qkv_proj", 5120, 2048), ("qwen3-30b o_proj", 2048, 4096))
    block = (128, 128)
    if SMOKE:
        shapes, block = (("q_a_proj", 96, 256), ("kv_a_proj", 40, 320)), (16, 32)
    bn, bk = block
    say(f"fp8_linear (DeepSeek-R1 dense projections, e4m3, {bn}x{bk} block scales, bf16 out), one layer; every "
        "candidate, then the tuned choice:")
    rows = []
    dtype = torch.bfloat16
    for name, N, Kd in shapes:
        w_bytes = N * Kd + (-(-N // bn)) * (-(-Kd // bk)) * 4
        sets = max(2, min(64, math.ceil(120e6 / w_bytes))) if not SMOKE else 2
        ws = [((torch.randn(N, Kd, device=DEV) * 64).to(torch.float8_e4m3fn),
               torch.rand(-(-N // bn), -(-Kd // bk), device=DEV) * 1e-3 + 1e-4) for _ in range(sets)]
        for M in (1, 4, 32) if not SMOKE else (1, 3):
            x = torch.randn(M, Kd, device=DEV, dtype=dtype)
            q, s = fp8_linear.quantize_act(x, bk)
            bytes_ = w_bytes + (M * Kd + M * N) * 2
            timed = time_candidates(  # each with its activation quant launch
                f"{name} M={M}", fp8_linear.fp8_candidates(bucket(M), N, Kd, bk, fp8_linear._sms(x.device)), bytes_,
                lambda c: [lambda w=w, sc=sc: fp8_linear.run_config(c, x, w, sc, None, torch.empty(
                    M, N, dtype=dtype, device=DEV), bn, bk) for w, sc in ws])
            ms = graph_ms([lambda w=w, sc=sc: fp8_linear.fp8_block_linear(x, w, sc, block) for w, sc in ws])
            rows.append(row(f"fp8_linear {name} M={M} ({N}x{Kd})", ms, bytes_=bytes_, flops=2 * M * N * Kd,
                            ceil=ceil, mode="graph", extra={"candidates": [[c, t] for t, c in timed]}))
            w, sc = ws[0]
            ref = _expand(q.unsqueeze(0), s.unsqueeze(0), 1, bk)[0] @ _expand(w, sc, bn, bk).t()  # W8A8
            post_check(f"fp8_linear {name} M={M}", fp8_linear.fp8_block_linear(x, w, sc, block), ref)
            del ref
        del ws
        empty_cache()
    return rows


def bench_int4(ceil) -> list[dict]:
    """W4A16 (AWQ / GPTQ layout in memory: int32 words of 8 codes along K, a scale and a uint8 zero per group of
    128 inputs): qwen3-30b-a3b's dense projections through kernels.int4_linear and its experts through fused_moe,
    each beside the same shape in bf16 (cuBLAS; fused_moe's bf16 experts), weights rotated past L2 for the
    projections. Decode is memory-bound: int4 reads ~0.27 of bf16's bytes."""
    from moeserve.kernels import fused_moe as fm
    from moeserve.kernels import int4_linear as il
    from moeserve.kernels import reference
    from moeserve.layers.quant.int4 import dequantize, pack_int32

    group = 128 if not SMOKE else 16
    gen = torch.Generator(device=DEV).manual_seed(0)

    def w4(*shape):  # packed codes, bf16 scales, uint8 zeros of a weight [*lead, N, K]
        *lead, n, k = shape
        q = torch.randint(0, 16, (*lead, n, k), device=DEV, generator=gen)
        scales = (torch.rand(*lead, n, k // group, device=DEV, generator=gen) * 2e-3 + 1e-4).bfloat16()
        zeros = torch.randint(1, 16, (*lead, n, k // group), device=DEV, generator=gen).to(torch.uint8)
        return pack_int32(q, -1), scales, zeros

    say(f"int4 (W4A16, group {group}, zeros) beside bf16, qwen3-30b-a3b; one layer:")
    rows = []
    shapes = (("qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM, H), ("o_proj", H, HEADS * HEAD_DIM))
    for name, N, Kd in shapes:
        w_bytes = N * Kd // 2 + 3 * N * (Kd // group)  # codes, bf16 scales, uint8 zeros
        sets = max(2, min(64, math.ceil(120e6 / w_bytes))) if not SMOKE else 2
        ws = [w4(N, Kd) for _ in range(sets)]
        dense = [torch.randn(N, Kd, device=DEV, dtype=torch.bfloat16) for _ in range(max(2, sets // 4))]
        for M in (1, 4, 32, 1024) if not SMOKE else (1, 3):
            x = torch.randn(M, Kd, device=DEV, dtype=torch.bfloat16)
            ms = graph_ms([lambda w=w: il.int4_linear(x, w[0], w[1], w[2], group) for w in ws])
            bf16_ms = graph_ms([lambda w=w: x @ w.t() for w in dense])
            r = row(f"int4_linear {name} M={M} ({N}x{Kd})", ms, bytes_=w_bytes + (M * Kd + M * N) * 2,
                    flops=2 * M * N * Kd, ceil=ceil, mode="graph", extra={"bf16_ms": bf16_ms})
            say(f"    {name} M={M}: int4 {ms * 1e3:.1f} us, bf16 {bf16_ms * 1e3:.1f} us ({bf16_ms / ms:.2f}x)")
            rows.append(r)
            w = ws[0]
            post_check(f"int4_linear {name} M={M}", il.int4_linear(x, w[0], w[1], w[2], group),
                       x.float() @ dequantize(*w, group).t())
        del ws, dense
        empty_cache()
    e, k, h, inter = (E, K, H, INTER)
    w13, w2 = w4(e, 2 * inter, h), w4(e, h, inter)
    bw13, bw2 = moe_inputs(1, e, k, h, inter, torch.bfloat16)[1:3]
    blocks = {"w13": (1, group), "w2": (1, group)}
    for T in (1, 8, 32, 128, 1024, 8192) if not SMOKE else (1, 5):
        x, _, _, tw, ids = moe_inputs(T, e, k, h, inter, torch.bfloat16, (bw13, bw2))
        hit = len(torch.unique(ids))
        bytes_ = hit * 3 * h * inter * (0.5 + 3 / group) + 2 * T * h * 2
        ms = graph_ms([lambda: fm.fused_moe(x, w13[0], w2[0], tw, ids, w13_scale=w13[1], w2_scale=w2[1],
                                            blocks=blocks, w13_zeros=w13[2], w2_zeros=w2[2])])
        bf16_ms = graph_ms([lambda: fm.fused_moe(x, bw13, bw2, tw, ids)])
        rows.append(row(f"fused_moe int4 T={T}", ms, bytes_=bytes_, flops=2 * T * k * 3 * h * inter, ceil=ceil,
                        mode="graph", extra={"tokens": T, "experts_hit": hit, "bf16_ms": bf16_ms}))
        say(f"    fused_moe T={T}: int4 {ms * 1e3:.1f} us, bf16 {bf16_ms * 1e3:.1f} us ({bf16_ms / ms:.2f}x), "
            f"{hit} experts hit")
        if T in (1, 1024) or SMOKE:
            post_check(f"fused_moe int4 T={T}", fm.fused_moe(x, w13[0], w2[0], tw, ids, w13_scale=w13[1],
                                                              w2_scale=w2[1], blocks=blocks, w13_zeros=w13[2],
                                                              w2_zeros=w2[2]),
                       reference.ref_fused_moe(x.float(), dequantize(*w13, group), dequantize(*w2, group), tw, ids))
    del w13, w2, bw13, bw2
    empty_cache()
    return rows


def fp8_matmul_TFLOPs() -> float | None:
    """The fp8 (e4m3 x e4m3 -> bf16, per-tensor scales) matmul ceiling of this GPU: torch._scaled_mm at 8192^3;
    None where it does not run (the interpreter, pre-Hopper)."""
    if DEV != "cuda":
        return None
    m = 8192
    a = torch.randn(m, m, device=DEV).to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device=DEV).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=DEV)
    try:
        ms = eager_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), rep=300)
    except (RuntimeError, TypeError) as exc:
        say(f"  fp8 matmul ceiling: not measured ({type(exc).__name__}: {str(exc)[:80]})")
        return None
    return 2 * m ** 3 / (ms * 1e-3) / 1e12


def _w8a8_moe_reference(x, w13d, w2d, tw, ids, group: int) -> torch.Tensor:
    """fused_moe's W8A8 arithmetic in fp32: x and the SiLU-and-mul rows (stored in x's dtype) quantized per token
    per group by the kernels' own activation quantization, the weights dequantized; expert by expert."""
    from moeserve.kernels import fp8_linear

    def dq(t):
        q, sc = fp8_linear.quantize_act(t, min(group, t.shape[1]))
        return q.float() * sc.repeat_interleave(group, dim=1)[:, :t.shape[1]]

    xq, inter = dq(x), w13d.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        gu = xq[t] @ w13d[e].float().t()
        h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
        out.index_add_(0, t, tw[t, k, None].float() * (dq(h) @ w2d[e].float().t()))
    return out


def bench_fp8_moe(ceil) -> list[dict]:
    """qwen3-30b-a3b's experts in fp8 (Qwen3-FP8's [128, 128] block scales) beside the same experts in bf16, per
    token count: the best W8A16 form (fp8 tiles widened) and the best W8A8 form (fp8 x fp8 tensor cores) among
    fused_moe's candidates, then the tuned choice;
    TFLOP/s beside the fp8 matmul ceiling measured here."""
    from moeserve.kernels import fused_moe as fm
    from moeserve.kernels import reference
    from moeserve.kernels import autotune
    from moeserve.kernels.autotune import bucket
    from moeserve.layers.quant.fp8 import _expand, quantize_blocks

    block = (128, 128) if not SMOKE else (32, 32)  # smoke: K tiles of 32, the W8A8 forms' smallest
    fp8_peak = fp8_matmul_TFLOPs()
    say(f"fused_moe with fp8 experts (E={E}, K={K}, H={H}, I={INTER}, {block[0]}x{block[1]} blocks) beside bf16; "
        f"fp8 matmul ceiling {fp8_peak and f'{fp8_peak:.0f} TFLOP/s'}:")
    w13, w2 = moe_inputs(1, E, K, H, INTER, torch.bfloat16)[1:3]
    q13, s13 = (torch.stack(t) for t in zip(*[quantize_blocks(w13[e], block) for e in range(E)]))
    q2, s2 = (torch.stack(t) for t in zip(*[quantize_blocks(w2[e], block) for e in range(E)]))
    blocks = {"w13": block, "w2": block}
    scales = (s13, s2, blocks, (None, None), 1)
    scale_k = (block[1] if block[1] < H else 0, block[1] if block[1] < INTER else 0)
    rows = []
    for T in (1, 8, 32, 128, 1024, 8192) if not SMOKE else (1, 130):
        x, _, _, tw, ids = moe_inputs(T, E, K, H, INTER, torch.bfloat16, (w13, w2))
        hit = len(torch.unique(ids))
        bytes_ = hit * (3 * H * INTER + s13[0].numel() * 4 + s2[0].numel() * 4) + 2 * T * H * 2 + T * K * 8
        flops = 2 * T * K * 3 * H * INTER
        inter1 = torch.empty(T * K, INTER, dtype=torch.bfloat16, device=DEV)
        inter2 = torch.empty(T * K, H, dtype=torch.bfloat16, device=DEV)
        out = torch.empty(T, H, dtype=torch.bfloat16, device=DEV)
        cands = fm.moe_candidates(bucket(T), K, E, 2, scale_k, a8=True)
        timed = time_candidates(f"fp8 T={T}", cands, bytes_, lambda c: [
            lambda: fm._moe_chunk(c, x, q13, q2, tw, ids, out, inter1, inter2, None, scales)])
        forms = (("W8A16", False), ("W8A8", True))
        best = {form: min(((t, c) for t, c in timed if bool(c.get("A8")) == key),
                          default=(None, None), key=lambda v: v[0]) for form, key in forms}
        ms = graph_ms([lambda: fm.fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, blocks=blocks)])
        bf16_ms = graph_ms([lambda: fm.fused_moe(x, w13, w2, tw, ids)])
        extra = {"tokens": T, "experts_hit": hit, "bf16_ms": bf16_ms, "fp8_matmul_TFLOPs": fp8_peak,
                 **{f"best_{form}_ms": t for form, (t, _) in best.items()},
                 **{f"best_{form}_config": c for form, (_, c) in best.items()}}
        r = row(f"fused_moe fp8 T={T}", ms, bytes_=bytes_, flops=flops, ceil=ceil, mode="graph", extra=extra)
        say("    " + ", ".join(f"best {form} {t * 1e3:.1f} us" for form, (t, _) in best.items() if t)
            + f"; bf16 {bf16_ms * 1e3:.1f} us (fp8 {bf16_ms / ms:.2f}x)"
            + (f"; {r['TFLOPs']:.0f} TFLOP/s = {100 * r['TFLOPs'] / fp8_peak:.0f} % of fp8 peak" if fp8_peak else ""))
        w13d, w2d = _expand(q13, s13, *block), _expand(q2, s2, *block)
        key = (f"fused_moe|T={bucket(min(T, fm.DEFAULT_CHUNK))}|E={E}|K={K}|H={H}|I={INTER}|bfloat16"
               f"|fp8={block[0]}x{block[1]}")
        chosen = autotune.get_tuner().report()[key]["config"]  # the form the tuner chose for this T
        ref = (_w8a8_moe_reference(x, w13d, w2d, tw, ids, block[1]) if chosen.get("A8")
               else reference.ref_fused_moe(x.float(), w13d, w2d, tw, ids))  # the chosen form's arithmetic
        post_check(f"fused_moe fp8 T={T}" + (" (W8A8)" if chosen.get("A8") else ""),
                   fm.fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, blocks=blocks), ref)
        rows.append(r)
        del ref, inter1, inter2
        empty_cache()
    return rows


def bench_attention(ceil, quick: bool) -> list[dict]:
    from moeserve.kernels import attention, reference

    say(f"paged attention, qwen3-30b-a3b (H={HEADS}, KVH={KV_HEADS}, D={HEAD_DIM}, page {PAGE}), bf16, one layer:")
    rows = []
    kv_tok = KV_HEADS * HEAD_DIM * 2 * 2  # K and V bytes per token
    for B in (1, 32, 128) if not SMOKE else (1, 3):
        for ctx in (384, 4096) if not SMOKE else (40,):
            set_bytes = B * ctx * kv_tok
            rot = max(2, min(256, math.ceil(256e6 / set_bytes)))
            q, cache, qsl, lens, tables = attn_batch([ctx] * B, [1] * B, HEADS, KV_HEADS, HEAD_DIM, PAGE,
                                                     torch.bfloat16, rotations=rot)
            outs = [torch.empty_like(q) for _ in range(min(rot, 8))]
            calls = [lambda t=t, o=outs[i % len(outs)]: attention.paged_attention(
                q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=t, scale=HEAD_DIM ** -0.5,
                max_query_len=1, max_seq_len=MAX_MODEL_LEN, out=o) for i, t in enumerate(tables)]
            ms = graph_ms(calls)
            bytes_ = set_bytes + 2 * q.numel() * 2
            flops = 4 * B * HEADS * HEAD_DIM * ctx
            rows.append(row(f"attn decode B={B} ctx={ctx}", ms, bytes_=bytes_, flops=flops, ceil=ceil, mode="graph",
                            extra={"batch": B, "context": ctx}))
            fresh = attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables[0],
                                              scale=HEAD_DIM ** -0.5, max_query_len=1, max_seq_len=MAX_MODEL_LEN)
            post_check(f"attn decode B={B} ctx={ctx}", fresh, reference.ref_paged_attention(
                q.float(), cache.float(), query_start_loc=qsl, seq_lens=lens, block_tables=tables[0],
                scale=HEAD_DIM ** -0.5))
            del q, cache, tables, outs, calls
            empty_cache()
    prefills = (("attn prefill 8k", [8192], [8192]), ("attn prefill 2k on 6k prefix", [8192], [2048]),
                ("attn prefill 4 x 2k", [2048] * 4, [2048] * 4))
    if SMOKE:
        prefills = (("attn prefill 40", [40], [40]), ("attn prefill 9 on 30 prefix", [39], [9]))
    for name, ctx, ql in prefills:
        if quick and "4 x" in name:
            continue
        q, cache, qsl, lens, tables = attn_batch(ctx, ql, HEADS, KV_HEADS, HEAD_DIM, PAGE, torch.bfloat16)
        out = torch.empty_like(q)
        fn = lambda: attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables[0],  # noqa: E731
                                               scale=HEAD_DIM ** -0.5, max_query_len=max(ql), max_seq_len=max(ctx),
                                               out=out)
        fn()
        ms = eager_ms(fn)
        pairs = sum(n * (c - n) + n * (n + 1) / 2 for c, n in zip(ctx, ql))  # (query, visible key) pairs
        flops = 4 * HEADS * HEAD_DIM * pairs
        bytes_ = sum(ctx) * kv_tok + 2 * q.numel() * 2
        rows.append(row(name, ms, bytes_=bytes_, flops=flops, ceil=ceil, mode="eager",
                        extra={"context": ctx, "new_tokens": ql}))
        post_check(name, out, reference.ref_paged_attention(q.float(), cache.float(), query_start_loc=qsl,
                                                            seq_lens=lens, block_tables=tables[0],
                                                            scale=HEAD_DIM ** -0.5))
        del q, cache, out
    say(f"write_kv_cache (KVH={KV_HEADS}, D={HEAD_DIM}, bf16):")
    for T in (128, 8192) if not SMOKE else (16,):
        k, v = torch.randn(2, T, KV_HEADS, HEAD_DIM, device=DEV).to(torch.bfloat16)
        cache = torch.empty(2, T // PAGE * 4, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEV)
        slots = torch.randperm(cache.shape[1] * PAGE, device=DEV)[:T]
        fn = lambda: attention.write_kv_cache(k, v, cache, slots)  # noqa: E731
        ms = graph_ms([fn]) if T <= 512 else eager_ms(fn)
        rows.append(row(f"write_kv_cache T={T}", ms, bytes_=2 * 2 * T * KV_HEADS * HEAD_DIM * 2, ceil=ceil,
                        mode="graph" if T <= 512 else "eager"))
    return rows


def bench_shared_prefix(ceil, sweep: bool = False) -> list[dict]:
    """Decode rows in groups that share a cached prompt prefix (the traffic suite's prefix workload: groups of 32
    requests, 2048 shared tokens, then their own): every row reading its own keys, against each group's prefix read
    once (engine/shared_prefix.plan + the prefix kernel). Bytes: the distinct keys, which is the grouped floor."""
    from moeserve.engine import shared_prefix
    from moeserve.kernels import attention, reference

    say(f"decode over shared prefixes, qwen3-30b-a3b attention (H={HEADS}, KVH={KV_HEADS}, D={HEAD_DIM}), bf16:")
    rows = []
    kv_tok = KV_HEADS * HEAD_DIM * 2 * 2
    group, prefix, own = (32, 2048, 160) if not SMOKE else (4, 32, 9)
    for B in (32, 128, 256) if not SMOKE else (8,):
        n_groups = B // group
        own_pages = -(-own // PAGE) + 1
        num_blocks = n_groups * prefix // PAGE + B * own_pages + 4
        cache = torch.randn(2, num_blocks, PAGE, KV_HEADS, HEAD_DIM, device=DEV).to(torch.bfloat16)
        perm = torch.randperm(num_blocks).int()
        width = prefix // PAGE + own_pages + 1
        tables = torch.full((B, width), num_blocks - 1, dtype=torch.int32)
        used = n_groups * prefix // PAGE
        for b in range(B):  # groups interleaved, as the workload submits them
            g = b % n_groups
            tables[b, :prefix // PAGE] = perm[g * prefix // PAGE:(g + 1) * prefix // PAGE]
            tables[b, prefix // PAGE:prefix // PAGE + own_pages] = perm[used:used + own_pages]
            used += own_pages
        lens = torch.tensor([prefix + own - (b % 7) for b in range(B)], dtype=torch.int32)
        plan = shared_prefix.plan(tables.numpy(), lens.numpy() - 1, PAGE)
        shared = shared_prefix.SharedPrefixes(*(torch.from_numpy(a).to(DEV) for a in
                                            (plan.rows, plan.start, plan.plen, plan.row_prefix)))
        tables, lens = tables.to(DEV), lens.to(DEV)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=DEV)
        q = torch.randn(B, HEADS, HEAD_DIM, device=DEV).to(torch.bfloat16)
        out = torch.empty_like(q)
        distinct = (n_groups * prefix + int((lens - prefix).sum())) * kv_tok
        flops = 4 * HEADS * HEAD_DIM * int(lens.sum())
        ref = reference.ref_paged_attention(q.float(), cache.float(), query_start_loc=qsl, seq_lens=lens,
                                            block_tables=tables, scale=HEAD_DIM ** -0.5)
        def call(sp):
            return lambda: attention.paged_attention(
                q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables, scale=HEAD_DIM ** -0.5,
                max_query_len=1, max_seq_len=MAX_MODEL_LEN, out=out, shared=sp)

        extra = {"batch": B, "groups": n_groups, "prefix": prefix, "own": own}
        for name, sp in (("rows alone", None), ("grouped", shared)):
            call(sp)()
            ms = graph_ms([call(sp)])
            rows.append(row(f"attn shared-prefix B={B} {name}", ms, bytes_=distinct, flops=flops, ceil=ceil,
                            mode="graph", extra={**extra, "prefix_config": dict(attention.prefix_launch(B))}))
            post_check(f"attn shared-prefix B={B} {name}", out.clone(), ref)
        if sweep and not SMOKE:
            attention.PREFIX_CONFIG.update(attention.prefix_launch(B))
            tried = []
            for r_, n_, w_, st_ in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
                attention.PREFIX_CONFIG.update(ROWS=r_, BLOCK_N=n_, num_warps=w_, num_stages=st_)
                try:
                    call(shared)()
                    tried.append((graph_ms([call(shared)]), dict(attention.PREFIX_CONFIG)))
                except Exception as e:  # a config past the shared memory
                    say(f"  prefix config {attention.PREFIX_CONFIG}: {type(e).__name__}")
            best = min(tried, key=lambda t: t[0])[1]
            for sp_ in (1, 4, 8):
                attention.PREFIX_CONFIG.update(best, SPLITS=sp_)
                call(shared)()
                tried.append((graph_ms([call(shared)]), dict(attention.PREFIX_CONFIG)))
            tried.sort(key=lambda t: t[0])
            for ms, c in tried[:6]:
                say(f"  B={B} grouped {ms * 1e3:7.1f} us  {c}")
            ms, c = tried[0]
            attention.PREFIX_CONFIG.update(c)
            call(shared)()
            post_check(f"attn shared-prefix B={B} grouped, swept best", out.clone(), ref)
            rows.append(row(f"attn shared-prefix B={B} swept", ms, bytes_=distinct, flops=flops, ceil=ceil,
                            mode="graph", extra={**extra, "prefix_config": c}))
            if B == 256:  # where the grouped step's time goes, kernel by kernel
                from torch.profiler import ProfilerActivity, profile as tprofile
                with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        call(shared)()
                    sync()
                for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:6]:
                    if e.self_device_time_total > 0:
                        say(f"  B=256 swept best, {e.key[:40]:40s} {e.self_device_time_total / 20:8.1f} us/call")
            attention.PREFIX_CONFIG.clear()  # back to prefix_launch's choice
        del cache, q, out
        empty_cache()
    return rows


def bench_mla_prefill(ceil, quick: bool) -> list[dict]:
    """deepseek-v2-lite MLA prefill, one layer (H=16, R=512, nope 128, rope 64, v 128): the new path (expand by one
    GEMM per <= 8192-token chunk, varlen flash attention, kernels/mla_prefill.py) against the old one (einsum
    expansion of every page into a zero-padded paged cache, paged_attention with D padded to 256), same inputs."""
    from moeserve.layers import mla

    H, R, N, P, V, page = (16, 512, 128, 64, 128, 64) if not SMOKE else (2, 32, 16, 16, 16, 16)
    say(f"MLA prefill, deepseek-v2-lite (H={H}, R={R}, nope {N}, rope {P}, v {V}, page {page}), bf16, one layer:")
    att = mla.LatentAttention(H, R, N, P, V, scale=(N + P) ** -0.5, layer_idx=0)
    cases = ((8192, 8192), (32768, 32768), (10240, 2048)) if not SMOKE else ((40, 40), (70, 9))
    if quick:
        cases = cases[:1] + cases[2:]
    rows = []
    for ctx, new in cases:
        g = torch.Generator(device=DEV).manual_seed(ctx + new)
        n_pages = np.array([-(-ctx // page)])
        pages = torch.randn(int(n_pages[0]), page, R + P, device=DEV, generator=g).to(torch.bfloat16)
        w = (torch.randn(H * (N + V), R, device=DEV, generator=g) / R ** 0.5).to(torch.bfloat16)
        w_uk, w_uv = mla.split_kv_b(w, H, N)
        q_nope = torch.randn(new, H, N, device=DEV, generator=g).to(torch.bfloat16)
        q_pe = torch.randn(new, H, P, device=DEV, generator=g).to(torch.bfloat16)
        args = (q_nope, q_pe, pages, n_pages, np.array([new]), np.array([ctx]), w_uk, w_uv)
        pairs = new * (ctx - new) + new * (new + 1) / 2
        flops = 2 * pairs * H * (N + P + V) + 2 * ctx * R * H * (N + V)  # attention + K/V expansion GEMM
        bytes_ = ctx * (R + P) * 2 + new * H * (N + P + V) * 2 + H * (N + V) * R * 2  # latents, q, out, W
        label = f"mla prefill {new}" + (f" on {ctx - new} prefix" if ctx > new else "")
        res = {}
        for which, fn in (("new", att._expanded_cuda), ("old", att._expanded_cuda_paged)):
            out = fn(*args)
            res[which] = out
            ms = eager_ms(lambda fn=fn: fn(*args), rep=100 if ctx > 16384 else 200)
            rows.append(row(f"{label} [{which}]", ms, bytes_=bytes_, flops=flops, ceil=ceil, mode="eager",
                            extra={"context": ctx, "new_tokens": new, "path": which}))
            empty_cache()
        post_check(f"{label}: new vs old path", res["new"], res["old"])
        if ctx <= 8192:  # fp32 reference (SDPA over the expanded K/V) where its [H, n, n] scores fit
            post_check(f"{label}: new vs fp32 reference", res["new"], mla.expanded_attention(
                q_nope.float(), q_pe.float(), pages.flatten(0, 1)[:ctx].float(), w_uk.float(), w_uv.float(),
                att.scale))
        if len(rows) >= 2:
            say(f"    new path {rows[-1]['ms'] / rows[-2]['ms']:.2f}x faster than old")
        del pages, w, q_nope, q_pe, res
        empty_cache()
    return rows


def bench_router(ceil) -> list[dict]:
    """Routing after the router GEMM (the GEMM included, as in a model): the router kernels (kernels/router) beside
    layers/moe.Router's torch path, same weights and tokens, in CUDA graphs. Shapes: Qwen3-30B-A3B (softmax,
    E=128, top-8), DeepSeek-V2-Lite (softmax, E=64, top-6), DeepSeek-R1 (sigmoid + bias, E=256 in 8 groups, top-4
    groups, top-8). Each row checks the kernel's experts against the torch path's."""
    from moeserve.layers.moe import Router, RouterConfig

    shapes = (("qwen3-30b-a3b", 2048, RouterConfig(128, 8, renormalize=True)),
              ("deepseek-v2-lite", 2048, RouterConfig(64, 6, routed_scaling_factor=1.0)),
              ("deepseek-r1", 7168, RouterConfig(256, 8, scoring="sigmoid", renormalize=True, n_group=8,
                                                 topk_group=4, group_score="top2_sum", correction_bias=True,
                                                 routed_scaling_factor=2.5)))
    if SMOKE:
        shapes = (("softmax", 64, RouterConfig(8, 2, renormalize=True)),
                  ("grouped", 64, RouterConfig(16, 4, scoring="sigmoid", renormalize=True, n_group=4, topk_group=2,
                                               group_score="top2_sum", correction_bias=True)))
    say("router (GEMM + choice), bf16: the kernel path beside the torch path")
    rows = []
    for name, hidden, cfg in shapes:
        r = Router(hidden, cfg).to(DEV)
        with torch.no_grad():
            r.weight.copy_(torch.randn(cfg.num_experts, hidden, device=DEV) / hidden ** 0.5)
            if cfg.correction_bias:
                r.e_score_correction_bias.copy_(torch.randn(cfg.num_experts, device=DEV) * 0.1)
        r.weight.data = r.weight.data.to(torch.bfloat16)  # as loaded; the correction bias stays fp32
        for T in (1, 32, 256) if not SMOKE else (1, 5):
            x = torch.randn(T, hidden, device=DEV, dtype=torch.bfloat16)
            kernel_ms = graph_ms([lambda: r._route(x)])
            torch_ms = graph_ms([lambda: r._route_torch(x)])
            got, want = r._route(x)[1], r._route_torch(x)[1]
            same = bool(torch.equal(got.sort(-1).values, want.sort(-1).values))
            POST_CHECKS.append({"name": f"router {name} T={T}: kernel experts == torch's", "rel_err": 0.0 if same
                                else 1.0, "tol": 0.5, "ok": same})
            rows.append(row(f"router {name} T={T} [kernel]", kernel_ms, ceil=ceil, mode="graph",
                            extra={"torch_ms": torch_ms, "tokens": T}))
            say(f"    torch path {torch_ms * 1e3:.1f} us: kernel x{torch_ms / kernel_ms:.2f} as fast")
        del r
    return rows


def bench_token_ops(ceil) -> list[dict]:
    """The per-token kernels of a prefill, one row of programs per token or several tokens a program (the form the
    kernels take past 128 tokens), same inputs, in CUDA graphs: fp8 activation quant (qwen3-30b-a3b's MoE input,
    K=2048, and down-projection input, K=768, groups of 128) and rope with Qwen3's per-head RMSNorm and the KV
    write (32 q heads, 4 KV heads, head_dim 128). Checked here: the quant's two forms give the same bits, rope's
    agree to 1e-3 (relative norm). Bytes: read + written once."""
    from moeserve.kernels import fp8_linear, rotary

    counts = (256, 1024, 16384) if not SMOKE else (300,)  # past 128 tokens: where the forms differ
    heads, kv_heads, dim, group = (32, 4, 128, 128) if not SMOKE else (HEADS, KV_HEADS, HEAD_DIM, 16)
    say("token ops (prefill): one token a program beside several (fp8_linear.ACT_QUANT_ROWS, rotary.ROPE_TOKENS)")
    rows = []

    def forms(module, attr, run):  # -> {programs' tokens: (ms, output)}
        default, out = getattr(module, attr), {}
        try:
            for n in (1, default):
                setattr(module, attr, n)
                out[n] = (graph_ms([run]), run())
        finally:
            setattr(module, attr, default)
        return out

    for T in counts:
        for K in (2048, 768) if not SMOKE else (64,):
            x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16) * 3
            got = forms(fp8_linear, "ACT_QUANT_ROWS", lambda: fp8_linear.quantize_act(x, group))
            (one_ms, (q1, s1)), (many_ms, (q2, s2)) = got.values()
            same = bool(torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2))
            POST_CHECKS.append({"name": f"act quant T={T} K={K}: both forms equal", "rel_err": 0.0 if same else 1.0,
                                "tol": 0.5, "ok": same})
            bytes_ = T * K * 3 + T * (K // group) * 4
            for n, ms in ((1, one_ms), (fp8_linear.ACT_QUANT_ROWS, many_ms)):
                rows.append(row(f"act quant T={T} K={K} [{n} rows a program]", ms, bytes_=bytes_, ceil=ceil,
                                mode="graph", extra={"tokens": T, "rows_a_program": n}))
        q = torch.randn(T, heads, dim, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(T, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache = torch.zeros(2, -(-T // 16), 16, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
        slots = torch.arange(T, device=DEV)
        pos = torch.randint(0, 4096, (T,), device=DEV)
        cos, sin = torch.randn(4096, dim // 2, device=DEV), torch.randn(4096, dim // 2, device=DEV)
        qw, kw = torch.randn(dim, device=DEV, dtype=torch.bfloat16), torch.randn(dim, device=DEV, dtype=torch.bfloat16)

        def rope():  # on copies: every replay starts from the same q and k
            q2, k2 = q.clone(), k.clone()
            rotary.apply_rope(q2, k2, pos, cos, sin, qw, kw, 1e-6, kv_write=(v, cache, slots))
            return q2, k2, cache.clone()

        got = forms(rotary, "ROPE_TOKENS", rope)
        (one_ms, a), (many_ms, b) = got.values()
        # not bit-equal: the tile's layout sets the order of the per-head norm's sum (session 20: 2.4e-6 of the
        # q elements at T=1024 differed, by one rounding of the normed value)
        err = max(((u.float() - w.float()).norm() / w.float().norm()).item() for u, w in zip(a, b))
        POST_CHECKS.append({"name": f"rope T={T}: both forms agree", "rel_err": err, "tol": 1e-3,
                            "ok": err <= 1e-3})
        clone_ms = graph_ms([lambda: (q.clone(), k.clone(), cache.clone())])
        bytes_ = T * (heads + kv_heads) * dim * 2 * 2 + T * kv_heads * dim * 2 * 3  # q, k in and out; v in, K/V out
        for n, ms in ((1, one_ms), (rotary.ROPE_TOKENS, many_ms)):
            rows.append(row(f"rope+norm+kv write T={T} [{n} tokens a program]", ms - clone_ms, bytes_=bytes_,
                            ceil=ceil, mode="graph", extra={"tokens": T, "tokens_a_program": n,
                                                            "clones_ms_subtracted": clone_ms}))
    return rows


def bench_align(ceil) -> list[dict]:
    """The (token, expert) alignment before the fused MoE (kernels/moe_align) at decode and small-prefill sizes:
    Qwen3's routing (E=128, top-8, BLOCK_M 16), DeepSeek-V3's (E=256, top-8) and Mixtral's (E=8, top-2, BLOCK_M 64).
    align_pairs (the sort up to SORT_MAX pairs) beside its three-launch path; the session-12 run that chose the sort
    also timed the one-program chain of tiles it replaced (results/kernels/2026-11-27-session12-h200x4). Checked:
    every pair once, in its expert's blocks, experts in order, both paths equal."""
    from moeserve.kernels import moe_align

    cases = [(128, 8, 16, (1, 4, 8, 16, 32, 64, 128, 256, 512)), (256, 8, 16, (32, 128)), (8, 2, 64, (32, 128, 512))]
    if SMOKE:
        cases = [(8, 2, 16, (1, 5))]
    rows = []

    for E, K, bm, token_counts in cases:
        say(f"moe align, E={E} top-{K} BLOCK_M={bm}")
        for T in token_counts:
            ids = torch.stack([torch.randperm(E, device=DEV)[:K] for _ in range(T)]).to(torch.int32)
            want = moe_align.align_pairs_in_three_launches(ids, E, bm)
            for method, fn in (("align_pairs", moe_align.align_pairs),
                               ("three launches", moe_align.align_pairs_in_three_launches)):
                sorted_pairs, block_expert, num_post, _ = got = fn(ids, E, bm)
                n = int(num_post.item())
                used = sorted_pairs[:n].long()
                real = used[used < T * K]
                rows_expert = block_expert[: n // bm].repeat_interleave(bm)[used < T * K]
                same = (torch.equal(real.sort().values, torch.arange(T * K, device=DEV))
                        and torch.equal(ids.view(-1)[real].long(), rows_expert.long())
                        and bool((rows_expert[1:] >= rows_expert[:-1]).all())
                        and torch.equal(got[1], want[1]) and torch.equal(got[0][:n], want[0][:n]))
                POST_CHECKS.append({"name": f"align {method} E={E} T={T}: every pair once, in its expert's blocks, "
                                            "paths equal", "rel_err": 0.0 if same else 1.0, "tol": 0.5, "ok": same})
                ms = graph_ms([lambda fn=fn: fn(ids, E, bm)])
                rows.append(row(f"moe align {method} E={E} T={T}", ms, ceil=ceil, mode="graph",
                                extra={"tokens": T, "experts": E, "top_k": K, "method": method}))
    return rows


def mla_decode_tables(B, ctx, page, groups, prefix, rotations):
    """Block tables of B rows of `ctx` tokens, `rotations` disjoint sets; with groups > 0 row b shares its first
    `prefix` tokens' pages with the rows of its group (b % groups), as the prefix workload's interleaved requests
    do under the prefix cache. Returns (tables, num_blocks)."""
    n = -(-ctx // page)
    shared = prefix // page if groups else 0
    per_set = groups * shared + B * (n - shared)
    tables = []
    for r in range(rotations):
        base = r * per_set
        t = torch.empty(B, n, dtype=torch.int32)
        for b in range(B):
            if shared:
                t[b, :shared] = base + (b % groups) * shared + torch.arange(shared)
            own = base + groups * shared + b * (n - shared)
            t[b, shared:] = own + torch.arange(n - shared)
        tables.append(t.to(DEV))
    return tables, rotations * per_set


def mla_decode_configs() -> list[dict]:
    """The sweep: tile length x warps x pipeline depth x segment multiplier, latent tiles within shared memory."""
    out = []
    for bn in (16, 32, 64):
        for warps in (2, 4, 8):
            for stages in (1, 2, 3):
                for seg_x in (1, 2):
                    if bn * 576 * 2 * stages > 160 * 1024 or (warps == 2 and bn == 64) or (warps == 8 and bn == 16):
                        continue
                    out.append({"BLOCK_N": bn, "BLOCK_H": 16, "SEG_X": seg_x, "num_warps": warps,
                                "num_stages": stages})
    return out


def bench_mla_decode(ceil) -> list[dict]:
    """deepseek-v2-lite MLA decode (H=16, R=512, rope 64, page 16), one layer: every config of a sweep and the tuned
    choice, at 32/128/256 rows of ~2.3k-token contexts, on distinct pages and on the prefix workload's layout (8
    interleaved groups sharing 2048-token prefixes: shared pages hit L2, so the kernel's own speed shows). Four
    layers' caches rotate so that a call never finds the previous call's lines. Bytes: each row's latents as read
    (logical), q, out; the shared rows' unique bytes are in `unique_bytes`."""
    from moeserve.kernels import mla_decode as md
    from moeserve.layers.mla import mla_decode_reference

    H, R, P, page, ctx, prefix = (16, 512, 64, 16, 2300, 2048) if not SMOKE else (2, 32, 16, 16, 70, 48)
    max_len = 10240 if not SMOKE else 128
    say(f"MLA decode, deepseek-v2-lite (H={H}, R={R}, rope {P}, page {page}), contexts of {ctx} tokens, bf16, "
        "one layer; every sweep config, then the tuned choice:")
    rows = []
    configs = mla_decode_configs() if not SMOKE else md._candidates(md.DecodeShape(1, H, R, P, page, torch.bfloat16, 1))[:2]
    for B in (32, 128, 256) if not SMOKE else (3,):
        for groups in (0, 8) if not SMOKE else (0, 2):
            tables, num_blocks = mla_decode_tables(B, ctx, page, groups, prefix, rotations=4)
            g = torch.Generator(device=DEV).manual_seed(B + groups)
            cache = torch.randn(num_blocks, page, R + P, device=DEV, generator=g).to(torch.bfloat16)
            q_lat = torch.randn(B, H, R, device=DEV, generator=g).to(torch.bfloat16)
            q_pe = torch.randn(B, H, P, device=DEV, generator=g).to(torch.bfloat16)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
            out = torch.empty_like(q_lat)
            shape = md.DecodeShape(B, H, R, P, page, torch.bfloat16, max_len)
            scale = 192 ** -0.5
            label = f"mla decode B={B} ctx={ctx} " + (f"{groups} groups on {prefix} shared" if groups else "distinct")
            bytes_ = B * ctx * (R + P) * 2 + 2 * q_lat.numel() * 2
            unique = (groups * prefix + B * (ctx - prefix) if groups else B * ctx) * (R + P) * 2
            timed = time_candidates(label, configs, bytes_, lambda c: [
                lambda t=t: md._launch(c, shape, q_lat, q_pe, cache, lens, t, scale, out) for t in tables])
            ms = graph_ms([lambda t=t: md.mla_decode(q_lat, q_pe, cache, seq_lens=lens, block_tables=t, scale=scale,
                                                     max_seq_len=max_len, out=out) for t in tables])
            best = min(timed, key=lambda x: x[0]) if timed else (float("nan"), None)
            rows.append(row(f"{label} [tuned]", ms, bytes_=bytes_, flops=2 * B * H * ctx * (2 * R + P), ceil=ceil,
                            mode="graph", extra={"batch": B, "context": ctx, "groups": groups, "unique_bytes": unique,
                                                 "best_sweep_ms": best[0], "best_sweep": best[1],
                                                 "candidates": [[c, t] for t, c in timed]}))
            say(f"    best of sweep {best[0] * 1e3:.1f} us {best[1]}; tuned {ms * 1e3:.1f} us")
            ref = mla_decode_reference(q_lat, q_pe, cache, seq_lens=lens, block_tables=tables[0], scale=scale)
            if best[1] is not None:
                md._launch(best[1], shape, q_lat, q_pe, cache, lens, tables[0], scale, out)
                post_check(f"{label}: best sweep config", out, ref)
            del cache, tables, ref
            empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- main
def git_commit() -> str:
    if os.environ.get("MOESERVE_COMMIT"):
        return os.environ["MOESERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON and the log ($OUT)")
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--only", choices=("mla_prefill", "mla_decode", "fp8_linear", "fp8_moe", "router", "shared_prefix",
                                       "align", "moe_sweep", "moe_sweep_fp8", "token_ops", "int4"), nargs="+",
                    help="time only these cases (after the ceilings)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton interpreter (tests the script)")
    args = ap.parse_args()
    if args.cpu_smoke:
        _smoke_mode()
    elif not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    import triton

    from moeserve.kernels import autotune

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-interpreter"
    say(f"moeserve kernel bench: {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
        f"commit {git_commit()[:12]}, autotune cache {autotune.cache_path()}")
    result = {"date": dt.date.today().isoformat(), "gpu": gpu, "commit": git_commit(), "torch": torch.__version__,
              "triton": triton.__version__, "command": " ".join(sys.argv)}
    t_start = time.time()
    result["ceilings"] = measure_ceilings()
    result["checks"] = []
    if not args.skip_checks:
        # Correctness of many shapes: untuned (heuristic) configs keep this phase short; every candidate config
        # is checked by tests/test_kernels_*.py, and the tuned configs of the timed shapes by the post-checks.
        os.environ["MOESERVE_AUTOTUNE"] = "0"
        result["checks"] = run_checks()
        os.environ.pop("MOESERVE_AUTOTUNE")
        autotune.reset_tuner()  # forget the heuristic choices: the timed shapes get tuned
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    rows = []
    if args.only:
        cases = {"mla_prefill": lambda: bench_mla_prefill(result["ceilings"], args.quick),
                 "mla_decode": lambda: bench_mla_decode(result["ceilings"]),
                 "router": lambda: bench_router(result["ceilings"]),
                 "align": lambda: bench_align(result["ceilings"]),
                 "token_ops": lambda: bench_token_ops(result["ceilings"]),
                 "shared_prefix": lambda: bench_shared_prefix(result["ceilings"], sweep=True),
                 "moe_sweep": lambda: bench_moe_sweep(result["ceilings"]),
                 "moe_sweep_fp8": lambda: bench_moe_sweep_fp8(result["ceilings"]),
                 "int4": lambda: bench_int4(result["ceilings"]),
                 "fp8_linear": lambda: bench_fp8_linear(result["ceilings"]),
                 "fp8_moe": lambda: bench_fp8_moe(result["ceilings"])}
        for case in args.only:
            rows += cases[case]()
        result["checks"] += POST_CHECKS
        failed = [c["name"] for c in result["checks"] if not c["ok"]]
    elif not failed:
        tokens = (1, 32, 8192) if args.quick else (1, 2, 8, 32, 128, 512, 2048, 8192)
        if SMOKE:
            tokens = (1, 5)
        rows += bench_moe(result["ceilings"], tokens)
        rows += bench_linear(result["ceilings"])
        rows += bench_fp8_linear(result["ceilings"])
        rows += bench_fp8_moe(result["ceilings"])
        rows += bench_attention(result["ceilings"], args.quick)
        rows += bench_shared_prefix(result["ceilings"])
        rows += bench_mla_prefill(result["ceilings"], args.quick)
        rows += bench_mla_decode(result["ceilings"])
        rows += bench_router(result["ceilings"])
        result["checks"] += POST_CHECKS
        failed = [c["name"] for c in result["checks"] if not c["ok"]]
    result["benchmarks"] = rows
    result["autotune"] = autotune.get_tuner().report()
    result["wall_s"] = time.time() - t_start
    say("autotune choices (source: tuned now / cache / heuristic):")
    for key, v in result["autotune"].items():
        say(f"  {key}: {v['config']} [{v['source']}]")
    ceil = result["ceilings"]
    say(f"\nSUMMARY {gpu}: copy {ceil['copy_TBps']:.2f} TB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s; "
        f"checks {'FAILED: ' + ', '.join(failed) if failed else 'all passed'}")
    say(f"{'benchmark':<32} {'mode':<5} {'us':>9} {'floor us':>9} {'%floor':>6} {'%BW':>6} {'%peak':>6}  target")
    for r in rows:
        say(f"{r['name']:<32} {r['mode']:<5} {r['ms'] * 1e3:9.1f} {r['floor_ms'] * 1e3:9.1f} {r['pct_floor']:6.1f} "
            f"{r['pct_bw']:6.1f} {r['pct_peak']:6.1f}  {r.get('target', '')}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"kernels-{result['date']}-{gpu.replace(' ', '_')}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.log").write_text("\n".join(LOG) + "\n")
        print(f"wrote {out / stem}.json and .log")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
