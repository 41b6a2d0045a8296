"""Bytes: weights at a precision, weights on one GPU of a layout, KV per token per GPU, and the overhead.

Precision policy (what each `--dtype` stores in fewer bytes; everything else stays bf16):
  bf16/fp16  every parameter, 2 bytes.
  fp8        linear weights (attention, dense MLP, experts) 1 byte + one fp32 scale per 128x128 block
             (DeepSeek-V3's FP8 checkpoints); embeddings, lm_head, norms, router in bf16.
  int8       the same components, 1 byte + one fp32 scale per output channel (negligible).
  int4       routed experts at 4 bits + one bf16 scale per group of 32 (Kimi K2.5's compressed-tensors
             checkpoint); attention, shared experts and dense layers stay bf16. A dense model has no experts,
             so int4 applies to its attention and MLP instead (GPTQ/AWQ style).
  mxfp4      routed experts at 4 bits + one e8m0 scale per 32 (gpt-oss); the rest bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.plan.arch import ArchSpec

GiB = 1 << 30
_LINEAR = frozenset({"attention", "dense_mlp", "routed_experts", "shared_experts"})
_EXPERTS = frozenset({"routed_experts"})


@dataclass(frozen=True)
class Precision:
    name: str
    bytes_per_param: float  # of the components it quantizes, scales included
    components: frozenset[str]  # which param_counts() components it stores at bytes_per_param
    base_bytes: float = 2.0  # everything else

    def component_bytes(self, spec: ArchSpec, component: str) -> float:
        comps = self.components
        if comps == _EXPERTS and not spec.is_moe:  # int4 / mxfp4 on a dense model
            comps = frozenset({"attention", "dense_mlp"})
        return self.bytes_per_param if component in comps else self.base_bytes


_ALL = frozenset({"attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms",
                  "embeddings", "lm_head"})
PRECISIONS = {
    "bf16": Precision("bf16", 2.0, _ALL),
    "fp16": Precision("fp16", 2.0, _ALL),
    "fp32": Precision("fp32", 4.0, _ALL, base_bytes=4.0),
    "fp8": Precision("fp8", 1.0 + 4 / (128 * 128), _LINEAR),
    "int8": Precision("int8", 1.0, _LINEAR),
    "int4": Precision("int4", 0.5 + 2 / 32, _EXPERTS),
    "mxfp4": Precision("mxfp4", 0.5 + 1 / 32, _EXPERTS),
}
KV_DTYPE_BYTES = {"auto": 2, "bf16": 2, "fp16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def precision(name: str) -> Precision:
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "auto": "bf16"}.get(name, name)
    if key not in PRECISIONS:
        raise ValueError(f"unknown weight dtype {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def kv_dtype_bytes(name: str) -> int:
    if name not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown KV-cache dtype {name!r}; choose one of {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[name]


def native_precision(cfg: dict) -> str:
    """The precision the checkpoint ships in, read from its quantization_config (bf16 when it has none)."""
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not isinstance(q, dict):
        return "bf16"
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "mxfp4"):
        return method
    bits = q.get("bits") or q.get("num_bits") or q.get("w_bit")
    for group in (q.get("config_groups") or {}).values():
        bits = bits or ((group or {}).get("weights") or {}).get("num_bits")
        if ((group or {}).get("weights") or {}).get("type") == "float" and bits == 8:
            return "fp8"
    if bits == 4:
        return "int4"
    if bits == 8:
        return "int8"
    return "bf16"


def weight_bytes(spec: ArchSpec, prec: Precision) -> dict[str, int]:
    """Bytes of each param_counts() component at `prec`, plus "total"."""
    counts = spec.param_counts()
    out = {k: int(math.ceil(v * prec.component_bytes(spec, k))) for k, v in counts.items()
           if k not in ("total", "active")}
    out["total"] = sum(out.values())
    return out


@dataclass(frozen=True)
class Shard:
    """How one replica's weights and KV spread over its GPUs.

    attn_tp: tensor-parallel ways of attention, dense MLP, shared experts, embeddings (1 under DP attention).
    ep: expert-parallel ways of the routed experts (1 = experts are tensor-sharded over attn_tp instead).
    pp: pipeline stages (contiguous layer ranges)."""

    attn_tp: int = 1
    ep: int = 1
    pp: int = 1


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of pp stages, the first stages one layer longer when it does not divide."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def weight_bytes_per_gpu(spec: ArchSpec, prec: Precision, shard: Shard) -> int:
    """Weight bytes on the fullest GPU of the layout (the stage with the embedding or lm_head, usually)."""
    b = {k: prec.component_bytes(spec, k) for k in _ALL}
    tp = shard.attn_tp
    attn = spec.attention_params_per_layer() * b["attention"] / tp
    norms = spec.norms_per_layer() * b["norms"]
    dense = spec.dense_mlp_params(spec.intermediate_size) * b["dense_mlp"] / tp
    moe = 0.0
    if spec.is_moe:
        if shard.ep > 1:
            routed = math.ceil(spec.num_experts / shard.ep) * spec.expert_params()
        else:
            routed = spec.num_experts * spec.expert_params() / tp
        moe = (
            routed * b["routed_experts"]
            + spec.shared_expert_params_per_layer() * b["shared_experts"] / tp
            + spec.router_params_per_layer() * b["router"]
        )
    vocab = spec.vocab_size * spec.hidden_size / tp
    worst = 0.0
    stages = stage_layers(spec.num_layers, shard.pp)
    for s, layers in enumerate(stages):
        total = sum(attn + norms + (moe if spec.layer_is_moe(i) else dense) for i in layers)
        if s == 0:
            total += vocab * b["embeddings"]
        if s == len(stages) - 1:
            total += spec.hidden_size * b["norms"]
            if not spec.tie_word_embeddings or shard.pp > 1:
                total += vocab * b["lm_head"]
        worst = max(worst, total)
    return int(math.ceil(worst))


def kv_bytes_per_token_per_gpu(spec: ArchSpec, kv_bytes: int, *, attn_tp: int = 1, pp: int = 1) -> int:
    """KV bytes one token costs on each GPU that holds it.

    GQA splits KV heads over TP ranks (a rank keeps at least one head: replicated when tp > kv_heads);
    MLA's latent is one per token, so every TP rank keeps the whole of it. PP splits layers."""
    layers = max(len(r) for r in stage_layers(spec.num_layers, pp))
    if spec.attention == "mla":
        per_layer = spec.kv_values_per_token_per_layer()
    else:
        heads = max(1, math.ceil(spec.num_kv_heads / attn_tp))
        per_layer = 2 * heads * spec.head_dim
    return layers * per_layer * kv_bytes


@dataclass(frozen=True)
class Overhead:
    """Per-GPU memory that is neither weights nor KV, in bytes, inside the memory budget.

    CUDA graphs are captured after the KV cache is sized (as the engine and vLLM do), so their memory comes
    out of the headroom the budget leaves, not out of the budget."""

    cuda_context: int
    communication: int
    activations: int
    sampler: int

    @property
    def total(self) -> int:
        return self.cuda_context + self.communication + self.activations + self.sampler

    def as_dict(self) -> dict[str, int]:
        return {"cuda_context": self.cuda_context, "communication": self.communication,
                "activations": self.activations, "sampler": self.sampler, "total": self.total}


CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # CUDA context and libraries outside the torch allocator
COMMUNICATION_BYTES = int(0.5 * GiB)  # NCCL buffers and the custom all-reduce, when there are peers


def activation_values_per_token(spec: ArchSpec, shard: Shard) -> int:
    """Values alive per token at the peak of one layer's forward: the residual stream plus the widest branch.

    A fused MoE (vLLM-style) keeps, per token and chosen expert, the gate/up output (2N), the activation (N)
    and the down output (H), N being the expert width on this GPU; the router adds fp32 logits."""
    h, tp = spec.hidden_size, shard.attn_tp
    if spec.attention == "mla":
        heads = spec.num_heads // tp
        attn = ((spec.q_lora_rank or 0) + heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)
                + spec.kv_lora_rank + spec.qk_rope_head_dim
                + heads * (spec.qk_nope_head_dim + spec.v_head_dim) + heads * spec.v_head_dim)
    else:
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        attn = (q + 2 * kv + q) // tp
    has_dense_layers = not spec.is_moe or len(spec.moe_layers) < spec.num_layers
    mlp = 3 * spec.intermediate_size // tp if has_dense_layers else 0
    if spec.is_moe:
        n = spec.moe_intermediate_size // (1 if shard.ep > 1 else tp)
        moe = spec.num_experts_per_tok * (3 * n + h) + 2 * spec.num_experts
        moe += 3 * spec.shared_expert_intermediate_size // tp
        mlp = max(mlp, moe)
    return 4 * h + max(attn, mlp)


def overhead_bytes(
    spec: ArchSpec,
    shard: Shard,
    *,
    world_size: int,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    act_bytes: int = 2,
) -> Overhead:
    """Estimate of the non-weight, non-KV memory of one GPU: what the engine's profiling run would measure."""
    act = max_num_batched_tokens * activation_values_per_token(spec, shard) * act_bytes
    sampler = max_num_seqs * spec.vocab_size * 4 * 2  # fp32 logits and probabilities of the full vocabulary
    return Overhead(
        cuda_context=CUDA_CONTEXT_BYTES,
        communication=COMMUNICATION_BYTES if world_size > 1 else 0,
        activations=act,
        sampler=sampler,
    )
