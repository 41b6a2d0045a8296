"""Plain-torch references for the kernels: the semantics every Triton kernel is tested against.

Readable first, vectorised where easy. They may sync with the host (.tolist()) and are not for CUDA graphs.
Arithmetic is done in fp32 at least (fp64 stays fp64), the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), without its ~2 us of argument parsing and dispatch where x has that dtype already (the CPU
    path casts six times a layer, fp32 to fp32)."""
    return x if x.dtype == dtype else x.to(dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def kv_store(rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> None:
    """rows[slots] = x in the cache's dtype; an fp8 (e4m3) cache stores x / scale saturated to +-448 (a plain cast
    turns overflow into NaN). The fp8 copy goes through uint8 views: index_copy_ has no fp8 CPU kernel."""
    if rows.dtype == torch.float8_e4m3fn:
        q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(rows.dtype)
        rows.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
    else:
        rows.index_copy_(0, slots, _cast(x, rows.dtype))


def kv_load(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cached values as `dtype`: an fp8 cache is dequantized (x * scale)."""
    if x.dtype == torch.float8_e4m3fn:
        y = x.to(dtype)
        return y if scale == 1.0 else y * scale
    return _cast(x, dtype)


def kv_write_rows(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(which tokens are written: a mask, or None for all of them; their slots, int64). Slot < 0 is padding."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping.long()
    return keep, slot_mapping[keep].long()


def ref_write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: float = 1.0, v_scale: float = 1.0, write: tuple | None = None) -> None:
    """kv_cache[0 (K) / 1 (V), slot // block_size, slot % block_size] = k / v for every token with slot >= 0
    (an fp8 cache holds k / k_scale, v / v_scale: kv_store). `write`: kv_write_rows(slot_mapping), where the
    caller has it already (the CPU path: once per step, not per layer)."""
    keep, slots = kv_write_rows(slot_mapping) if write is None else write
    if keep is not None:
        k, v = k[keep], v[keep]
    k_rows, v_rows = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1]).unbind()  # [blocks * size, KVH, D]
    kv_store(k_rows, slots, k, k_scale)
    kv_store(v_rows, slots, v, v_scale)


def ref_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
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
        k = kv_load(kv_cache[0, pages].flatten(0, 1)[:ctx_len], acc, k_scale).repeat_interleave(group, dim=1)
        v = kv_load(kv_cache[1, pages].flatten(0, 1)[:ctx_len], acc, v_scale).repeat_interleave(group, dim=1)
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


class AttentionPlan:
    """What batched_paged_attention needs besides q and one layer's cache, the same in every layer of a step:
    built once per step (and per group of sequences), reused by all layers.

    slots   [B * L] int64: the cache slot of key position j of sequence b (L = longest context). Positions past
            a sequence's context point at its position 0 (written, finite) and are masked out, so the gather
            never reads a never-written slot (garbage, maybe NaN: 0 * NaN would leak through the mask).
    mask    [B, 1, group * q_max, L] bool, or None where every query sees every key (decode, equal contexts).
    real    [B, q_max] bool: which padded query rows are real (None when q_max == 1).
    """

    __slots__ = ("B", "q_max", "L", "group", "slots", "mask", "real", "_kv_rows")

    def __init__(self, query_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int,
                 group: int):
        B, q_max, L = len(seq_lens), max(query_lens), max(seq_lens)
        self.B, self.q_max, self.L, self.group = B, q_max, L, group
        dev = block_tables.device
        q_lens = torch.tensor(query_lens, device=dev)
        ctx = torch.tensor(seq_lens, device=dev)
        keys = torch.arange(L, device=dev)
        valid = keys[None, :] < ctx[:, None]  # [B, L]
        key_pos = torch.where(valid, keys[None, :], 0)
        n_blocks = (L + block_size - 1) // block_size
        pages = block_tables[:, :n_blocks].long().gather(1, key_pos // block_size)
        self.slots = (pages * block_size + key_pos % block_size).reshape(-1)
        row = torch.arange(q_max, device=dev)
        pos = (ctx - q_lens)[:, None] + row[None, :]  # [B, q_max] position of each query
        # [B, q_max, L]; padded query rows (pos >= ctx) see their whole context (finite, dropped afterwards)
        visible = (keys[None, None, :] <= pos[:, :, None]) & valid[:, None, :]
        if bool(visible.all()):
            self.mask = None
        else:
            self.mask = visible[:, None, None].expand(B, 1, group, q_max, L).reshape(B, 1, group * q_max, L)
        self.real = None if q_max == 1 else row[None, :] < q_lens[:, None]
        self._kv_rows: tuple[int, torch.Tensor] | None = None

    def kv_rows(self, pool_rows: int) -> torch.Tensor:
        """[2 * B * L] int64: slots for a layer's cache viewed as [2 * pool_rows, KVH * D], K's rows then V's.
        One dim-0 index_select of whole rows is a row copy; index_select(1) of [2, pool_rows, KVH, D] goes
        element by element (on CPU 1.7-2.9x slower at batch 16). Made at the first layer, reused by the rest."""
        r = self._kv_rows
        if r is None or r[0] != pool_rows:
            r = self._kv_rows = (pool_rows, torch.cat([self.slots, self.slots + pool_rows]))
        return r[1]


def batched_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    query_lens: list[int] | None = None,
    seq_lens: list[int] | None = None,
    block_tables: torch.Tensor | None = None,
    scale: float,
    plan: AttentionPlan | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """ref_paged_attention's result for sequences whose queries lie back to back in q, in one SDPA call.

    K and V of every sequence are gathered in one index_select into a padded [B, L, KVH, D]; GQA groups the
    query heads of a KV head together (q as [B, KVH, group * Q, D]) instead of repeating K/V; one boolean mask
    (from the plan, shared by all layers of a step) covers the causal edge and the padding of short contexts;
    padded query rows see their whole context and are dropped.
    Fast when the sequences have similar query counts (all decode, or equal prefills); the caller groups them.
    """
    T, H, D = q.shape
    kvh = kv_cache.shape[3]
    if plan is None:
        plan = AttentionPlan(query_lens, seq_lens, block_tables, kv_cache.shape[2], H // kvh)
    B, q_max, L, group = plan.B, plan.q_max, plan.L, plan.group
    rows = kv_cache.shape[1] * kv_cache.shape[2]
    k, v = (kv_cache.view(2 * rows, kvh * D).index_select(0, plan.kv_rows(rows))
            .view(2, B, L, kvh, D).transpose(2, 3).unbind())
    if q_max == 1:  # one query a sequence: [B, H, D] is already [B, KVH, group, D]
        qg = q.view(B, kvh, group, D)
    else:  # scatter the ragged queries into [B, q_max] rows
        qp = q.new_zeros(B, q_max, H, D)
        qp[plan.real] = q
        # [B, q_max, KVH, group, D] -> [B, KVH, group * q_max, D] (row = g * q_max + i)
        qg = qp.view(B, q_max, kvh, group, D).permute(0, 2, 3, 1, 4).reshape(B, kvh, group * q_max, D)
    acc = _acc_dtype(q.dtype)
    o = F.scaled_dot_product_attention(_cast(qg, acc), kv_load(k, acc, k_scale), kv_load(v, acc, v_scale),
                                       attn_mask=plan.mask,
                                       scale=scale)  # [B, KVH, group * q_max, D]
    if q_max == 1:
        return _cast(o.reshape(T, H, D), q.dtype)
    o = o.view(B, kvh, group, q_max, D).permute(0, 3, 1, 2, 4).reshape(B, q_max, H, D).to(q.dtype)
    return o[plan.real]
