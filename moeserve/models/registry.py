"""HF `architectures` name -> model class."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek", "DeepseekV3ForCausalLM"),
    "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def register(arch: str, module: str, cls: str) -> None:
    _MODELS[arch] = (module, cls)


def model_class(arch: str):
    if arch not in _MODELS:
        raise ValueError(
            f"Unsupported architecture {arch!r}. Supported: {', '.join(supported_architectures())}."
        )
    module, cls = _MODELS[arch]
    return getattr(importlib.import_module(f"moeserve.models.{module}"), cls)
