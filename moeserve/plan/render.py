"""The human-readable report of a plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeserve.plan.memory import GiB

if TYPE_CHECKING:
    from moeserve.plan.planner import Plan

_COMPONENTS = [
    ("attention", "attention"),
    ("dense_mlp", "dense MLP"),
    ("routed_experts", "routed experts"),
    ("shared_experts", "shared experts"),
    ("router", "routers"),
    ("norms", "norms"),
    ("embeddings", "embeddings"),
    ("lm_head", "lm_head"),
]


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f}B"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _arch_line(plan: Plan) -> str:
    s = plan.spec
    attn = (f"MLA (kv_lora_rank {s.kv_lora_rank}, rope {s.qk_rope_head_dim})" if s.attention == "mla"
            else f"GQA {s.num_heads}/{s.num_kv_heads} heads of {s.head_dim}")
    moe = ""
    if s.is_moe:
        shared = f" + shared {s.shared_expert_intermediate_size}" if s.shared_expert_intermediate_size else ""
        moe = f", {len(s.moe_layers)} MoE layers of {s.num_experts} experts top-{s.num_experts_per_tok}{shared}"
    return f"{s.architecture}: {s.num_layers} layers, hidden {s.hidden_size}, {attn}{moe}"


def _active_of(plan: Plan, key: str) -> int:
    n = plan.params[key]
    if key == "routed_experts" and plan.spec.num_experts:
        return n * plan.spec.num_experts_per_tok // plan.spec.num_experts
    return n


def render_text(plan: Plan) -> str:
    s, p, lay = plan.spec, plan.placement, plan.placement.layout
    wb = plan.weight_bytes
    kvb = plan.settings.kv_dtype_bytes
    out = [f"model      {plan.model_name}", f"           {_arch_line(plan)}", ""]
    out.append(f"parameters {'total':>16} {'active':>12} {plan.dtype + ' bytes':>14}")
    for key, label in _COMPONENTS:
        if plan.params[key]:
            out.append(f"  {label:<16} {_b(plan.params[key]):>10} {_b(_active_of(plan, key)):>12} {_gib(wb[key]):>14}")
    out.append(f"  {'total':<16} {_b(plan.params['total']):>10} {_b(plan.params['active']):>12} {_gib(wb['total']):>14}")
    out.append("")
    if s.attention == "mla":
        formula = f"{s.num_layers} layers x ({s.kv_lora_rank} + {s.qk_rope_head_dim}"
        formula += f" + {s.indexer_head_dim} indexer" if s.indexer_head_dim else ""
        formula += f") x {kvb} B"
    else:
        formula = f"2 x {s.num_layers} layers x {s.num_kv_heads} kv heads x {s.head_dim} x {kvb} B"
    out.append(f"KV cache   {plan.kv_bytes_per_token:,} B/token ({plan.kv_cache_dtype}) = {formula}")
    out.append(f"context    max_model_len {plan.settings.max_model_len:,} (model maximum {s.max_position_embeddings:,})")
    out.append("")
    out.append(f"fleet      {plan.fleet.describe()} ({_gib(plan.fleet.gpu.memory_bytes)} each)")
    mode = " (attention data-parallel + EP)" if lay.mode == "dp_attention" else ""
    out.append(f"layout     TP={lay.tp} PP={lay.pp} EP={lay.ep} DP={lay.dp}{mode}: {lay.gpus} GPUs"
               + ("" if lay.gpus == plan.fleet.total_gpus else f" of {plan.fleet.total_gpus}"))
    o = p.overhead
    out.append("per GPU    (the fullest one)")
    out.append(f"  weights          {_gib(p.weights):>12}")
    out.append(f"  overhead         {_gib(o.total):>12}  (activations {_gib(o.activations)}, sampler "
               f"{_gib(o.sampler)}, CUDA context {_gib(o.cuda_context)}, comms {_gib(o.communication)})")
    out.append(f"  KV cache         {_gib(max(0, p.kv_bytes)):>12}  ({p.kv_bytes_per_token:,} B/token on this GPU)")
    out.append(f"  budget           {_gib(p.budget):>12}  ({plan.settings.memory_utilization:g} of the device; "
               f"headroom {_gib(p.device_bytes - p.budget)})")
    out.append(f"KV capacity {p.kv_capacity_tokens:,} tokens; {p.max_concurrency} concurrent sequences of "
               f"{plan.settings.max_model_len:,} tokens")
    out.append("")
    if p.fits:
        out.append("verdict    FITS")
    else:
        need = p.weights + p.overhead.total + p.kv_one_seq
        out.append(f"verdict    DOES NOT FIT: needs {_gib(need)} per GPU (weights + overhead + one "
                   f"{plan.settings.max_model_len:,}-token sequence), budget {_gib(p.budget)}")
        if plan.suggestion:
            out.append(f"suggestion {plan.suggestion}")
    if plan.warnings:
        out.append("")
        out.append("warnings")
        out.extend(f"  - {w}" for w in plan.warnings)
    out.append("")
    out.append("launch (moeserve)")
    out.extend(f"  {line}" for line in plan.commands["moeserve"].splitlines())
    out.append("launch (vLLM equivalent)")
    out.extend(f"  {line}" for line in plan.commands["vllm"].splitlines())
    return "\n".join(out)
