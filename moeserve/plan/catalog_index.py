"""The built-in catalog: public config.json files of flagship checkpoints, shipped as package data.

Files are named `<org>--<model>.json` after their hub ids; `resolve_catalog("deepseek-ai/DeepSeek-V3")`,
the file stem, the bare model name (when unique) and the benchmark shape names all find one.
"""

from __future__ import annotations

from pathlib import Path

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"

# benchmark shape names (../shared/BENCHMARKS.md) -> catalog stem
SHAPE_ALIASES = {
    "qwen3-30b-a3b": "Qwen--Qwen3-30B-A3B",
    "qwen3-30b-a3b-fp8": "Qwen--Qwen3-30B-A3B-FP8",
    "deepseek-v2-lite": "deepseek-ai--DeepSeek-V2-Lite",
    "qwen1.5-moe-a2.7b": "Qwen--Qwen1.5-MoE-A2.7B",
    "mixtral-8x7b": "mistralai--Mixtral-8x7B-v0.1",
    "llama-3-8b": "meta-llama--Meta-Llama-3-8B",
}


def catalog_entries() -> dict[str, Path]:
    """hub id (`org/model`) -> config path, for every file in the catalog."""
    return {p.stem.replace("--", "/", 1): p for p in sorted(CATALOG_DIR.glob("*.json"))}


def resolve_catalog(name: str) -> Path | None:
    """The catalog config for a hub id, file stem, bare model name or shape name; None when there is none."""
    key = name.strip().removesuffix(".json").lower()
    if key in SHAPE_ALIASES:
        key = SHAPE_ALIASES[key].lower()
    key = key.replace("--", "/", 1)
    entries = catalog_entries()
    for hub_id, path in entries.items():
        if hub_id.lower() == key:
            return path
    if "/" not in key:  # bare model name, accepted when exactly one org has it
        hits = [p for hub_id, p in entries.items() if hub_id.split("/", 1)[1].lower() == key]
        if len(hits) == 1:
            return hits[0]
    return None
