"""Llama-family decoders: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

    h   = embed(tokens)
    for each layer:  h = h + Attn(RMSNorm(h));  h = h + MLP(RMSNorm(h))
    logits = lm_head(RMSNorm(h))

MoE families reuse this skeleton and only replace the MLP (see mixtral.py, qwen_moe.py).
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from moeserve.distributed.pipeline import MissingLayer, PipelineStage, pipeline_stage
from moeserve.layers.attention import ForwardContext, PagedAttention
from moeserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from moeserve.layers.linear import QKVParallelLinear, RowParallelLinear
from moeserve.layers.moe import GatedMLP
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.models.hf_config import HFConfig


class GQAAttention(nn.Module):
    def __init__(self, cfg: HFConfig, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        hidden, heads, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, cfg.num_key_value_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = qk_norm
        rotary_dim = int(self.head_dim * cfg.get("partial_rotary_factor", 1.0))
        self.rotary = RotaryEmbedding(rotary_dim, cfg.max_position_embeddings, cfg.get("rope_theta", 10000.0),
                                      cfg.get("rope_scaling"))
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        heads = self.qkv_proj(x).view(T, -1, self.head_dim)  # [T, H + 2 KVH, D]
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        kv_write = None
        if x.is_cuda:  # one fused kernel: per-head norm (Qwen3) + rotary in place, and K/V into the paged cache
            kv_write = self.attn.kv_target(v, ctx)
            self.rotary.apply_fused(positions, q, k, self.q_norm if self.qk_norm else None,
                                    self.k_norm if self.qk_norm else None, kv_write=kv_write)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, ctx, kv_written=kv_write is not None).reshape(T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: HFConfig, self_attn: nn.Module, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp_name = mlp_name  # checkpoints name it "mlp" or, in Mixtral, "block_sparse_moe"
        setattr(self, mlp_name, mlp)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block. `residual` carries the running sum; each norm folds the previous output into it."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, positions, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return getattr(self, self.mlp_name)(h), residual


class DecoderModel(nn.Module):
    """The decoder stack, or this pipeline stage's part of it: the first stage embeds, the last one norms;
    a stage other than the first starts from the (hidden, residual) the stage before handed over, and one other
    than the last returns that pair instead of the normed hidden."""

    def __init__(self, cfg: HFConfig, layers: list[nn.Module], stage: PipelineStage, keep_embedding: bool = False):
        super().__init__()
        self.stage = stage
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
                             if stage.is_first or keep_embedding else MissingLayer())
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.is_last else MissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        if intermediate is None:
            h, residual = self.embed_tokens(input_ids), None
        else:
            h, residual = intermediate
        for layer in islice(self.layers, self.stage.start, self.stage.end):
            h, residual = layer(h, residual, positions, ctx)
        if not self.stage.is_last:
            return h, residual
        return self.norm(h, residual)[0]


def share_rotary(layers: list[nn.Module]) -> None:
    """One RotaryEmbedding for all layers that build the same one: its cos/sin tables cover every position of
    max_position_embeddings (~20 MB at 40k positions, GBs over a deep model with 160k positions)."""
    shared: dict[tuple, RotaryEmbedding] = {}
    for layer in layers:
        if isinstance(layer, MissingLayer):
            continue
        attn = layer.self_attn
        if isinstance(getattr(attn, "rotary", None), RotaryEmbedding):
            attn.rotary = shared.setdefault(attn.rotary.signature(), attn.rotary)


class CausalLM(nn.Module):
    """embed -> decoder layers -> norm -> lm_head. Subclasses choose attention and MLP per layer."""

    mlp_name = "mlp"
    # checkpoint tensors that load into one merged parameter, in its order (the loader's shard ids)
    packed_modules = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, cfg: HFConfig):
        super().__init__()
        self.config = cfg
        stage = pipeline_stage(cfg.num_hidden_layers)  # all layers, without pipeline parallelism
        layers = [
            DecoderLayer(cfg, self.make_attention(cfg, i), self.make_mlp(cfg, i), self.mlp_name)
            if stage.holds(i) else MissingLayer()
            for i in range(cfg.num_hidden_layers)
        ]
        share_rotary(layers)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        # tied: the last stage reads the embedding table as its LM head
        self.model = DecoderModel(cfg, layers, stage, keep_embedding=self.tie_word_embeddings and stage.is_last)
        self.lm_head = (ParallelLMHead(cfg.vocab_size, cfg.hidden_size,
                                       tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)
                        if stage.is_last else MissingLayer())

    # -- the two choices an architecture makes --
    def make_attention(self, cfg: HFConfig, layer_idx: int) -> nn.Module:
        bias = bool(cfg.get("attention_bias", False))
        return GQAAttention(cfg, layer_idx, qkv_bias=bias, o_bias=bias, qk_norm=False)

    def make_mlp(self, cfg: HFConfig, layer_idx: int) -> nn.Module:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=bool(cfg.get("mlp_bias", False)))

    # -- what the paged KV cache holds per layer: this stage's layers, from kv_layer_start on --
    def num_kv_layers(self) -> int:
        return self.model.stage.end - self.model.stage.start

    @property
    def kv_layer_start(self) -> int:
        return self.model.stage.start

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        attn = self.model.layers[self.model.stage.start].self_attn.attn  # this rank's KV heads
        return (2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim)

    # -- the forward pass --
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The hidden states; on a pipeline stage before the last, the (hidden, residual) to hand on."""
        return self.model(input_ids, positions, ctx, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)


class LlamaForCausalLM(CausalLM):
    pass


class Qwen2ForCausalLM(CausalLM):
    def make_attention(self, cfg, layer_idx):
        return GQAAttention(cfg, layer_idx, qkv_bias=True, o_bias=False, qk_norm=False)


class Qwen3ForCausalLM(CausalLM):
    def make_attention(self, cfg, layer_idx):
        return GQAAttention(cfg, layer_idx, qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=False,
                            qk_norm=True)
