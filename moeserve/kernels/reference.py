"""Plain-torch references for the kernels: the semantics every Triton kernel is tested against.

Readable first, vectorised where easy. They may sync with the host (.tolist()) and are not for CUDA graphs.
Arithmetic is done in fp32 at least (fp64 stays fp64), the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[0 (K) / 1 (V), slot // block_size, slot % block_size] = k / v for every token with slot >= 0."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, num_blocks * block_size, KVH, D]
    flat[0].index_copy_(0, slots, k[keep].to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v[keep].to(kv_cache.dtype))


def ref_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    **_unused,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context (see kernels.attention).

    Sequence b owns queries q[qsl[b]:qsl[b+1]]; query i sits at position seq_lens[b] - n_q + i and sees cached
    positions 0..that position. Query head h reads kv head h // (num_heads // num_kv_heads).
    """
    num_heads, kv_heads = q.shape[1], kv_cache.shape[3]
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
    group = num_heads // kv_heads
    block_size = kv_cache.shape[2]
    acc = _acc_dtype(q.dtype)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    tables = block_tables.long().cpu()
    out = torch.zeros_like(q)
    for b, ctx_len in enumerate(lens):
        s, e = qsl[b], qsl[b + 1]
        n_q = e - s
        if n_q == 0:
            continue
        if n_q > ctx_len:
            raise ValueError(f"sequence {b}: {n_q} new tokens but seq_len {ctx_len}")
        pages = tables[b, : (ctx_len + block_size - 1) // block_size].to(kv_cache.device)
        k = kv_cache[0, pages].flatten(0, 1)[:ctx_len].to(acc).repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = kv_cache[1, pages].flatten(0, 1)[:ctx_len].to(acc).repeat_interleave(group, dim=1)
        qq = q[s:e].to(acc)
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        q_pos = torch.arange(ctx_len - n_q, ctx_len, device=q.device)
        visible = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]  # [n_q, ctx]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def ref_fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t])), e = topk_ids[t,k].

    Per hit expert: gather its (token, k) pairs, run the gated MLP in fp32, scale by the routing weight and
    scatter-add into an fp32 output.
    """
    T, K = topk_ids.shape
    E, two_i, H = w13.shape
    if two_i % 2 or w2.shape != (E, H, two_i // 2) or x.shape[1] != H:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    inter = two_i // 2
    acc = _acc_dtype(x.dtype)
    out = torch.zeros(T, H, dtype=acc, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).to(acc)
    tokens = torch.arange(T, device=x.device).repeat_interleave(K)
    for e in flat_ids.unique().tolist():
        pairs = (flat_ids == e).nonzero().squeeze(1)
        xe = x[tokens[pairs]].to(acc)
        gate_up = xe @ w13[e].to(acc).t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = (h @ w2[e].to(acc).t()) * flat_w[pairs, None]
        out.index_add_(0, tokens[pairs], y)
    return out.to(x.dtype)


def batched_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """ref_paged_attention's result for sequences whose queries lie back to back in q, in one SDPA call.

    Each sequence's pages are gathered once into a padded [B, L, KVH, D]; GQA groups the query heads of a KV
    head together (q as [B, KVH, group * Q, D]) instead of repeating K/V; one boolean mask covers the causal
    edge and the padding of short contexts; padded query rows see their whole context (finite) and are dropped.
    Fast when the sequences have similar query counts (all decode, or equal prefills); the caller groups them.
    """
    T, H, D = q.shape
    B, kvh, block_size = len(seq_lens), kv_cache.shape[3], kv_cache.shape[2]
    group = H // kvh
    q_max, ctx_max = max(query_lens), max(seq_lens)
    n_blocks = (ctx_max + block_size - 1) // block_size
    pages = block_tables[:, :n_blocks].long()
    k = kv_cache[0][pages].flatten(1, 2)  # [B, n_blocks * block_size, KVH, D]
    v = kv_cache[1][pages].flatten(1, 2)
    dev = q.device
    q_lens = torch.tensor(query_lens, device=dev)
    ctx = torch.tensor(seq_lens, device=dev)
    row = torch.arange(q_max, device=dev)
    if q_max == 1:
        qp = q.view(B, 1, H, D)
    else:  # scatter the ragged queries into [B, q_max] rows
        real = row[None, :] < q_lens[:, None]  # [B, q_max]
        qp = q.new_zeros(B, q_max, H, D)
        qp[real] = q
    # [B, q_max, KVH, group, D] -> [B, KVH, group * q_max, D] (row = g * q_max + i)
    qg = qp.view(B, q_max, kvh, group, D).permute(0, 2, 3, 1, 4).reshape(B, kvh, group * q_max, D)
    pos = (ctx - q_lens)[:, None] + row[None, :]  # [B, q_max] position of each query
    keys = torch.arange(k.shape[1], device=dev)
    stale = (keys[None, :] >= ctx[:, None])[:, :, None, None]  # slots past a context: never written, maybe NaN
    k.masked_fill_(stale, 0), v.masked_fill_(stale, 0)  # (a mask alone lets NaN through: 0 * NaN); k, v are copies
    visible = keys[None, None, :] <= pos[:, :, None]  # [B, q_max, L]
    visible &= keys[None, None, :] < ctx[:, None, None]  # padded query rows (pos >= ctx) see the whole context
    mask = visible[:, None, None].expand(B, 1, group, q_max, k.shape[1]).reshape(B, 1, group * q_max, k.shape[1])
    acc = _acc_dtype(q.dtype)
    o = F.scaled_dot_product_attention(qg.to(acc), k.transpose(1, 2).to(acc), v.transpose(1, 2).to(acc),
                                       attn_mask=mask, scale=scale)  # [B, KVH, group * q_max, D]
    o = o.view(B, kvh, group, q_max, D).permute(0, 3, 1, 2, 4).reshape(B, q_max, H, D).to(q.dtype)
    return o.view(T, H, D) if q_max == 1 else o[real]
