"""MLA decode at long contexts and few rows: the kernel as it is beside two tile forms that Hopper's wgmma can take.

deepseek-v2-lite has 16 heads, so moeserve's decode kernel (kernels/mla_decode.py) multiplies a 16-row head tile,
which Triton issues as mma.sync (wgmma needs 64 rows per warpgroup). At 16 rows over 32k-token contexts the
engine's decode moves ~1.4 TB/s of latents where vLLM's reaches ~2.5 (benchmarks/kernels/NOTES.md). Variants:

  tuned       the kernel and config the engine would run (autotuned at this shape)
  sweep       the kernel's config space (tile length x warps x stages x segments)
  pad64       the same kernel with the head tile padded to 64 rows (48 masked): wgmma-eligible
  transposed  scores^T = C q^T (tokens are the 64 M rows, heads the N=16 columns), acc^T += C^T p^T (latents
              are the M rows): both products wgmma-eligible without padding

Each is checked against layers/mla.mla_decode_reference and timed by CUDA-graph replay on distinct pages
(rotating four disjoint sets of block tables so that L2 never holds a previous call's latents).
Run: python3 benchmarks/kernels/mla_decode_variants.py [--quick]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moeserve.kernels import mla_decode as md, runtime  # noqa: E402
from moeserve.kernels.attention import merge_segments  # noqa: E402


@triton.jit
def _mla_decode_t_kernel(
    qlat_ptr, qpe_ptr, cache_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, bt_ptr,
    scale_log2e, num_heads,
    stride_qb, stride_qh, stride_pb, stride_ph,
    stride_c_blk, stride_c_tok, stride_bt,
    PAGE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEG: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Transposed tiles: the latent tile is the left operand of both products. Always writes partials."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    seg = tl.program_id(2)
    h_ok = head < num_heads
    r = tl.arange(0, R)
    p = tl.arange(0, P)
    q_lat_t = tl.load(qlat_ptr + b * stride_qb + head[None, :] * stride_qh + r[:, None], mask=h_ok[None, :],
                      other=0.0)  # [R, H]
    q_pe_t = tl.load(qpe_ptr + b * stride_pb + head[None, :] * stride_ph + p[:, None], mask=h_ok[None, :],
                     other=0.0)  # [P, H]
    if DOT_F32:
        q_lat_t = q_lat_t.to(tl.float32)
        q_pe_t = q_pe_t.to(tl.float32)
    seq_len = tl.load(seq_lens_ptr + b)
    seg_len = tl.cdiv(tl.cdiv(seq_len, NUM_SEG), BLOCK_N) * BLOCK_N
    lo = seg * seg_len
    hi = tl.maximum(tl.minimum(seq_len, lo + seg_len), lo)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([R, BLOCK_H], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        row = cache_ptr + page * stride_c_blk + (pos % PAGE) * stride_c_tok
        c = tl.load(row[:, None] + r[None, :], mask=ok[:, None], other=0.0)  # [N, R]
        k_pe = tl.load(row[:, None] + R + p[None, :], mask=ok[:, None], other=0.0)  # [N, P]
        if DOT_F32:
            c = c.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        s = tl.dot(c, q_lat_t, input_precision=PRECISION)
        s = tl.dot(k_pe, q_pe_t, s, input_precision=PRECISION) * scale_log2e  # [N, H]
        s = tl.where(ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(s - m_safe[None, :])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(c), w.to(c.dtype), input_precision=PRECISION)
        m_i = m_new

    part = (b * num_heads + head) * NUM_SEG + seg
    if hi > lo:
        tl.store(part_acc_ptr + part[None, :] * R + r[:, None], acc, mask=h_ok[None, :])
    tl.store(part_ml_ptr + part * 2, m_i, mask=h_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_ok)


def launch_transposed(cfg, s: md.DecodeShape, q_lat, q_pe, cache, seq_lens, block_tables, scale, out):
    segs = max(2, md._num_segments(s, cfg, 1, q_lat.device))
    part_acc = torch.empty(s.B * s.H * segs * s.R, dtype=torch.float32, device=q_lat.device)
    part_ml = torch.empty(s.B * s.H * segs * 2, dtype=torch.float32, device=q_lat.device)
    dot_f32, precision = runtime.dot_flags(q_lat.dtype)
    block_h = max(16, runtime.next_pow2(s.H)) if s.H <= 16 else 16
    _mla_decode_t_kernel[(s.B, -(-s.H // block_h), segs)](
        q_lat, q_pe, cache, part_acc, part_ml, seq_lens, block_tables, scale * md.LOG2E, s.H,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        PAGE=s.page, R=s.R, P=s.P, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], NUM_SEG=segs,
        DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    merge_segments(out, part_acc, part_ml, s.B, s.H, s.R, s.R, segs)


def launch_padded(cfg, s: md.DecodeShape, q_lat, q_pe, cache, seq_lens, block_tables, scale, out):
    """The engine's kernel with a 64-row head tile whatever H is (rows past H masked)."""
    r_p, p_p = max(16, runtime.next_pow2(s.R)), max(16, runtime.next_pow2(s.P))
    block_h = cfg["BLOCK_H"]
    head_blocks = -(-s.H // block_h)
    segs = max(2, md._num_segments(s, cfg, head_blocks, q_lat.device))
    part_acc = torch.empty(s.B * s.H * segs * r_p, dtype=torch.float32, device=q_lat.device)
    part_ml = torch.empty(s.B * s.H * segs * 2, dtype=torch.float32, device=q_lat.device)
    dot_f32, precision = runtime.dot_flags(q_lat.dtype)
    md._mla_decode_kernel[(s.B, head_blocks, segs)](
        q_lat, q_pe, cache, out, part_acc, part_ml, seq_lens, block_tables,
        scale * md.LOG2E, 1.0, s.H,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        PAGE=s.page, R=s.R, R_P=r_p, P=s.P, P_P=p_p, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], NUM_SEG=segs,
        DOT_F32=dot_f32, PRECISION=precision, KV_FP8=False, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    merge_segments(out, part_acc, part_ml, s.B, s.H, s.R, r_p, segs)


def variants(quick: bool) -> list[tuple[str, object, dict]]:
    out = []
    sweep = [(bn, w, st, sx) for bn in (16, 32, 64) for w in (4, 8) for st in (2, 3, 4) for sx in (1, 2)
             if bn * st <= 128]
    if quick:
        sweep = sweep[:2]
    for bn, w, st, sx in sweep:
        out.append(("sweep", md._launch, {"BLOCK_N": bn, "BLOCK_H": 16, "SEG_X": sx, "num_warps": w,
                                          "num_stages": st}))
    for bn, w, st in ((32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 2), (32, 8, 3), (16, 4, 3))[:2 if quick else 6]:
        out.append(("pad64", launch_padded, {"BLOCK_N": bn, "BLOCK_H": 64, "SEG_X": 1, "num_warps": w,
                                             "num_stages": st}))
    for bn, w, st, sx in ((64, 4, 2, 1), (64, 8, 2, 1), (64, 4, 3, 1), (64, 8, 3, 1), (64, 4, 2, 2), (128, 8, 2, 1),
                          (64, 8, 1, 1))[:2 if quick else 7]:
        out.append(("transposed", launch_transposed, {"BLOCK_N": bn, "SEG_X": sx, "num_warps": w,
                                                      "num_stages": st}))
    return out


def main() -> int:
    import bench_kernels as bk
    from moeserve.layers.mla import mla_decode_reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--cases", default="16x32768,16x8192,1x32768,64x8192")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton interpreter")
    args = ap.parse_args()
    if args.cpu_smoke:
        bk._smoke_mode()
    dev = bk.DEV
    smoke = dev != "cuda"
    H, R, P, page = (16, 512, 64, 16) if not smoke else (4, 32, 16, 16)
    max_len = 40960 if not smoke else 256
    results = []
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")] if not smoke else [(2, 100)]
    for B, ctx in cases:
        tables, num_blocks = bk.mla_decode_tables(B, ctx, page, 0, 0, rotations=4)
        g = torch.Generator(device=dev).manual_seed(B * 7 + ctx)
        cache = torch.randn(num_blocks, page, R + P, device=dev, generator=g).to(torch.bfloat16)
        q_lat = torch.randn(B, H, R, device=dev, generator=g).to(torch.bfloat16)
        q_pe = torch.randn(B, H, P, device=dev, generator=g).to(torch.bfloat16)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        out = torch.empty_like(q_lat)
        shape = md.DecodeShape(B, H, R, P, page, torch.bfloat16, max_len)
        scale = 192 ** -0.5
        bytes_ = B * ctx * (R + P) * 2
        ref = mla_decode_reference(q_lat, q_pe, cache, seq_lens=lens, block_tables=tables[0], scale=scale).float()
        tol = 2e-2 * ref.abs().max().item() + 1e-3
        label = f"B={B} ctx={ctx}"
        print(f"== {label}: {bytes_ / 1e6:.0f} MB of latents per call", flush=True)
        ms = bk.graph_ms([lambda t=t: md.mla_decode(q_lat, q_pe, cache, seq_lens=lens, block_tables=t, scale=scale,
                                                    max_seq_len=max_len, out=out) for t in tables])
        md.mla_decode(q_lat, q_pe, cache, seq_lens=lens, block_tables=tables[0], scale=scale, max_seq_len=max_len,
                      out=out)  # the timed calls cycled the tables: check on the reference's
        err = (out.float() - ref).abs().max().item()
        print(f"  tuned: {ms * 1e3:.1f} us {bytes_ / ms / 1e9:.2f} TB/s err {err:.2e}", flush=True)
        results.append({"case": label, "variant": "tuned", "us": ms * 1e3, "TBps": bytes_ / ms / 1e9, "err": err})
        for name, launch, cfg in variants(args.quick):
            try:
                out.zero_()
                launch(cfg, shape, q_lat, q_pe, cache, lens, tables[0], scale, out)
                err = (out.float() - ref).abs().max().item()
                ms = bk.graph_ms([lambda t=t: launch(cfg, shape, q_lat, q_pe, cache, lens, t, scale, out)
                                  for t in tables])
            except Exception as exc:  # report, go on
                print(f"  {name} {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            bad = " WRONG" if err > tol else ""
            print(f"  {name} {cfg}: {ms * 1e3:.1f} us {bytes_ / ms / 1e9:.2f} TB/s err {err:.2e}{bad}", flush=True)
            results.append({"case": label, "variant": name, "cfg": cfg, "us": ms * 1e3, "TBps": bytes_ / ms / 1e9,
                            "err": err, "wrong": bool(bad)})
        del cache, tables
        bk.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "mla_decode_variants.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
