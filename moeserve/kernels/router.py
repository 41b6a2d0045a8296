"""Routing in one launch after the router GEMM, for batches of any size: softmax top-k (Qwen3-MoE, Mixtral,
DeepSeek-V2-Lite), and grouped / sigmoid top-k with a correction bias (DeepSeek-V3/R1, Kimi K2, GLM-4.x).

Done with torch the routing is five to nine launches per MoE layer (linear, cast, top-k - a sort past a few
hundred rows -, softmax or logsumexp, cast), each costing more than its work: at 252 decode rows of DeepSeek-V2-Lite
they took ~23 us per layer where this kernel's share is a few. The GEMM goes to kernels.linear, cuBLAS or a
split-K skinny GEMM as timed (the router weight, E x H, must be streamed by many SMs; a one-program-per-token
kernel reading it alone ran at 65 us on an H100). Then
one program per token picks the k largest by repeated argmax (the grouped kernel first the best groups) and
writes the weights. With expert-load telemetry on, the same program also adds its choices to the layer's counts
(no launch of its own); routers neither kernel covers (expert counts that are not powers of two in groups) count
with `count_routed` (one launch).

The grouped kernel is tested against the torch path under Triton's interpreter and, compiled, on an H100
(tests/test_kernels_fused.py, results/kernels/2026-11-27-session7-h100/).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin
from moeserve.kernels.linear import linear


@triton.jit
def _topk_softmax_kernel(logits_ptr, wout_ptr, iout_ptr, counts_ptr, valid_ptr, E, stride_l, scale,
                         K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, RENORM: tl.constexpr,
                         COUNT: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
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
def _grouped_topk_kernel(logits_ptr, bias_ptr, wout_ptr, iout_ptr, counts_ptr, valid_ptr, stride_l, scale, eps,
                         G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                         K_P: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, TOP2_SUM: tl.constexpr,
                         RENORM: tl.constexpr, COUNT: tl.constexpr, PDL: tl.constexpr = 0):
    """DeepSeek-V2/V3 and GLM-4.x routing of one token (layers/moe.Router._route_torch): scores by softmax or
    sigmoid, the correction bias added for the choice only, the best TOPK_GROUP of G groups (by their best score,
    or the sum of their best two), then top-k among those groups' experts, weighed by the unbiased scores. The
    experts are held as a [G, E/G] tile (row = group)."""
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G)
    j = tl.arange(0, EG)
    e = g[:, None] * EG + j[None, :]
    logits = tl.load(logits_ptr + t * stride_l + e).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        w = tl.exp(logits - tl.max(tl.max(logits, axis=1), axis=0))
        scores = w / tl.sum(tl.sum(w, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e).to(tl.float32)
    if G > 1:
        best = tl.max(choice, axis=1)
        if TOP2_SUM:  # the best two of each group (a tie counts twice, as torch's topk(2))
            first = tl.min(tl.where(choice == best[:, None], j[None, :], EG), axis=1)
            best = best + tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), axis=1)
        keep = tl.zeros([G], tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(best, axis=0)
            pick = tl.min(tl.where(best == top, g, G), axis=0)
            keep = tl.where(g == pick, 1, keep)
            best = tl.where(g == pick, float("-inf"), best)
        choice = tl.where(keep[:, None] != 0, choice, float("-inf"))
    slot = tl.arange(0, K_P)
    vals = tl.zeros([K_P], dtype=tl.float32)
    ids = tl.zeros([K_P], dtype=tl.int32)
    for i in tl.static_range(K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(choice == top, e, G * EG), axis=1), axis=0)
        vals = tl.where(slot == i, tl.sum(tl.sum(tl.where(e == idx, scores, 0.0), axis=1), axis=0), vals)
        ids = tl.where(slot == i, idx, ids)
        choice = tl.where(e == idx, float("-inf"), choice)
    if RENORM:
        vals = vals / (tl.sum(tl.where(slot < K, vals, 0.0), axis=0) + eps)
    tl.store(wout_ptr + t * K + slot, vals * scale, mask=slot < K)
    tl.store(iout_ptr + t * K + slot, ids, mask=slot < K)
    if COUNT:  # telemetry, as in _topk_softmax_kernel
        real = (slot * 0 + t) < tl.load(valid_ptr)
        tl.atomic_add(counts_ptr + ids, 1, mask=(slot < K) & real)


def grouped_topk_supported(num_experts: int, n_group: int) -> bool:
    """The kernel's tiles are powers of two: E (>= 2), and E / n_group experts per group."""
    def pow2(n: int) -> bool:
        return n >= 1 and (n & (n - 1)) == 0

    return num_experts >= 2 and pow2(num_experts) and n_group >= 1 and num_experts % n_group == 0 and \
        pow2(num_experts // n_group)


def route_grouped_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                       topk_group: int, sigmoid: bool, top2_sum: bool, renormalize: bool, scaling: float = 1.0,
                       counts: torch.Tensor | None = None,
                       valid_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] or None -> (weights [T, k] fp32, ids [T, k] int32), one launch after the
    router GEMM (grouped_topk_supported(E, n_group) must hold). Counts as route_softmax_topk."""
    runtime.check_device("route_grouped_topk", x, weight)
    T = x.shape[0]
    E = weight.shape[0]
    w_out = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    i_out = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T == 0:
        return w_out, i_out
    logits = linear(x, weight)
    count = counts is not None
    if n_group == 1:  # no group limit: two halves, both kept (no one-row tile)
        n_group = topk_group = 2
    _grouped_topk_kernel[(T,)](logits, bias if bias is not None else logits, w_out, i_out,
                               counts if count else i_out, valid_tokens if count else i_out, logits.stride(0),
                               scaling, 1e-20 if sigmoid else 0.0, G=n_group, EG=E // n_group,
                               TOPK_GROUP=topk_group, K=top_k, K_P=triton.next_power_of_2(top_k), SIGMOID=sigmoid,
                               HAS_BIAS=bias is not None, TOP2_SUM=top2_sum, RENORM=renormalize, COUNT=count,
                               num_warps=1 if E <= 256 else 4, **pdl.launch(logits.device, logits.shape[0]))
    return w_out, i_out


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, valid_ptr, n, K, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
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
        _count_kernel[(triton.cdiv(n, block),)](ids, counts, valid_tokens, n, ids.shape[1], BLOCK=block,
                                                **pdl.launch(ids.device, ids.shape[0]))


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
                               num_warps=1 if E <= 256 else 4, **pdl.launch(logits.device, logits.shape[0]))
    return w_out, i_out
