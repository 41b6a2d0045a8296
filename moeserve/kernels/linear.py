"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for a handful of rows, timed against cuBLAS.

At batch 1 a projection is a weight stream: every byte of W is read once for a few multiply-adds. cuBLAS ran
qwen3-30b-a3b's qkv projection (2048 -> 5120) at 72 % of an H100's copy bandwidth and o_proj (4096 -> 2048, with
its split-K reduce) at 55 %. Here each program streams a BLOCK_N x K slab of W (or 1/SPLIT_K of it) with the few
rows of x beside it, accumulating in fp32:
  - GEMV form (DOT=0): products accumulate element-wise in fp32 registers and are summed over K once at the
    end, for 1-4 rows;
  - tl.dot form (DOT=1): x padded to 16 rows on the tensor cores, for up to 16 rows;
  - SPLIT_K > 1: K is cut into SPLIT_K ranges, partial sums in fp32: more programs in flight when N alone gives
    too few. The partials are added in the same launch (`_split_reduce`, fp8_linear's GEMM uses it too): each
    program stores its fp32 partial to part[pid_k] and bumps its output tile's int32 counter once (an acq_rel
    atomic); the program that arrives last adds part[0], part[1], ... part[SPLIT_K - 1] in that order (+ bias),
    rounds once into out and sets the counter back to 0. The atomic only decides WHICH program reduces; the sum
    order is fixed, so the bits do not depend on arrival order (run to run, eager and CUDA-graph replay alike) and
    are those of the two-launch reduce this replaced (a second kernel, ~1.5-2.5 us of a batch-1 graph each).
    The counters are one zeroed buffer per device, allocated on the first split launch (never during graph capture)
    and re-armed by every launch, so two split-K GEMMs must not run at once on one device (one compute stream).
cuBLAS is one of the candidates and the default, so the autotuner only switches where the kernel is faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.autotune import Config, StreamedRun, bucket, get_tuner

MAX_ROWS = 16  # more rows than this: cuBLAS's tensor-core GEMMs, no tuning
SPLIT_COUNTERS = 1 << 16  # the counter buffer's first size: output tiles of any split-K launch, generously

_counters: dict[torch.device, list[torch.Tensor]] = {}  # device -> every counter buffer made (the last in use)


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed int32 counters, one per output tile of a split-K launch (>= tiles of them). Made on first
    use and grown only outside CUDA graph capture; an outgrown buffer is kept alive, since a captured graph may
    still hold its address. `cuda` without an index is the current device (one key per GPU, as tensors report it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bufs = _counters.setdefault(device, [])
    if not bufs or bufs[-1].numel() < tiles:
        if runtime.capturing():
            raise RuntimeError(f"split-K GEMM: {tiles} tile counters are needed but not allocated; run the GEMM "
                               "eagerly once before capturing it")
        bufs.append(torch.zeros(max(SPLIT_COUNTERS, runtime.next_pow2(tiles)), dtype=torch.int32, device=device))
    return bufs[-1]


@triton.jit
def _split_reduce(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, tile, pid_k, m, n, m_ok, n_ok, M, N, stride_om,
                  SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A split-K program's fp32 tile `acc` (rows m, columns n) to part[pid_k]; the last of the tile's SPLITS
    programs to arrive adds part[0 .. SPLITS-1] in that order (+ bias), rounds once into out and re-arms the
    tile's counter cnt_ptr[tile] (0 again for the next launch). The loop is unrolled (SPLITS a constexpr) so that
    the partials' loads are in flight together, not one L2 round trip after another.

    Ordering (PTX memory model, as CUTLASS's split-K semaphore): the CTA barrier puts every thread's partial store
    before thread 0's atomic, whose release (gpu scope, cumulative) publishes them; the last arrival's atomic
    acquires all earlier releases on the counter, and the scalar atomic's result reaches the other threads through
    shared memory and a barrier, so their loads come after the acquire; the loads go to L2 (.cg), where the stores
    of every SM are, never to a stale L1 line."""
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(part_ptr + (pid_k * M + m[:, None]).to(tl.int64) * N + n[None, :], acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLITS - 1:
        total = tl.zeros_like(acc)  # 0 + part[0] + ... + part[SPLITS-1] + bias: the two-launch reduce's adds
        for s in tl.static_range(SPLITS):
            total += tl.load(part_ptr + (s * M + m[:, None]).to(tl.int64) * N + n[None, :], mask=mask, other=0.0,
                             cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(cnt_ptr + tile, 0)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, M_P)
    m_ok = m < M
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # each split's K range, whole BLOCK_Ks
    kk = pid_k * k_span + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + m[:, None] * stride_xm + kk[None, :]
    if DOT:  # W tile as [BLOCK_K, BLOCK_N], the B operand of x @ W^T
        w_ptrs = w_ptr + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
    else:
        w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + kk[None, :]
    if DOT:
        acc = tl.zeros([M_P, BLOCK_N], tl.float32)
    else:  # element-wise products summed over K only once, after the loop: no cross-thread reduce per step
        acc3 = tl.zeros([M_P, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, k_span, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            k_ok = kk + k0 < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            elif EVEN_K:
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
            if DOT_F32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        else:
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            elif EVEN_K:
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not DOT:
        acc = tl.sum(acc3, axis=2)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + m[:, None] * stride_om + n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _split_reduce(acc, part_ptr, cnt_ptr, b_ptr, out_ptr, pid_n, pid_k, m, n, m_ok, n_ok, M, N, stride_om,
                      SPLIT_K, HAS_BIAS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [M, K] on CUDA; for M <= MAX_ROWS the autotuner picks cuBLAS or a skinny-GEMM config."""
    M, K = x.shape
    N = weight.shape[0]
    if (M == 0 or M > MAX_ROWS or x.stride(-1) != 1 or not weight.is_contiguous() or x.dtype != weight.dtype
            or (bias is not None and not bias.is_contiguous())):
        return torch.nn.functional.linear(x, weight, bias)
    rows = bucket(M)
    key = f"M={rows}|N={N}|K={K}|{str(x.dtype).removeprefix('torch.')}"
    cands = linear_candidates(rows, N, x.element_size())
    cfg = get_tuner().choose("linear", key, cands, StreamedRun(lambda c, w: apply_config(c, x, w, bias), weight),
                             cands[0])
    return apply_config(cfg, x, weight, bias)


def apply_config(cfg: Config, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if cfg.get("CUBLAS"):
        return torch.nn.functional.linear(x, weight, bias)
    return skinny_matmul(x, weight, bias, cfg)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) with one kernel config (not {"CUBLAS": 1})."""
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    runtime.check_device("linear", x, weight, out)
    dot = bool(cfg["DOT"])
    if (not dot and M > 4) or weight.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"linear: config {cfg} cannot run {M} rows")
    bn, bk, split = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    dot_f32, precision = runtime.dot_flags(x.dtype)
    tiles = triton.cdiv(N, bn)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = split_counters(x.device, tiles) if split > 1 else out
    has_bias = bias is not None
    _skinny_kernel[(tiles, split)](
        x, weight, bias if has_bias else x, out, part, counters, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        M_P=max(16, runtime.next_pow2(M)) if dot else runtime.next_pow2(M), BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        EVEN_K=K % (split * bk) == 0, EVEN_N=N % bn == 0, HAS_BIAS=has_bias, DOT=dot, DOT_F32=dot_f32,
        PRECISION=precision, num_warps=cfg["W"], num_stages=cfg["S"],
        **pdl.launch(x.device, x.shape[0]),
    )
    return out


def _k(bn, bk, split, w, s, dot=0) -> Config:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "W": w, "S": s, "DOT": dot}


def linear_candidates(rows: int, n: int, elem_bytes: int = 2) -> list[Config]:
    """cuBLAS first (the default when nothing is timed), then kernel configs for this many rows (a bucket).

    Bytes in flight decide a weight stream: ~132 SMs each want tens of KB outstanding. Narrow N (o_proj's 2048,
    a router's 128) gets split-K so that programs outnumber SMs; wide N (qkv) has programs enough without it.
    """
    cands: list[Config] = [{"CUBLAS": 1}]
    if rows <= 4:  # GEMV form: rows x BLOCK_N x BLOCK_K fp32 products live in registers
        bk = 512 if rows == 1 else 256 if rows == 2 else 128
        cands += [_k(8, bk, 1, 4, 3), _k(16, bk // 2, 1, 4, 3), _k(8, bk, 2, 4, 3), _k(16, bk // 2, 4, 4, 3)]
        if n <= 1024:
            cands += [_k(8, bk, 8, 4, 3)]
    if elem_bytes > 2:  # fp32 (the correctness path): half the K depth, and no tl.dot form: one of its configs
        # (64 x 64, M=1) came out at 4e-4 relative error on the H100 despite input_precision="ieee"
        for c in cands[1:]:
            c["BLOCK_K"] = max(16, c["BLOCK_K"] // 2)
            c["S"] = min(c["S"], 2)
        return cands
    return cands + [_k(32, 128, 1, 4, 3, dot=1), _k(64, 128, 1, 4, 3, dot=1), _k(32, 128, 4, 4, 3, dot=1)]
