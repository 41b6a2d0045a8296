"""Mixtral: the Llama decoder with every MLP replaced by 8 experts, top-2, softmax then renormalised."""

from __future__ import annotations

from moeserve.layers.moe import RouterConfig, SparseMoE
from moeserve.models.llama import CausalLM


class MixtralForCausalLM(CausalLM):
    mlp_name = "block_sparse_moe"

    def make_mlp(self, cfg, layer_idx):
        router = RouterConfig(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok, renormalize=True)
        return SparseMoE(cfg.hidden_size, cfg.intermediate_size, router)
