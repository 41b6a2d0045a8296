"""DeepSeek-V2 and DeepSeek-V3 (also DeepSeek-R1 and Kimi K2): multi-head latent attention and fine-grained MoE.

    h = embed(tokens)
    for each layer:  h = h + MLA(RMSNorm(h));  h = h + MLP(RMSNorm(h))
        MLP = dense on the first `first_k_dense_replace` layers (and off the `moe_layer_freq` grid),
              else routed experts + n_shared_experts always-on experts
    logits = lm_head(RMSNorm(h))

MLA (per token): q = q_proj(x) or q_b(RMSNorm(q_a(x))), split per head into q_nope and q_pe;
[c_kv | k_pe] = kv_a_proj_with_mqa(x); c_kv = RMSNorm(c_kv); rope on q_pe and k_pe (shared by all heads).
The cache keeps [c_kv | k_pe]; layers/mla.py attends over it and kv_b_proj expands or absorbs.
Softmax scale: (qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.

Routing: V2 softmax top-k (greedy, or group-limited with the group's best expert as its score); V3 sigmoid
scores, e_score_correction_bias added for the choice only, groups ranked by the sum of their top-2.
Both: norm_topk_prob renormalises, routed_scaling_factor multiplies.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moeserve.layers.attention import ForwardContext
from moeserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from moeserve.layers.mla import LatentAttention, rope_and_norm_latent
from moeserve.layers.moe import Experts, GatedMLP, Router, RouterConfig, routed_plus_shared, takes_extra_partial
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding, yarn_mscale
from moeserve.models.hf_config import HFConfig
from moeserve.models.llama import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_silu(cfg: HFConfig) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{cfg.architecture} with hidden_act={act!r} is not supported (only silu).")


def mtp_layer_count(cfg: HFConfig) -> int:
    """Multi-token-prediction layers that checkpoints append after the last decoder layer."""
    return int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0)


def is_mtp_tensor(cfg: HFConfig, name: str) -> bool:
    """`model.layers.{n}.*` with n among the MTP layers: not used for decoding, skipped when loading."""
    m = _LAYER.match(name)
    return bool(m) and cfg.num_hidden_layers <= int(m[1]) < cfg.num_hidden_layers + mtp_layer_count(cfg)


class SharedExpertMoE(nn.Module):
    """Routed experts plus always-on shared experts (one MLP of n_shared * moe_intermediate_size, no gate)."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, router: RouterConfig, n_shared_experts: int):
        super().__init__()
        self.gate = Router(hidden_size, router)
        self.experts = Experts(router.num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = (GatedMLP(hidden_size, moe_intermediate_size * n_shared_experts, reduce_results=False)
                               if n_shared_experts else None)
        self.fused_reduce = takes_extra_partial(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return routed_plus_shared(self.experts, self.fused_reduce, x, weights, ids, shared)


def is_moe_layer(cfg: HFConfig, layer_idx: int) -> bool:
    return (int(cfg.get("n_routed_experts", 0) or 0) > 0
            and layer_idx >= int(cfg.get("first_k_dense_replace", 0) or 0)
            and layer_idx % int(cfg.get("moe_layer_freq", 1) or 1) == 0)


class MLAttention(nn.Module):
    """DeepSeek's projections around the latent-attention front; parameter names as in HF checkpoints."""

    def __init__(self, cfg: HFConfig, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        hidden, H = cfg.hidden_size, cfg.num_attention_heads
        R, N, P, V = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.nope_dim, self.rope_dim, self.kv_lora_rank = N, P, R
        bias = bool(cfg.get("attention_bias", False))
        self.q_lora_rank = cfg.get("q_lora_rank")
        # Heads are split over the TP ranks (per-head projections column/row-parallel); the latent
        # projections are replicated, so every rank caches the whole latent.
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)  # DeepSeek's inner norms use eps 1e-6
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, H * (N + P), bias=False)
        else:
            self.q_proj = ColumnParallelLinear(hidden, H * (N + P), bias=False)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, R + P, bias=bias)
        self.kv_a_layernorm = RMSNorm(R, 1e-6)
        self.kv_b_proj = ColumnParallelLinear(R, H * (N + V), bias=False)
        self.o_proj = RowParallelLinear(H * V, hidden, bias=bias)
        self.rotary = rotary
        self.attn = LatentAttention(H, R, N, P, V, mla_softmax_scale(N + P, cfg.get("rope_scaling")), layer_idx)
        self.num_heads = self.attn.num_heads  # this rank's

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(T, self.num_heads, self.nope_dim + self.rope_dim)
        # [c_kv | k_pe] = kv_a(x); latent = [RMSNorm(c_kv) | rope(k_pe)]; q_pe = rope(q's rope part)
        q_pe, latent = rope_and_norm_latent(self.rotary, self.kv_a_layernorm, positions, q,
                                            self.kv_a_proj_with_mqa(x), self.nope_dim)
        out = self.attn(q[..., :self.nope_dim], q_pe, latent, self.kv_b_proj.weight, ctx)
        return self.o_proj(out.reshape(T, -1))


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """qk_head_dim^-0.5, and under YaRN with mscale_all_dim also mscale(factor, mscale_all_dim)^2."""
    scale = qk_head_dim ** -0.5
    kind = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
    if kind != "default" and rope_scaling.get("mscale_all_dim"):
        m = yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
        scale *= m * m
    return scale


class DeepseekV2ForCausalLM(CausalLM):
    def __init__(self, cfg: HFConfig):
        check_silu(cfg)
        super().__init__(cfg)

    @staticmethod
    def interleaved_rope(cfg: HFConfig) -> bool:
        return True  # V2 rotates (x0, x1), (x2, x3), ... pairs

    @staticmethod
    def router_config(cfg: HFConfig) -> RouterConfig:
        method = cfg.get("topk_method", "greedy")
        grouped = method == "group_limited_greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepseekV2 topk_method {method!r} is not supported (greedy, group_limited_greedy).")
        return RouterConfig(
            num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
            scoring=cfg.get("scoring_func", "softmax"), renormalize=bool(cfg.get("norm_topk_prob", False)),
            n_group=int(cfg.get("n_group", 1) or 1) if grouped else 1,
            topk_group=int(cfg.get("topk_group", 1) or 1) if grouped else 1,
            group_score="max", routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        )

    def make_attention(self, cfg, layer_idx):
        rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.get("rope_theta", 10000.0),
                                 cfg.get("rope_scaling"), interleaved=self.interleaved_rope(cfg))
        return MLAttention(cfg, layer_idx, rotary)  # CausalLM hands every layer the first one (one table)

    def make_mlp(self, cfg, layer_idx):
        if not is_moe_layer(cfg, layer_idx):
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return SharedExpertMoE(cfg.hidden_size, cfg.moe_intermediate_size, self.router_config(cfg),
                               int(cfg.get("n_shared_experts", 0) or 0))

    # The paged cache holds only the latent: kv_lora_rank + qk_rope_head_dim values per token per layer.
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.config.kv_lora_rank + self.config.qk_rope_head_dim)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return is_mtp_tensor(self.config, name)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def interleaved_rope(cfg: HFConfig) -> bool:
        return bool(cfg.get("rope_interleave", True))

    @staticmethod
    def router_config(cfg: HFConfig) -> RouterConfig:
        return RouterConfig(
            num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
            scoring=cfg.get("scoring_func", "sigmoid"), renormalize=bool(cfg.get("norm_topk_prob", True)),
            n_group=int(cfg.get("n_group", 1) or 1), topk_group=int(cfg.get("topk_group", 1) or 1),
            group_score="top2_sum", correction_bias=True,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        )
