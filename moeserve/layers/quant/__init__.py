"""Weight quantization methods (fp8, int4): which one a checkpoint or flag asks for, in one place."""

from __future__ import annotations

from typing import Callable


def resolve_quantization(flag: str | None, hf_config: dict):
    """The quant config of a load (Fp8Config, Int4Config or None), from config.json's quantization_config and the
    --quantization flag (vLLM semantics: the flag may be omitted; a conflicting one is refused)."""
    from moeserve.layers.quant.int4 import is_int4, resolve_int4

    if is_int4(flag, hf_config):
        return resolve_int4(flag, hf_config)
    from moeserve.layers.quant.fp8 import resolve_quantization as resolve_fp8

    return resolve_fp8(flag, hf_config)


def apply_quantization(model, cfg) -> None:
    """Swap the layers' weights for quantized storage (model on the meta device)."""
    from moeserve.layers.quant.int4 import Int4Config, apply_int4

    if isinstance(cfg, Int4Config):
        return apply_int4(model, cfg)
    from moeserve.layers.quant.fp8 import apply_fp8

    apply_fp8(model, cfg)


def finalize(model, cfg) -> None:
    from moeserve.layers.quant.int4 import Int4Config, finalize as finalize_int4

    if isinstance(cfg, Int4Config):
        return finalize_int4(model)
    from moeserve.layers.quant.fp8 import finalize as finalize_fp8

    finalize_fp8(model)


def weight_loader_for(module, pname: str, default):
    """The loader of one parameter of a quantized module (linear.attach_weight_loaders asks)."""
    from moeserve.layers.quant import fp8, int4

    loader = int4.weight_loader_for(module, pname, default)
    return loader if loader is not default else fp8.weight_loader_for(module, pname, default)


def compressed_tensors_weights(q: dict) -> dict:
    """The weights entry of a compressed-tensors config's (first) config group."""
    groups = (q or {}).get("config_groups") or {}
    return (next(iter(groups.values()), None) or {}).get("weights") or {}


def compressed_tensors_group(q: dict, need: Callable[[bool, str], None]) -> tuple[dict, dict, str | None]:
    """(group, its weights entry, format) of a compressed-tensors config, with what every method here requires
    checked through `need` (which raises naming the field): one config group, Linear targets, static symmetric
    weights."""
    groups = q.get("config_groups") or {}
    need(len(groups) == 1, f"{len(groups)} entries in quantization_config.config_groups (one is supported)")
    g = next(iter(groups.values()))
    w = g.get("weights") or {}
    need(w.get("symmetric", True) is True, "config_groups weights symmetric=false")
    need(not w.get("dynamic", False), "config_groups weights dynamic=true")
    need(set(g.get("targets") or ["Linear"]) == {"Linear"}, f"config_groups targets={g.get('targets')}")
    return g, w, g.get("format") or q.get("format")
