"""llama.cpp's "llama" GGUF layout → an HF LlamaForCausalLM config and parameter names.

GGUF stores metadata under `llama.*` keys and tensors under llama.cpp names (`blk.3.attn_q.weight`). The
converter also permutes the rows of Q and K inside each head, because llama.cpp's rotary pairs element i
with i+1 while HF's pairs i with i + head_dim/2; `unpermute_qk` undoes that so HF's Llama math applies.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

# Per-layer GGUF tensor stem → HF module path under model.layers.{i}.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, num_layers: int) -> str:
    """The HF parameter name for a llama GGUF tensor; ValueError for anything the Llama model has no slot for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        raise ValueError(
            "GGUF tensor 'rope_freqs.weight' (Llama-3.1-style rope frequency scaling) is not supported by the "
            "GGUF loader yet; load the original HF checkpoint instead."
        )
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        layer = int(m.group(1))
        if layer >= num_layers:
            raise ValueError(f"GGUF tensor {gguf_name!r} names layer {layer}, but llama.block_count is {num_layers}.")
        return f"model.layers.{layer}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama model (unknown llama.cpp tensor name).")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's per-head row interleave of Q/K weights (or biases): rows (2, d/2) ← (d/2, 2)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"Cannot undo the rotary permutation: {rows} rows do not split into {n_heads} heads of even size.")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """unpermute_qk on the rows of a tensor as the file stores it (values, or quantized blocks: one row each)."""
    n = rows.shape[0]
    if n % (2 * n_heads):
        raise ValueError(f"Cannot undo the rotary permutation: {n} rows do not split into {n_heads} heads of even size.")
    return np.ascontiguousarray(rows.reshape(n_heads, n // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2)).reshape(rows.shape)


def llama_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """An HF config.json-style dict for LlamaForCausalLM from `llama.*` / `tokenizer.ggml.*` metadata.

    `tensor_shapes` maps GGUF tensor names to HF-orientation shapes; the vocabulary size, tied embeddings and
    attention bias are read from which tensors exist, as the file's own metadata may omit them.
    """

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ValueError(f"GGUF metadata lacks 'llama.{key}', which a llama model needs.")
        return meta[f"llama.{key}"]

    def scalar_int(key: str, value: Any) -> int:
        if isinstance(value, list):  # some architectures store per-layer head counts; Llama has one
            if len(set(value)) != 1:
                raise ValueError(f"GGUF 'llama.{key}' varies per layer ({value}); the Llama model needs one value.")
            value = value[0]
        return int(value)

    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise ValueError(
            "This llama GGUF is a Mixture-of-Experts model (llama.expert_count > 0, Mixtral-style); the GGUF loader "
            "maps dense llama files only. Load the original HF checkpoint instead."
        )
    hidden = int(need("embedding_length"))
    heads = scalar_int("attention.head_count", need("attention.head_count"))
    kv_heads = scalar_int("attention.head_count_kv", meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF llama.attention.value_length differs from key_length; the Llama model needs them equal.")
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"GGUF llama.rope.dimension_count={rope_dims} but head_dim={head_dim}: partial rotary is not a llama feature."
        )
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no 'token_embd.weight' tensor.")
    vocab = tensor_shapes["token_embd.weight"][0]
    if "llama.vocab_size" in meta and int(meta["llama.vocab_size"]) != vocab:
        raise ValueError(f"GGUF llama.vocab_size={meta['llama.vocab_size']} but token_embd.weight has {vocab} rows.")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_shapes),
        "mlp_bias": False,
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    if "general.name" in meta:
        config["_name_or_path"] = str(meta["general.name"])
    return config


def _rope_scaling(meta: dict[str, Any]) -> dict | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    if kind is None and factor is not None:  # older files: a bare linear factor
        kind = "linear"
    if kind in (None, "none") or (factor is not None and float(factor) == 1.0 and kind == "linear"):
        return None
    if factor is None:
        raise ValueError(f"GGUF llama.rope.scaling.type={kind!r} without llama.rope.scaling.factor.")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if "llama.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta["llama.rope.scaling.original_context_length"])
        return scaling
    raise ValueError(f"GGUF llama.rope.scaling.type={kind!r} is not supported (linear and yarn are).")
