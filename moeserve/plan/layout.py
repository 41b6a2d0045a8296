"""Layouts (TP/PP/EP/DP) on a fleet, and what one costs each GPU.

Two shapes of layout:
  replicas      each replica is tp x pp GPUs (TP inside a node, PP across nodes, routed experts split EP-wise
                over the tp GPUs of a stage); dp independent replicas use the GPUs that are left.
  dp_attention  attention data-parallel + EP: every GPU holds the whole attention and its own sequences' KV,
                the routed experts are split over all dp GPUs (vLLM's --data-parallel-size N
                --enable-expert-parallel). For MLA this stops the latent KV being duplicated on TP ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.plan.arch import ArchSpec
from moeserve.plan.hardware import Fleet
from moeserve.plan.memory import (
    Overhead,
    Precision,
    Shard,
    kv_bytes_per_token_per_gpu,
    overhead_bytes,
    weight_bytes_per_gpu,
)

BLOCK_SIZE = 16  # KV block size the capacity is rounded down to


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int
    mode: str = "replicas"  # or "dp_attention"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp

    def shard(self) -> Shard:
        return Shard(attn_tp=self.tp, ep=self.ep, pp=self.pp)

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp, "mode": self.mode}


@dataclass(frozen=True)
class ServeSettings:
    """The knobs of a deployment that size it, beyond the layout."""

    precision: Precision
    kv_dtype_bytes: int
    max_model_len: int
    memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256


@dataclass(frozen=True)
class Placement:
    """A layout evaluated on a GPU type: bytes on the fullest GPU and the KV it leaves."""

    layout: Layout
    device_bytes: int
    budget: int  # device_bytes * memory_utilization
    weights: int
    overhead: Overhead
    kv_bytes_per_token: int  # on each GPU that holds a token
    kv_one_seq: int  # one max_model_len sequence on the GPU that holds it
    max_model_len: int

    @property
    def kv_bytes(self) -> int:
        """Bytes left for the KV cache on each GPU (negative when weights and overhead alone overflow)."""
        return self.budget - self.weights - self.overhead.total

    @property
    def fits(self) -> bool:
        return self.kv_bytes >= self.kv_one_seq and self.kv_bytes > 0

    @property
    def tokens_per_kv_group(self) -> int:
        """Tokens one KV holder keeps: a replica (its GPUs share each token) or, under DP attention, a GPU."""
        if self.kv_bytes <= 0:
            return 0
        return (self.kv_bytes // self.kv_bytes_per_token) // BLOCK_SIZE * BLOCK_SIZE

    @property
    def kv_groups(self) -> int:
        return self.layout.dp

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_groups * self.tokens_per_kv_group

    @property
    def max_concurrency(self) -> int:
        """max_model_len sequences the whole layout holds at once."""
        return self.kv_groups * (self.tokens_per_kv_group // self.max_model_len)

    def max_len_for(self, concurrency: int) -> int:
        """The longest max_model_len at which `concurrency` sequences fit (0 when none does)."""
        per_group = math.ceil(concurrency / self.kv_groups)
        return (self.tokens_per_kv_group // per_group) // BLOCK_SIZE * BLOCK_SIZE if per_group else 0


def valid_tp(spec: ArchSpec, tp: int) -> bool:
    """Attention heads must split evenly; GQA KV heads either split or replicate evenly."""
    if spec.num_heads % tp:
        return False
    if spec.attention == "gqa" and spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        return False
    return True


def expert_parallel_size(spec: ArchSpec, ways: int) -> int:
    """EP over `ways` GPUs when the experts divide among them; 1 (experts tensor-sharded) otherwise: what the engine
    does with --enable-expert-parallel."""
    if not spec.is_moe or ways <= 1 or spec.num_experts < ways:
        return 1
    return ways


def suggested_expert_parallel(spec: ArchSpec, ways: int) -> int:
    """What a replica's TP group of `ways` GPUs should do with the routed experts: tensor-shard them (1) where
    their intermediate dim splits into `ways` whole quantization blocks (128 for checkpoints shipped fp8 or int4),
    EP only where it does not. Measured on 4xH200, Qwen3-235B at TP=4 beat TP=4+EP at batch 1, 32 and 128 and in
    throughput in both moeserve and vLLM 0.26.0 (benchmarks/results/flagship/2026-11-27-qwen3-235b-h200x4):
    sharded, every GPU reads 1/ways of each chosen expert; whole, a GPU reads whichever experts its tokens pick."""
    block = 128 if spec.native_precision in ("fp8", "int4") else 1
    if spec.is_moe and spec.moe_intermediate_size % (ways * block) == 0:
        return 1
    return expert_parallel_size(spec, ways)


def evaluate(spec: ArchSpec, layout: Layout, fleet: Fleet, s: ServeSettings) -> Placement:
    shard = layout.shard()
    world = layout.gpus
    overhead = overhead_bytes(
        spec, shard, world_size=world, max_num_batched_tokens=s.max_num_batched_tokens,
        max_num_seqs=s.max_num_seqs,
    )
    kv_tok = kv_bytes_per_token_per_gpu(spec, s.kv_dtype_bytes, attn_tp=layout.tp, pp=layout.pp)
    device = fleet.gpu.memory_bytes
    return Placement(
        layout=layout,
        device_bytes=device,
        budget=int(device * s.memory_utilization),
        weights=weight_bytes_per_gpu(spec, s.precision, shard),
        overhead=overhead,
        kv_bytes_per_token=kv_tok,
        kv_one_seq=kv_tok * s.max_model_len,
        max_model_len=s.max_model_len,
    )


def _powers_of_two_upto(n: int) -> list[int]:
    out, p = [], 1
    while p <= n:
        out.append(p)
        p *= 2
    return out


def replica_candidates(spec: ArchSpec, fleet: Fleet) -> list[Layout]:
    """Replica shapes from smallest to largest: TP inside a node first, then PP across nodes at full TP."""
    tps = [t for t in _powers_of_two_upto(fleet.tp_limit) if fleet.gpus_per_node % t == 0 and valid_tp(spec, t)]
    if not tps:
        tps = [1]
    out = []
    for tp in tps:
        out.append(Layout(tp, 1, fleet.total_gpus // tp, suggested_expert_parallel(spec, tp)))
    full = tps[-1]
    if full == fleet.gpus_per_node:  # PP stages are whole nodes
        for pp in range(2, min(fleet.nodes, spec.num_layers) + 1):
            out.append(Layout(full, pp, fleet.nodes // pp, suggested_expert_parallel(spec, full)))
    return out


def dp_attention_layout(spec: ArchSpec, fleet: Fleet) -> Layout | None:
    """Attention data-parallel over every GPU of the fleet with the experts EP-split over all of them."""
    if not spec.is_moe or fleet.total_gpus < 2:
        return None
    return Layout(1, 1, fleet.total_gpus, expert_parallel_size(spec, fleet.total_gpus), mode="dp_attention")


def choose(spec: ArchSpec, fleet: Fleet, s: ServeSettings) -> tuple[Placement, list[Placement]]:
    """The smallest replica that fits (the rest of the fleet as DP replicas), and every candidate tried.

    When none fits, the largest candidate is returned (its `fits` is False) so its numbers can be shown."""
    tried = [evaluate(spec, lay, fleet, s) for lay in replica_candidates(spec, fleet)]
    for p in tried:
        if p.fits:
            return p, tried
    return tried[-1], tried
