"""Qwen2-MoE and Qwen3-MoE: Qwen attention; MoE MLP on layers chosen by decoder_sparse_step / mlp_only_layers.

Qwen2-MoE adds a shared expert behind a sigmoid gate and never renormalises by default;
Qwen3-MoE has q/k norm, no shared expert, and renormalises when norm_topk_prob.
"""

from __future__ import annotations

from moeserve.layers.moe import GatedMLP, RouterConfig, SparseMoE
from moeserve.models.llama import Qwen2ForCausalLM, Qwen3ForCausalLM


def _is_moe_layer(cfg, layer_idx: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1)
    return (layer_idx not in (cfg.get("mlp_only_layers") or [])
            and cfg.num_experts > 0 and step > 0 and (layer_idx + 1) % step == 0)


def _router(cfg) -> RouterConfig:
    return RouterConfig(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                        renormalize=bool(cfg.get("norm_topk_prob", False)))


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def make_mlp(self, cfg, layer_idx):
        if not _is_moe_layer(cfg, layer_idx):
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, _router(cfg),
                         shared_intermediate_size=cfg.get("shared_expert_intermediate_size", 0), shared_gate=True)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, cfg, layer_idx):
        if not _is_moe_layer(cfg, layer_idx):
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, _router(cfg))
