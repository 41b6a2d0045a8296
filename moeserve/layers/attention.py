"""The attention front: write this step's K/V into the paged cache, then attend over each sequence's blocks.

CUDA tensors go to the Triton kernels; CPU tensors take the path below (one SDPA call per batch of sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels.reference import AttentionPlan, batched_paged_attention, kv_write_rows, ref_write_kv_cache


@dataclass
class AttentionMetadata:
    """Where a flat batch of tokens sits in the paged cache. Built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset; < 0 = padding, not written
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length of each sequence including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, so the CPU path never reads the device.
    query_start_loc_cpu: np.ndarray | None = None
    seq_lens_cpu: np.ndarray | None = None
    # The CPU path's K/V write slots, grouping of sequences and gather/mask plans (CPUPlan): built by the first
    # layer, reused by the rest.
    cpu_plan: object | None = field(default=None, repr=False, compare=False)
    # MLA's plan of a mixed batch (layers/mla.MixedPlan): built by the first MLA layer, reused by the rest.
    mla_plan: object | None = field(default=None, repr=False, compare=False)
    # CUDA decode: rows grouped by a shared prefix of blocks (engine/shared_prefix.SharedPrefixes, planned by the
    # runner with engine/shared_prefix), whose keys the paged kernels read once per group. None: every row alone.
    shared: object | None = None


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor] | None  # per attention layer; None while profiling memory
    # Set while the runner captures a mixed batch as piecewise CUDA graphs (engine/piecewise.PiecewiseGraph):
    # an attention front that reads lengths on the host runs through cuts.cut(...) instead of inside the graph.
    cuts: object | None = None


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v over the paged cache; GQA via num_heads // num_kv_heads query heads per KV head."""

    # CUDA: a batch of prefill chunks and decodes reads every length and block on the device (no host reads), so
    # the runner may capture it in a CUDA graph per padded token count.
    graph_safe_mixed = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        # Per-tensor scales of an fp8 KV cache (stored = x / scale, read = stored * scale): host floats, so CUDA
        # graphs capture them as constants. 1.0 (vLLM's default without calibration); load_kv_scale sets a checkpoint's.
        self.k_scale, self.v_scale = 1.0, 1.0

    def kv_target(self, v: torch.Tensor, ctx: ForwardContext) -> tuple | None:
        """(v, this layer's cache, slot mapping) for a CUDA kernel that stores K/V on its way (the fused rotary),
        so that forward(..., kv_written=True) skips its own write; None where there is no cache to write."""
        if ctx.kv_caches is None or not v.is_cuda:
            return None
        cache = ctx.kv_caches[self.layer_idx]
        if cache.dtype == torch.float8_e4m3fn:  # the fused store does not quantize: write_kv_cache does
            return None
        return v, cache, ctx.attn.slot_mapping

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                kv_written: bool = False) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]."""
        meta = ctx.attn
        if ctx.kv_caches is None:  # memory profiling: no cache yet, attend within the new tokens only
            return self._attend_uncached(q, k, v, meta)
        cache = ctx.kv_caches[self.layer_idx]
        if q.is_cuda:
            from moeserve.kernels.attention import paged_attention, write_kv_cache

            if not kv_written:
                write_kv_cache(k, v, cache, meta.slot_mapping, self.k_scale, self.v_scale)
            return paged_attention(
                q, cache, query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
                block_tables=meta.block_tables, scale=self.scale, max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len, k_scale=self.k_scale, v_scale=self.v_scale, shared=meta.shared,
            )
        plan = cpu_plan(q, cache, meta)
        ref_write_kv_cache(k, v, cache, meta.slot_mapping, self.k_scale, self.v_scale, write=plan.write)
        return paged_attention_reference(q, cache, meta, self.scale, self.k_scale, self.v_scale)

    def _attend_uncached(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        for b in range(len(qsl) - 1):
            s, e = int(qsl[b]), int(qsl[b + 1])
            out[s:e] = _sdpa(q[s:e], k[s:e], v[s:e], self.scale, causal_offset=0)
        return out


KV_SCALE_NAMES = ("k_scale", "v_scale", "kv_scale")


def load_kv_scale(model: nn.Module, name: str, tensor) -> bool:
    """A checkpoint's per-layer fp8 KV scale onto its attention front; False when `name` is not one.

    Names as vLLM reads them: `<layer>.self_attn.k_scale` / `.v_scale` (the older `.kv_scale` sets both), a
    single value each (stored = x / scale). The front is the `attn` child of that self_attn module: PagedAttention
    takes k_scale and v_scale; MLA's LatentAttention keeps one scale for its latent cache, the k_scale (vLLM's
    choice), and ignores v_scale. Read once at load (one host read per layer), then host floats.
    moeserve/loader/weights.py calls this for the names no parameter claims."""
    prefix, _, leaf = name.rpartition(".")
    if leaf not in KV_SCALE_NAMES:
        return False
    try:
        front = model.get_submodule(prefix).attn
    except AttributeError:
        return False
    value = float(tensor.float().reshape(-1).max()) if torch.is_tensor(tensor) else float(tensor)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name}: an fp8 KV scale must be a positive finite number, got {value}")
    if hasattr(front, "kv_scale"):  # MLA: one latent cache
        if leaf in ("k_scale", "kv_scale"):
            front.kv_scale = value
        return True
    if leaf in ("k_scale", "kv_scale"):
        front.k_scale = value
    if leaf in ("v_scale", "kv_scale"):
        front.v_scale = value
    return True


class CPUPlan(NamedTuple):
    """The CPU path's plan of a step, the same in every layer: built by the first layer, kept on the metadata."""

    write: tuple  # kernels.reference.kv_write_rows of the step's slot mapping
    groups: list  # [(query rows of the group or None for all of q, AttentionPlan)]


def cpu_plan(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> CPUPlan:
    """The step's CPUPlan: made by the first layer that asks, then kept on the metadata."""
    if meta.cpu_plan is None:
        meta.cpu_plan = CPUPlan(kv_write_rows(meta.slot_mapping), _plan_groups(q, cache, meta))
    return meta.cpu_plan


def paged_attention_reference(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                              k_scale: float = 1.0, v_scale: float = 1.0):
    """The CPU path: sequences attended in batches (kernels.reference.batched_paged_attention), not one by one.

    Sequences with new tokens are batched together when padding their queries to the longest costs at most 2x
    (all decode, equal prefills); otherwise the decode sequences form one batch and each prefill its own.
    The grouping and each group's gather/mask plan are the same in every layer: built once per step (the first
    layer that asks), kept on the metadata.
    """
    groups = cpu_plan(q, cache, meta).groups
    if not groups:
        return torch.empty_like(q)
    if len(groups) == 1 and groups[0][0] is None:
        return batched_paged_attention(q, cache, scale=scale, plan=groups[0][1], k_scale=k_scale, v_scale=v_scale)
    out = torch.empty_like(q)
    for rows, plan in groups:
        out[rows] = batched_paged_attention(q[rows], cache, scale=scale, plan=plan, k_scale=k_scale, v_scale=v_scale)
    return out


def _plan_groups(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> list:
    """[(query rows of the group or None for all of q, AttentionPlan)]."""
    qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    tables = meta.block_tables.cpu() if meta.block_tables.is_cuda else meta.block_tables
    q_lens = np.diff(np.asarray(qsl[: len(seq_lens) + 1]))
    active = np.nonzero(q_lens)[0]
    if len(active) == 0:
        return []
    if q_lens.max() * len(active) <= 2 * q_lens.sum():
        groups = [active]
    else:
        decode = active[q_lens[active] == 1]
        groups = ([decode] if len(decode) else []) + [np.array([b]) for b in active if q_lens[b] > 1]
    group = q.shape[1] // cache.shape[3]

    def plan(seqs: np.ndarray):
        idx = torch.from_numpy(seqs.astype(np.int64))
        return AttentionPlan([int(qsl[b + 1] - qsl[b]) for b in seqs], [int(seq_lens[b]) for b in seqs],
                             tables[idx] if len(seqs) < tables.shape[0] else tables, cache.shape[2], group)

    if len(groups) == 1 and len(active) == len(seq_lens) and int(qsl[len(seq_lens)]) == q.shape[0]:
        return [(None, plan(groups[0]))]
    return [(torch.from_numpy(np.concatenate([np.arange(qsl[b], qsl[b + 1]) for b in g])), plan(g))
            for g in groups]


def _sdpa(q, k, v, scale: float, causal_offset: int) -> torch.Tensor:
    """Causal attention of n_q queries at positions causal_offset.. over n_k keys. q [nq,H,D], k/v [nk,KVH,D]."""
    nq, nk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = torch.arange(nk, device=q.device)[None, :] <= (torch.arange(nq, device=q.device)[:, None] + causal_offset)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return o.transpose(0, 1)
