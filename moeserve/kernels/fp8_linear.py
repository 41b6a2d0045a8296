"""W8A8 block-scaled FP8 GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W in e4m3 with one fp32 scale per
bn x bk block (DeepSeek-V3 / Qwen3-FP8 checkpoints: [128, 128]), x quantized on the fly.

  _act_quant_kernel   x -> e4m3 per token per group of bk columns (dynamic: scale = amax / 448), fp32 scales
                      [M, ceil(K/bk)]; one program per (token, group), per (16 tokens, group) past 128 tokens.
  _gemm_kernel        one program per BLOCK_M x BLOCK_N tile and K range, K walked one scale block (bk) at a time:
                      the e4m3 tiles go through tl.dot (fp8 tensor cores on Hopper) into an fp32 partial, which is
                      scaled by the activation group's scale (per row) and the weight block's scale (per column)
                      and added to the fp32 accumulator; one rounding to the output dtype at the end.
Online fp8 (per output channel weight scales, one activation scale per token): the same kernel with PER_CHANNEL,
the scales applied once after the K loop (fp8_channel_linear).

Decode (M <= MAX_TUNED_ROWS): at batch 1 a projection is a weight stream, and N / BLOCK_N tiles alone are too few
programs for an H100's 132 SMs (7168 -> 576 in 64-wide tiles: 9 programs). As kernels.linear does for bf16, the
autotuner picks per shape among BLOCK_N x SPLIT_K configs that put ~2+ programs on every SM: SPLIT_K cuts K into
ranges of whole scale blocks (each K tile still takes one activation scale per row and one weight scale per
column), each range writes an fp32 partial, and the same launch adds them (kernels.linear's `_split_reduce`): one
atomic counter per output tile tells the program that arrives last, which adds part[0], part[1], ... in that fixed
order (and the bias), rounds once and re-arms the counter. The atomic decides only who reduces, not the order, so
the bits do not depend on arrival order: eager and CUDA-graph replay give the same bits, those of the second
reduce kernel this replaced; the partial buffer's size depends on shapes only, and the counters are
kernels.linear's one buffer per device. More rows: one heuristic config (64 x 128 tiles, split-K only where the
tiles do not fill the GPU once).

The W8A16 GEMV form that stood here (widened weights, no activation quant) lost to the W8A8 GEMM at every
projection shape at 1 and 4 rows on an H200 (session 16: qwen3-30b qkv at one row 11.6 us against 9.0 us) and was
deleted. So was the quantization of the activations inside the GEMM (one launch instead of two): every program
repeating the absmax/divide/cast of its activation tile before its dot stalled the weight stream, 1.6-2.9x slower
than the separate quant launch at every decode shape (session 17).

Reference: layers/quant/fp8 (dequantize weight and, for this kernel's exact arithmetic, `quantize_act_groups`
for the activations). Requires bk a power of two >= 32 (fp8 tl.dot's smallest K; 128 in every published
checkpoint); the layer falls back to the reference otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeserve.kernels import linear as _linear  # its split-K reduce, looked up at call time (tests reload it)
from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.autotune import Config, StreamedRun, bucket, get_tuner

FP8_MAX = 448.0
# Rows a program quantizes when there are many (runtime.tokens_per_program). The codes and scales do not depend on
# it (a max and elementwise divisions).
ACT_QUANT_ROWS = 16
MAX_TUNED_ROWS = 64  # up to this many rows: one M tile, configs tuned per shape; above: _large_config


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr,
                      GROUP_P: tl.constexpr, ROWS: tl.constexpr, FMAX: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, GROUP_P)
    ok = (m < M)[:, None] & ((tl.arange(0, GROUP_P) < GROUP) & (k < K))[None, :]
    x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / FMAX
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FMAX, FMAX)  # IEEE division: the codes of the torch reference
    tl.store(q_ptr + m.to(tl.int64)[:, None] * stride_qm + k[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * stride_sm + g, scale, mask=m < M)


@triton.jit
def _store_tile(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, pid_k, m, n, m_ok, n_ok, M, N, stride_om,
                SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's fp32 tile: split-K, to part[pid_k], the tile's last program to arrive summing the partials
    (+ bias) into out (kernels.linear._split_reduce); else + bias, rounded once into out."""
    if SPLIT > 1:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        _linear._split_reduce(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, tile, pid_k, m, n, m_ok, n_ok, M, N, stride_om,
                              SPLIT, HAS_BIAS)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, tiles_per_split, stride_am,
                 stride_asm, stride_wn, stride_wsn, stride_om, SCALE_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, PDL: tl.constexpr = 0):
    """Program (pid_m, pid_n, pid_k): K tiles [pid_k * tiles_per_split, + tiles_per_split) of one output tile;
    SPLIT (the number of K ranges, the grid's third dimension) > 1: the fp32 partial goes to part[pid_k] (every
    program writes its whole tile, an empty range zeros) and the tile's last program to arrive sums them (cnt_ptr:
    the per-tile counters)."""
    pdl_begin(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    kb0 = pid_k * tiles_per_split
    kb1 = tl.minimum(kb0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
    a_ptrs = a_ptr + m[:, None].to(tl.int64) * stride_am + kb0 * BLOCK_K + kk[None, :]
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * stride_wn + kb0 * BLOCK_K + kk[:, None]  # [BLOCK_K, BLOCK_N]: W^T
    as_ptrs = as_ptr + m * stride_asm
    ws_ptrs = ws_ptr + (n // SCALE_N) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(kb0, kb1):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = kk + kb * BLOCK_K < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        if PER_CHANNEL:  # one scale per token and per output row: applied once, after the loop
            acc += tl.dot(a, w)
        else:
            a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
            w_s = tl.load(ws_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PER_CHANNEL:  # linear in the partial: each split scales its own
        acc *= tl.load(as_ptrs, mask=m_ok, other=0.0)[:, None] * tl.load(ws_ptrs, mask=n_ok, other=0.0)[None, :]
    _store_tile(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, pid_k, m, n, m_ok, n_ok, M, N, stride_om, SPLIT, HAS_BIAS)


def quantize_act(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)]), per token per group of `group` columns."""
    runtime.check_device("fp8 activation quant", x)
    if x.stride(-1) != 1:  # rows may be strided (DP x EP's gathered tokens are a view of a wider message)
        x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        rows = runtime.tokens_per_program(m, ACT_QUANT_ROWS)
        _act_quant_kernel[(triton.cdiv(m, rows), groups)](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
                                                          GROUP=group, GROUP_P=runtime.next_pow2(group), ROWS=rows,
                                                          FMAX=FP8_MAX, **pdl.launch(x.device, x.shape[0]))
    return q, s


# ---------------------------------------------------------------------------------------------- configs
def _c(bm: int, bn: int, split: int, warps: int, stages: int) -> Config:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split, "W": warps, "S": stages}


def _split_for(tiles: int, k_tiles: int, target: int) -> int:
    """The smallest power-of-two split that brings tiles * split to `target` programs, keeping >= 2 K tiles in
    each range (a range of one tile is all prologue)."""
    split = 1
    while tiles * split < target and 4 * split <= k_tiles:
        split *= 2
    return split


def fp8_candidates(rows: int, n: int, k: int, block_k: int, sms: int) -> list[Config]:
    """Configs for `rows` (a bucket, <= MAX_TUNED_ROWS) x N x K, the default (untimed) first.

    A weight stream needs bytes in flight: ~25-50 KB per SM at H100 latencies. One 64-wide tile of 128 fp8 K is
    8 KB, 3 ahead at 4 stages, so two such programs per SM (SPLIT_K raising the count to >= 2 x SMs) is the
    default; narrower tiles need more programs, hence the doubled split beside each."""
    bm = min(MAX_TUNED_ROWS, max(16, runtime.next_pow2(rows)))  # 16: the smallest tl.dot M
    k_tiles = max(1, triton.cdiv(k, block_k))
    m_tiles = triton.cdiv(rows, bm)
    cands: list[Config] = []
    for bn in (64, 32, 128, 16):
        split = _split_for(m_tiles * triton.cdiv(n, bn), k_tiles, 2 * sms)
        warps = 8 if bn * bm >= 128 * 64 else 4
        cands.append(_c(bm, bn, split, warps, 4))
        if 4 * split <= k_tiles:
            cands.append(_c(bm, bn, 2 * split, warps, 4))
        if bn <= 32:  # small tiles: more of them in flight per program
            cands.append(_c(bm, bn, split, warps, 6))
    return cands


def _large_config(m: int, n: int, k: int, block_k: int, sms: int) -> Config:
    """More than MAX_TUNED_ROWS rows: 64 x 128 tiles, split-K only while the tiles fill the GPU less than once
    (R1's 7168 -> 576 at 128 rows: 10 tiles)."""
    k_tiles = max(1, triton.cdiv(k, block_k))
    return _c(64, 128, _split_for(triton.cdiv(m, 64) * triton.cdiv(n, 128), k_tiles, sms), 4, 3)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return runtime.num_sms(device)


def _choose(x, weight, ws, bias, out, scale_n: int, block_k: int, per_channel: bool, tag: str) -> Config:
    m, k = x.shape
    n = weight.shape[0]
    sms = _sms(out.device)
    if m > MAX_TUNED_ROWS:
        return _large_config(m, n, k, block_k, sms)
    rows = bucket(m)
    key = f"M={rows}|N={n}|K={k}|block={tag}|{str(out.dtype).removeprefix('torch.')}"
    cands = fp8_candidates(rows, n, k, block_k, sms)

    def run(cfg: Config, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        return run_config(cfg, x, w, w_s, bias, torch.empty_like(out), scale_n, block_k, per_channel)

    return get_tuner().choose("fp8_linear", key, cands, StreamedRun(run, weight, ws), cands[0])


# ---------------------------------------------------------------------------------------------- launch
def fp8_gemm(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out: torch.Tensor, cfg: Config, scale_n: int, block_k: int,
             per_channel: bool = False) -> torch.Tensor:
    """out = (q * s) @ (weight * weight_scale)^T (+ bias) with one config, for activations quantized by
    quantize_act (q [M, K] e4m3, scales s). block_k: the K tile, which is the activation group and the weight's K block
    (per_channel: any power of two >= 32, the scales applied after the loop)."""
    m, k = q.shape
    n = weight.shape[0]
    k_tiles = max(1, triton.cdiv(k, block_k))
    per = triton.cdiv(k_tiles, cfg["SPLIT_K"])
    split = triton.cdiv(k_tiles, per)  # no empty ranges
    has_bias = bias is not None
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    part = torch.empty(split, m, n, dtype=torch.float32, device=out.device) if split > 1 else out
    counters = _linear.split_counters(out.device, grid[0] * grid[1]) if split > 1 else out
    _gemm_kernel[grid](q, s, weight, weight_scale, bias if has_bias else out, out, part, counters,
                       m, n, k, per, q.stride(0), s.stride(0), weight.stride(0),
                       weight_scale.stride(0), out.stride(0), SCALE_N=scale_n, BLOCK_M=cfg["BLOCK_M"],
                       BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, EVEN_K=k % block_k == 0, SPLIT=split,
                       HAS_BIAS=has_bias, PER_CHANNEL=per_channel, num_warps=cfg["W"],
                       num_stages=cfg["S"], **pdl.launch(q.device, q.shape[0]))
    return out


def run_config(cfg: Config, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, scale_n: int, block_k: int,
               per_channel: bool = False) -> torch.Tensor:
    """out = x @ W^T (+ bias) with one config: x quantized per block_k columns (or per token over K when
    per_channel) by quantize_act first."""
    q, s = quantize_act(x, x.shape[1] if per_channel else block_k)
    return fp8_gemm(q, s, weight, weight_scale, bias, out, cfg, scale_n, block_k, per_channel)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     config: Config | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp32) @ (weight [N, K] e4m3 * block scales [ceil(N/bn), ceil(K/bk)])^T + bias -> [M, N].
    `config`: one of fp8_candidates (tests, benchmarks); default: the tuned one. x is quantized per token per bk
    columns (W8A8) by quantize_act, then the GEMM."""
    bn, bk = block
    if bk & (bk - 1) or bk < 32:  # fp8 tl.dot takes K tiles of 32 or more
        raise ValueError(f"fp8 block GEMM: the K block ({bk}) must be a power of two >= 32")
    runtime.check_device("fp8 block GEMM", x, weight, weight_scale)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    x, ws = x.contiguous(), weight_scale.contiguous()
    cfg = config or _choose(x, weight, ws, bias, out, bn, bk, False, f"{bn}x{bk}")
    return run_config(cfg, x, weight, ws, bias, out, bn, bk)


def fp8_channel_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       block_k: int = 128, config: Config | None = None) -> torch.Tensor:
    """Online fp8 (`--quantization fp8`): x [M, K] quantized per token (one scale over K), weight [N, K] e4m3 with
    one fp32 scale per output row (weight_scale [N, 1]); y = (xq @ wq^T) * sx * sw (+ bias)."""
    runtime.check_device("fp8 per-channel GEMM", x, weight, weight_scale)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    x, ws = x.contiguous(), weight_scale.contiguous()
    bk = min(max(block_k, 32), max(32, runtime.next_pow2(k)))
    cfg = config or _choose(x, weight, ws, bias, out, 1, bk, True, f"channel{bk}")
    return run_config(cfg, x, weight, ws, bias, out, 1, bk, per_channel=True)
