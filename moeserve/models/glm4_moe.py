"""GLM-4.5 / GLM-4.6 / GLM-4.7 (Glm4MoeForCausalLM): GQA decoder with DeepSeek-V3-style MoE.

Attention: GQA with partial rotary (rotate-half on the first partial_rotary_factor of each head, 0.5 unless the
config says otherwise), q/k/v bias when attention_bias (o_proj never has one), optional per-head q/k RMSNorm.
MLP: dense on the first first_k_dense_replace layers; then sigmoid routing with e_score_correction_bias (chooses,
does not weigh), groups ranked by their top-2 sum, norm_topk_prob, routed_scaling_factor, and shared experts.
"""

from __future__ import annotations

from moeserve.layers.moe import GatedMLP, RouterConfig
from moeserve.models.deepseek import SharedExpertMoE, check_silu, is_moe_layer, is_mtp_tensor
from moeserve.models.hf_config import HFConfig
from moeserve.models.llama import CausalLM, GQAAttention


def _with_glm_defaults(cfg: HFConfig) -> HFConfig:
    """partial_rotary_factor at the top level (transformers >= 5 keeps it inside rope_parameters), and
    transformers' GLM defaults for what abbreviated configs leave out."""
    rope = cfg.get("rope_parameters") or {}
    factor = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    return HFConfig({**cfg.to_dict(), "partial_rotary_factor": factor, "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5)},
                    source=cfg._source)


class Glm4MoeForCausalLM(CausalLM):
    def __init__(self, cfg: HFConfig):
        check_silu(cfg)
        super().__init__(_with_glm_defaults(cfg))

    def make_attention(self, cfg, layer_idx):
        return GQAAttention(cfg, layer_idx, qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=False,
                            qk_norm=bool(cfg.get("use_qk_norm", False)))

    def make_mlp(self, cfg, layer_idx):
        if not is_moe_layer(cfg, layer_idx):
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        router = RouterConfig(
            num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, scoring="sigmoid",
            renormalize=bool(cfg.get("norm_topk_prob", True)),
            n_group=int(cfg.get("n_group", 1) or 1), topk_group=int(cfg.get("topk_group", 1) or 1),
            group_score="top2_sum", correction_bias=True,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        )
        return SharedExpertMoE(cfg.hidden_size, cfg.moe_intermediate_size, router,
                               int(cfg.get("n_shared_experts", 0) or 0))

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return is_mtp_tensor(self.config, name)
