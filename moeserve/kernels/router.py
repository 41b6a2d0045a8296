"""Softmax top-k routing for small batches in one launch: logits = x W^T, top-k, weights.

Decode batches route a handful of tokens; done with torch that is five launches per MoE layer (linear, cast,
top-k, softmax, cast), each costing more than its work. One program per token computes its E logits (fp32
accumulate, rounded to the activation dtype as the linear layer would), picks the k largest by repeated argmax,
and writes weights renormalised over the chosen k, or softmax over all E.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime

MAX_TOKENS = 64  # beyond this the GEMM in torch wins: each program here reads the whole router weight


@triton.jit
def _router_kernel(x_ptr, w_ptr, wout_ptr, iout_ptr, H, E, stride_x, scale,
                   K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, BLOCK_H: tl.constexpr,
                   RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P)
    em = e < E
    acc = tl.zeros([E_P], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hm = hh < H
        xv = tl.load(x_ptr + t * stride_x + hh, mask=hm, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * H + hh[None, :], mask=em[:, None] & hm[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv[None, :], axis=1)
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(em, logits, float("-inf"))
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


def route_softmax_topk(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                       scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] -> (weights [T, k] fp32, ids [T, k] int32)."""
    runtime.check_device("route_softmax_topk", x, weight)
    T, H = x.shape
    E = weight.shape[0]
    w_out = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    i_out = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T == 0:
        return w_out, i_out
    e_p = triton.next_power_of_2(E)
    _router_kernel[(T,)](x, weight, w_out, i_out, H, E, x.stride(0), scaling, K=top_k,
                         K_P=triton.next_power_of_2(top_k), E_P=e_p, BLOCK_H=max(16, 8192 // e_p),
                         RENORM=renormalize, num_warps=4)
    return w_out, i_out
