"""Read a config.json into the architecture facts that size a deployment: parameters and KV bytes per token.

Pure Python (no torch): the CLI planner and the engine's start-up check share this one reading.
The parameter formulas follow each architecture's module layout in transformers; tests compare them with
`sum(p.numel())` of tiny random models and with the published sizes of the flagship checkpoints.
Multi-token-prediction layers (`num_nextn_predict_layers`, MiniMax `num_mtp_modules`) and vision towers are
not counted: the engine does not load them, and the published "671B"-style totals leave them out too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.plan.catalog_index import resolve_catalog

# architecture name -> formula family
_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "moe_gqa",
    "Qwen2MoeForCausalLM": "moe_gqa",
    "Qwen3MoeForCausalLM": "moe_gqa",
    "Glm4MoeForCausalLM": "moe_gqa",
    "MiniMaxM2ForCausalLM": "moe_gqa",
    "GptOssForCausalLM": "moe_gqa",
    "Llama4ForConditionalGeneration": "moe_gqa",
    "Llama4ForCausalLM": "moe_gqa",
    "DeepseekV2ForCausalLM": "mla",
    "DeepseekV3ForCausalLM": "mla",
    "DeepseekV32ForCausalLM": "mla",
    "GlmMoeDsaForCausalLM": "mla",
    "KimiK25ForConditionalGeneration": "mla",
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_FAMILIES))

# Top-level fields a nested text_config inherits when it does not set them itself.
_INHERITED = ("architectures", "tie_word_embeddings", "quantization_config", "torch_dtype", "dtype")


def load_config(source: Any) -> dict:
    """The raw config dict from a checkpoint dir, a .json path, a catalog name (`org/model`) or a dict."""
    if isinstance(source, dict):
        return source
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path} is a directory without a config.json")
        path = cfg_path
    elif not path.exists():
        cat = resolve_catalog(str(source))
        if cat is None:
            raise FileNotFoundError(
                f"{source}: no such checkpoint directory or config file, and no catalog entry of that name "
                f"(see `moeserve plan --list`)"
            )
        path = cat
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    cfg.setdefault("_source", str(path))
    return cfg


def apply_hf_overrides(cfg: dict, overrides: dict | None) -> dict:
    """config.json with vLLM's `hf_overrides` laid over it: a key whose old and new values are both objects is
    merged key by key, any other key replaced. E.g. {"num_hidden_layers": 12} serves a layer-truncated model
    (same per-layer shapes) with dummy weights."""
    if not overrides:
        return cfg
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides must be a JSON object, got {type(overrides).__name__}")
    out = dict(cfg)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = apply_hf_overrides(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def text_config(cfg: dict) -> dict:
    """The text model's config: `cfg["text_config"]` (Llama 4, Kimi K2.5) with a few top-level fields it lacks."""
    inner = cfg.get("text_config")
    if not isinstance(inner, dict):
        return cfg
    out = dict(inner)
    for key in _INHERITED:
        if out.get(key) is None and cfg.get(key) is not None:
            out[key] = cfg[key]
    if "_source" in cfg:
        out.setdefault("_source", cfg["_source"])
    return out


@dataclass(frozen=True)
class ArchSpec:
    """Architecture facts, already resolved per family (aliases, defaults, which layers are MoE)."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention: str  # "gqa" (MHA/GQA/MQA) or "mla"
    kv_lora_rank: int | None
    qk_rope_head_dim: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # --- beyond the contract: what the parameter formulas need ---
    family: str = "llama"
    intermediate_size: int = 0  # dense MLP width (dense layers of a MoE model included)
    moe_layers: tuple[int, ...] = ()  # indices of layers whose MLP is a routed MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # total width of the shared expert(s) of a MoE layer
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    router_bias: bool = False  # gpt-oss
    router_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    expert_bias: bool = False  # gpt-oss
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"  # "none", "head" (weights of head_dim), "full" (over all heads, MiniMax)
    attention_sinks: bool = False  # gpt-oss
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    indexer_heads: int = 0  # DeepSeek sparse attention (V3.2, GLM-5) lightning indexer
    indexer_head_dim: int = 0
    sliding_window: int | None = None
    source: str = field(default="config.json", compare=False)
    # the precision the checkpoint's weights ship in (quantization_config): "bf16", "fp8", "int4", ...
    native_precision: str = field(default="bf16", compare=False)

    # ---- KV cache ----
    def kv_values_per_token_per_layer(self) -> int:
        """Values cached per token per layer: K and V of each KV head, or MLA's latent plus rope key.

        DeepSeek sparse attention also caches one indexer key (index_head_dim) per token per layer."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim + self.indexer_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype_bytes: int) -> int:
        """KV bytes per token over all layers (every layer is cached; sliding windows are not trimmed)."""
        return self.num_layers * self.kv_values_per_token_per_layer() * kv_dtype_bytes

    # ---- parameters ----
    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers) and self.num_experts > 0

    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.attention == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
            else:
                q = h * self.num_heads * qk_head
            kv = (
                h * (self.kv_lora_rank + self.qk_rope_head_dim)
                + self.kv_lora_rank  # kv_a_layernorm
                + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            )
            o = self.num_heads * self.v_head_dim * h
            indexer = 0
            if self.indexer_heads:
                d = self.indexer_head_dim
                indexer = (
                    self.q_lora_rank * self.indexer_heads * d  # wq_b
                    + h * d  # wk
                    + 2 * d  # k_norm (LayerNorm weight + bias)
                    + h * self.indexer_heads  # weights_proj
                )
            return q + kv + o + indexer
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        n = h * (q_out + 2 * kv_out) + q_out * h
        if self.qkv_bias:
            n += q_out + 2 * kv_out
        if self.o_bias:
            n += h
        if self.qk_norm == "head":
            n += 2 * self.head_dim
        elif self.qk_norm == "full":
            n += q_out + kv_out
        if self.attention_sinks:
            n += self.num_heads
        return n

    def dense_mlp_params(self, width: int) -> int:
        h = self.hidden_size
        return 3 * h * width + (2 * width + h if self.mlp_bias else 0)

    def expert_params(self) -> int:
        """One routed expert of one layer."""
        h, i = self.hidden_size, self.moe_intermediate_size
        return 3 * h * i + ((2 * i + h) if self.expert_bias else 0)

    def norms_per_layer(self) -> int:
        return 2 * self.hidden_size

    def shared_expert_params_per_layer(self) -> int:
        """The shared expert(s) of one MoE layer, with Qwen2-MoE's gate."""
        if not self.shared_expert_intermediate_size:
            return 0
        h = self.hidden_size
        return 3 * h * self.shared_expert_intermediate_size + (h if self.shared_expert_gate else 0)

    def router_params_per_layer(self) -> int:
        """The router of one MoE layer: gate weight, plus gpt-oss' bias or DeepSeek-V3's correction bias."""
        e = self.num_experts
        return self.hidden_size * e + (e if self.router_bias else 0) + (e if self.router_correction_bias else 0)

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i in self.moe_layers

    def param_counts(self) -> dict[str, int]:
        """Parameters by component, plus "total" and "active" (what one token touches, embeddings included)."""
        h = self.hidden_size
        n_moe = len(self.moe_layers) if self.is_moe else 0
        n_dense = self.num_layers - n_moe
        routed = n_moe * self.num_experts * self.expert_params()
        counts = {
            "attention": self.num_layers * self.attention_params_per_layer(),
            "dense_mlp": n_dense * self.dense_mlp_params(self.intermediate_size),
            "routed_experts": routed,
            "shared_experts": n_moe * self.shared_expert_params_per_layer(),
            "router": n_moe * self.router_params_per_layer(),
            "norms": self.num_layers * self.norms_per_layer() + h,
            "embeddings": self.vocab_size * h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }
        total = sum(counts.values())
        routed_active = n_moe * self.num_experts_per_tok * self.expert_params()
        counts["total"] = total
        counts["active"] = total - routed + routed_active
        return counts


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


class _Reader:
    """Field access on a config dict that names the field and the file when one is missing."""

    def __init__(self, cfg: dict, arch: str):
        self.cfg, self.arch = cfg, arch
        self.source = cfg.get("_source", "config.json")

    def req(self, *names: str) -> Any:
        value = _get(self.cfg, *names)
        if value is None:
            alts = " or ".join(repr(n) for n in names)
            raise ValueError(f"{self.source}: {self.arch} needs the field {alts}, which is missing.")
        return value

    def opt(self, *names: str, default: Any = None) -> Any:
        return _get(self.cfg, *names, default=default)


def _moe_layers_qwen(r: _Reader, num_layers: int, num_experts: int) -> tuple[int, ...]:
    if not num_experts:
        return ()
    step = r.opt("decoder_sparse_step", default=1) or 1
    skip = set(r.opt("mlp_only_layers", default=[]) or [])
    return tuple(i for i in range(num_layers) if i not in skip and (i + 1) % step == 0)


def _moe_layers_deepseek(r: _Reader, num_layers: int) -> tuple[int, ...]:
    first = r.opt("first_k_dense_replace", default=0) or 0
    freq = r.opt("moe_layer_freq", default=1) or 1
    return tuple(i for i in range(num_layers) if i >= first and i % freq == 0)


def read_arch(cfg: dict) -> ArchSpec:
    """Resolve a config dict (nested text_config unwrapped) into an ArchSpec; clear errors for what is missing."""
    from dataclasses import replace

    from moeserve.plan.memory import native_precision

    return replace(_read_arch(cfg), native_precision=native_precision(cfg))


def _read_arch(cfg: dict) -> ArchSpec:
    outer_archs = cfg.get("architectures") or []
    tc = text_config(cfg)
    source = tc.get("_source", cfg.get("_source", "config.json"))
    archs = tc.get("architectures") or outer_archs
    if not archs:
        raise ValueError(f"{source} has no 'architectures' field, so the model family is unknown.")
    arch = archs[0]
    if arch not in _FAMILIES and outer_archs and outer_archs[0] in _FAMILIES:
        arch = outer_archs[0]
    if arch not in _FAMILIES:
        raise ValueError(
            f"{source}: the planner does not know the architecture {arch!r}. "
            f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    family = _FAMILIES[arch]
    r = _Reader(tc, arch)
    model_type = tc.get("model_type") or cfg.get("model_type") or ""
    num_layers = int(r.req("num_hidden_layers", "n_layers", "num_layers"))
    hidden = int(r.req("hidden_size"))
    vocab = int(r.req("vocab_size"))
    num_heads = int(r.req("num_attention_heads"))
    num_kv_heads = int(r.opt("num_key_value_heads", default=num_heads))
    head_dim = int(r.opt("head_dim", default=0) or hidden // num_heads)
    common = dict(
        architecture=arch,
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(r.req("max_position_embeddings")),
        tie_word_embeddings=bool(r.opt("tie_word_embeddings", default=False)),
        family=family,
        source=source,
        sliding_window=r.opt("sliding_window") if r.opt("use_sliding_window", default=True) else None,
    )

    if family == "llama":
        bias = bool(r.opt("attention_bias", default=False))
        return ArchSpec(
            attention="gqa",
            kv_lora_rank=None,
            qk_rope_head_dim=None,
            intermediate_size=int(r.req("intermediate_size")),
            qkv_bias=bias or arch == "Qwen2ForCausalLM",
            o_bias=bias,
            mlp_bias=bool(r.opt("mlp_bias", default=False)),
            qk_norm="head" if arch == "Qwen3ForCausalLM" else "none",
            **common,
        )

    if family == "mla":
        num_experts = int(r.opt("n_routed_experts", default=0) or 0)
        v32 = arch in ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
        shared = int(r.opt("n_shared_experts", default=0) or 0)
        moe_i = int(r.req("moe_intermediate_size")) if num_experts else 0
        common["head_dim"] = int(r.req("qk_nope_head_dim")) + int(r.req("qk_rope_head_dim"))
        return ArchSpec(
            attention="mla",
            kv_lora_rank=int(r.req("kv_lora_rank")),
            qk_rope_head_dim=int(r.req("qk_rope_head_dim")),
            q_lora_rank=r.opt("q_lora_rank"),
            qk_nope_head_dim=int(r.req("qk_nope_head_dim")),
            v_head_dim=int(r.req("v_head_dim")),
            intermediate_size=int(r.req("intermediate_size")),
            moe_layers=_moe_layers_deepseek(r, num_layers) if num_experts else (),
            num_experts=num_experts,
            num_experts_per_tok=int(r.req("num_experts_per_tok")) if num_experts else 0,
            moe_intermediate_size=moe_i,
            shared_expert_intermediate_size=shared * moe_i,
            router_correction_bias=r.opt("topk_method") == "noaux_tc" or model_type != "deepseek_v2",
            indexer_heads=int(r.req("index_n_heads")) if v32 else 0,
            indexer_head_dim=int(r.req("index_head_dim")) if v32 else 0,
            **common,
        )

    # family == "moe_gqa": GQA attention with (some) routed-MoE layers
    extra: dict[str, Any] = {}
    if arch == "MixtralForCausalLM":
        e = int(r.req("num_local_experts", "num_experts"))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=int(r.req("intermediate_size")),
            intermediate_size=0,
            moe_layers=tuple(range(num_layers)),
        )
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        e = int(r.req("num_experts", "num_local_experts"))
        shared_i = int(r.opt("shared_expert_intermediate_size", default=0) or 0)
        qwen2 = arch == "Qwen2MoeForCausalLM"
        bias = bool(r.opt("attention_bias", default=False))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=int(r.req("moe_intermediate_size")),
            intermediate_size=int(r.req("intermediate_size")),
            moe_layers=_moe_layers_qwen(r, num_layers, e),
            shared_expert_intermediate_size=shared_i if qwen2 else 0,
            shared_expert_gate=qwen2 and shared_i > 0,
            qkv_bias=bool(r.opt("qkv_bias", default=True)) if qwen2 else bias,
            o_bias=False if qwen2 else bias,
            qk_norm="none" if qwen2 else "head",
        )
    elif arch == "Glm4MoeForCausalLM":
        e = int(r.req("n_routed_experts"))
        moe_i = int(r.req("moe_intermediate_size"))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=moe_i,
            intermediate_size=int(r.req("intermediate_size")),
            moe_layers=_moe_layers_deepseek(r, num_layers),
            shared_expert_intermediate_size=int(r.opt("n_shared_experts", default=0) or 0) * moe_i,
            router_correction_bias=True,
            qkv_bias=bool(r.opt("attention_bias", default=False)),  # transformers' default
            qk_norm="head" if r.opt("use_qk_norm", default=False) else "none",
        )
    elif arch == "MiniMaxM2ForCausalLM":
        e = int(r.req("num_local_experts", "num_experts"))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=int(r.req("intermediate_size")),
            intermediate_size=0,
            moe_layers=tuple(range(num_layers)),
            router_correction_bias=bool(r.opt("use_routing_bias", default=True)),
            qk_norm="full" if r.opt("use_qk_norm", default=True) else "none",
        )
    elif arch == "GptOssForCausalLM":
        e = int(r.req("num_local_experts", "num_experts"))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=int(r.req("intermediate_size")),
            intermediate_size=0,
            moe_layers=tuple(range(num_layers)),
            router_bias=True,
            expert_bias=True,
            qkv_bias=bool(r.opt("attention_bias", default=True)),
            o_bias=bool(r.opt("attention_bias", default=True)),
            attention_sinks=True,
        )
    elif arch in ("Llama4ForConditionalGeneration", "Llama4ForCausalLM"):
        e = int(r.req("num_local_experts"))
        step = int(r.opt("interleave_moe_layer_step", default=1) or 1)
        moe_layers = r.opt("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step)) if step else []
        moe_i = int(r.req("intermediate_size"))
        extra = dict(
            num_experts=e,
            moe_intermediate_size=moe_i,
            intermediate_size=int(r.req("intermediate_size_mlp")),
            moe_layers=tuple(moe_layers),
            shared_expert_intermediate_size=moe_i,
            qkv_bias=bool(r.opt("attention_bias", default=False)),
            o_bias=bool(r.opt("attention_bias", default=False)),
        )
    else:  # pragma: no cover - _FAMILIES and this chain are kept in step
        raise ValueError(f"{source}: no parameter formula for {arch}")
    if not extra["num_experts"]:
        extra["moe_layers"] = ()
    return ArchSpec(
        attention="gqa",
        kv_lora_rank=None,
        qk_rope_head_dim=None,
        num_experts_per_tok=int(r.req("num_experts_per_tok", "experts_per_token")),
        **extra,
        **common,
    )
