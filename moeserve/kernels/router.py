"""Softmax top-k routing: logits = x W^T, then top-k and weights in one launch, for batches of any size.

Done with torch the routing is five to nine launches per MoE layer (linear, cast, top-k - a sort past a few
hundred rows -, softmax or logsumexp, cast), each costing more than its work: at 252 decode rows of DeepSeek-V2-Lite
they took ~23 us per layer where this kernel's share is a few. The GEMM goes to kernels.linear, cuBLAS or a
split-K skinny GEMM as timed (the router weight, E x H, must be streamed by many SMs; a one-program-per-token
kernel reading it alone ran at 65 us on an H100). Then
one program per token picks the k largest logits by repeated argmax and writes weights renormalised over the
chosen k, or softmax over all E. With expert-load telemetry on, the same program also adds its choices to the
layer's counts (no launch of its own); other routers (grouped, sigmoid) count with `count_routed` (one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime
from moeserve.kernels.linear import linear


@triton.jit
def _topk_softmax_kernel(logits_ptr, wout_ptr, iout_ptr, counts_ptr, valid_ptr, E, stride_l, scale,
                         K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, RENORM: tl.constexpr,
                         COUNT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P)
    em = e < E
    logits = tl.load(logits_ptr + t * stride_l + e, mask=em, other=float("-inf")).to(tl.float32)
    m = tl.max(logits, axis=0)
    denom = tl.sum(tl.where(em, tl.exp(logits - m), 0.0), axis=0)
    slot = tl.arange(0, K_P)
    vals = tl.zeros([K_P], dtype=tl.float32)
    ids = tl.zeros([K_P], dtype=tl.int32)
    work = logits
    for i in tl.static_range(K):
        best = tl.max(work, axis=0)
        idx = tl.min(tl.where(work == best, e, E_P), axis=0)  # lowest index among ties, as torch.topk
        vals = tl.where(slot == i, tl.exp(best - m), vals)
        ids = tl.where(slot == i, idx, ids)
        work = tl.where(e == idx, float("-inf"), work)
    if RENORM:
        vals = vals / tl.sum(tl.where(slot < K, vals, 0.0), axis=0)
    else:
        vals = vals / denom
    tl.store(wout_ptr + t * K + slot, vals * scale, mask=slot < K)
    tl.store(iout_ptr + t * K + slot, ids, mask=slot < K)
    if COUNT:  # telemetry: rows at or past valid_tokens (a graph's padding) count nothing
        real = (slot * 0 + t) < tl.load(valid_ptr)  # a tensor compare: the interpreter refuses a scalar one in a mask
        tl.atomic_add(counts_ptr + ids, 1, mask=(slot < K) & real)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, valid_ptr, n, K, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (i < n) & (i // K < tl.load(valid_ptr))
    ids = tl.load(ids_ptr + i, mask=ok, other=0)
    tl.atomic_add(counts_ptr + ids, 1, mask=ok)


def count_routed(counts: torch.Tensor, ids: torch.Tensor, valid_tokens: torch.Tensor) -> None:
    """counts[e] += how many of the first `valid_tokens` rows of ids [T, k] chose expert e (one launch; the
    reference is layers/expert_load.count_routed)."""
    ids = ids.contiguous()
    n = ids.numel()
    if n:
        block = min(1024, triton.next_power_of_2(n))
        _count_kernel[(triton.cdiv(n, block),)](ids, counts, valid_tokens, n, ids.shape[1], BLOCK=block)


def route_softmax_topk(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                       scaling: float = 1.0, counts: torch.Tensor | None = None,
                       valid_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] -> (weights [T, k] fp32, ids [T, k] int32). With counts [E] int64 and the 0-d
    valid_tokens: counts[e] += the first valid_tokens rows' choices of e."""
    runtime.check_device("route_softmax_topk", x, weight)
    T, H = x.shape
    E = weight.shape[0]
    w_out = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    i_out = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T == 0:
        return w_out, i_out
    logits = linear(x, weight)  # in the activation dtype, as the torch path rounds it
    count = counts is not None
    _topk_softmax_kernel[(T,)](logits, w_out, i_out, counts if count else i_out, valid_tokens if count else i_out,
                               E, logits.stride(0), scaling, K=top_k, K_P=triton.next_power_of_2(top_k),
                               E_P=triton.next_power_of_2(E), RENORM=renormalize, COUNT=count,
                               num_warps=1 if E <= 256 else 4)
    return w_out, i_out
