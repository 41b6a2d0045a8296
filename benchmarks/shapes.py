"""The pinned benchmark shapes (../shared/BENCHMARKS.md) and where their config.json lives.

On the device only the repository travels, so the config is looked up in the planner's catalog
(package data inside moeserve) first; the checkout's ../shared/model-configs is a fallback for this machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    name: str
    hub_id: str  # what LLM(model=...) and the catalog take
    gpu_kind: str  # the device kind BENCHMARKS.md pins it to

    @property
    def config_filename(self) -> str:
        return self.hub_id.replace("/", "--") + ".json"


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "nvidia-h100-x1"),
        # the same with Qwen's published fp8 quantization_config (block [128, 128], dynamic activations): issue 19
        Shape("qwen3-30b-a3b-fp8", "Qwen/Qwen3-30B-A3B-FP8", "nvidia-h100-x1"),
        Shape("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "nvidia-h100-x1"),
        Shape("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", "nvidia-h100-x1"),
        Shape("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "nvidia-h200"),
        Shape("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "nvidia-h100-x1"),
        Shape("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", "nvidia-h200-x4"),  # bf16 whole: 438 GiB over 4 GPUs
        # fp8 block-scaled as published; layer-truncated (--engine-arg hf_overrides=...) below 8 GPUs (issue 20)
        Shape("deepseek-r1", "deepseek-ai/DeepSeek-R1", "nvidia-h200-x8"),
        Shape("kimi-k2.5", "moonshotai/Kimi-K2.5", "nvidia-h200-x8"),  # int4 routed experts (compressed-tensors)
    )
}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; pinned shapes: {', '.join(SHAPES)}") from None


def config_path(shape: Shape) -> Path:
    """Path of the shape's config.json: the planner's catalog, else ../shared/model-configs."""
    tried = []
    try:
        from moeserve.plan.catalog_index import resolve_catalog
    except ImportError as e:
        tried.append(f"moeserve.plan.catalog_index not importable ({e})")
    else:
        path = resolve_catalog(shape.hub_id)
        if path is not None and Path(path).is_file():
            return Path(path)
        tried.append(f"the catalog has no {shape.hub_id}")
    path = REPO.parent / "shared" / "model-configs" / shape.config_filename
    if path.is_file():
        return path
    tried.append(f"no {path}")
    raise FileNotFoundError(f"config.json of shape {shape.name} not found: " + "; ".join(tried))


def load_config(shape: Shape) -> dict:
    return json.loads(config_path(shape).read_text())
