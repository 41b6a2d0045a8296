"""From an EngineConfig to a model on its device: find the source, read config.json, build, fill weights."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.config import EngineConfig
from moeserve.models.hf_config import HFConfig
from moeserve.models.registry import model_class
from moeserve.layers.linear import attach_weight_loaders
from moeserve.loader.weights import WeightLoader, fill_dummy


@dataclass
class ModelSource:
    kind: str  # "hf_dir" | "gguf" | "config_only"
    path: str
    config: dict
    name: str


def resolve_source(cfg: EngineConfig) -> ModelSource:
    """Where the model comes from and its config.json, with cfg.hf_overrides laid over it."""
    source = _find_source(cfg)
    if cfg.hf_overrides:
        if source.kind == "gguf":
            raise ValueError("hf_overrides applies to a config.json checkpoint; a GGUF file's config comes from "
                             "its own metadata.")
        from moeserve.plan.arch import apply_hf_overrides

        source.config = apply_hf_overrides(source.config, cfg.hf_overrides)
    return source


def _find_source(cfg: EngineConfig) -> ModelSource:
    model = cfg.model
    if model is None:
        from moeserve.loader.gguf import DEFAULT_MODEL_NAME, default_model_path

        model = default_model_path()
        return _gguf_source(model, DEFAULT_MODEL_NAME)
    p = Path(model).expanduser()
    if p.is_file() and (p.suffix == ".gguf" or cfg.load_format == "gguf"):
        return _gguf_source(str(p), p.stem)
    if p.is_file() and p.name.endswith(".json"):
        return ModelSource("config_only", str(p), _read_json(p), p.parent.name)
    if p.is_dir():
        config = p / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{p} has no config.json, so it is not an HF checkpoint directory.")
        return ModelSource("hf_dir", str(p), _read_json(config), str(model))
    if cfg.load_format == "dummy":
        try:
            from moeserve.plan.catalog import resolve_catalog
        except ImportError:
            resolve_catalog = None
        found = resolve_catalog(model) if resolve_catalog else None
        if found:
            return ModelSource("config_only", str(found), _read_json(Path(found)), str(model))
    raise FileNotFoundError(
        f"Model {model!r} is not a local checkpoint directory, config.json or .gguf file "
        f"(moeserve never downloads from a hub; with load_format='dummy' a catalog id such as "
        f"'Qwen/Qwen3-30B-A3B' also works)."
    )


def _gguf_source(path: str, name: str) -> ModelSource:
    return ModelSource("gguf", path, {}, name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no CUDA device is available.")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"Unsupported device {name!r}; use cpu or cuda.")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype float16 is not supported on CPU (slow and inexact there); use float32 or bfloat16.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU cannot run bfloat16; use dtype='float16' or 'float32'.")
    return dtype


@dataclass
class LoadedModel:
    model: torch.nn.Module
    hf_config: HFConfig
    tokenizer: object | None
    eos_token_ids: set[int]
    source: ModelSource
    load_seconds: float


def load_model(cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
               source: ModelSource | None = None) -> LoadedModel:
    t0 = time.perf_counter()
    source = source or resolve_source(cfg)
    tensors = tokenizer = None
    if source.kind == "gguf":
        from moeserve.loader.gguf import load_gguf_model, read_gguf

        if cfg.load_format != "dummy":  # its own path: on CPU the weights stay packed (layers/quant) unless
            # float32 is asked for by name, which gets the dequantized fp32 reference
            return load_gguf_model(source, device, dtype, t0, keep_packed=cfg.dtype_name != "float32")
        ckpt = read_gguf(source.path)
        source.config, tokenizer = ckpt.config, ckpt.tokenizer
    hf_config = HFConfig(source.config, source=os.path.join(source.path, "config.json")
                         if source.kind == "hf_dir" else source.path)
    cls = model_class(hf_config.architecture)
    from moeserve.layers.quant import resolve_quantization

    quant = resolve_quantization(cfg.quantization, source.config)
    model = build_empty(cls, hf_config, device, dtype, quant)
    if cfg.load_format == "dummy":
        fill_dummy(model, cfg.seed)
    elif source.kind == "hf_dir":
        from moeserve.loader.safetensors_loader import iterate_safetensors

        WeightLoader(model, source.path).load(iterate_safetensors(source.path, lazy=True))
    else:
        raise ValueError(f"{source.path} is a config without weights; use load_format='dummy'.")
    with torch.no_grad():
        for module in list(model.modules()):
            if hasattr(module, "post_load"):  # a layer's last step once its weights are in
                module.post_load()
        if quant is not None:
            from moeserve.layers.quant import finalize

            finalize(model, quant)
    model.eval()
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer or (source.path if source.kind == "hf_dir" else None))
    return LoadedModel(model, hf_config, tokenizer, eos_ids(hf_config, source, tokenizer), source,
                       time.perf_counter() - t0)


def build_empty(cls, hf_config: HFConfig, device: torch.device, dtype: torch.dtype, quant=None) -> torch.nn.Module:
    """Construct on the meta device (no memory, no init), then give it real, uninitialised storage. Parallel
    layers size their parameters for this rank (the TP group must be set up before), and get their weight
    loaders back (to_empty makes new parameter objects). `quant` (an fp8 or int4 config, layers/quant/) swaps the
    layers' weights for quantized storage while still on meta."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(hf_config)
            if quant is not None:
                from moeserve.layers.quant import apply_quantization

                apply_quantization(model, quant)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device)
    attach_weight_loaders(model)
    return model


def load_tokenizer(path: str | None):
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None  # e.g. a dummy checkpoint: token-id prompts only
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_ids(hf_config: HFConfig, source: ModelSource, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(x for x in v if isinstance(x, int))

    add(hf_config.get("eos_token_id"))
    gen = Path(source.path) / "generation_config.json"
    if source.kind == "hf_dir" and gen.exists():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return ids
