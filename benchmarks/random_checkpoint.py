"""A random checkpoint of a shape's real size, written once and loaded by every engine: routing both engines share.

    python benchmarks/random_checkpoint.py --shape deepseek-v2-lite --out /tmp/moeserve-random/deepseek-v2-lite

Why not `load_format="dummy"` for MoE comparisons: dummy weights are uniform in +-1e-3 (vLLM's format, and
moeserve's), so a router's logits are ~1e-5. vLLM's DeepSeek router (grouped top-k) takes the softmax in bf16,
where all 64 probabilities round to one value; every token then ties, and top-k sends them all to the same few
experts, so vLLM's MoE reads a fraction of the expert weights (profiled: fused_moe 4.4 ms per decode step at 256
rows, below the 9.6 ms that reading every expert takes; results/traffic/2026-11-27-dummy-routing-h100). moeserve
routes on fp32 logits and spreads the same tokens over all experts. Random weights at transformers' own init
scale (normal with std initializer_range, norms at 1) give O(1) logits, so both engines route as a trained
model's load-balanced router would, from identical weights.

The checkpoint has the tensors transformers' save_pretrained writes for the shape's architecture (per-expert
tensors, HF names), bf16, drawn one tensor at a time (write_streamed; on the GPU when there is one), so a model
larger than the GPU's memory still gets written. A block-fp8 shape (DeepSeek-V3/R1, `quant_method: fp8` with
`weight_block_size`) is written as those checkpoints ship: every projection in e4m3 with its `weight_scale_inv`
per block; the router, embeddings, head and norms as built (bf16; transformers keeps V3's router in fp32). Every
decoder-layer linear left in bf16 (the routers) is named in the written config's `modules_to_not_convert` if the
config does not name it already: an engine that reads an fp8 config as "every linear not listed is fp8" (vLLM
0.26's qwen3_moe builds its router that way) must not expect e4m3 and a scale where there are none. Session 17's
Qwen3-FP8 config lacked the list and vLLM routed every token to experts 0-7. The
correction bias is transformers' zeros, so the routing follows the logits (on dummy weights a +-1e-3 bias sends
every token to the same experts). A folder that already holds the same config and seed is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MARKER = "random_checkpoint.json"


def _fingerprint(config: dict, seed: int, dtype: str) -> str:
    return hashlib.sha256(json.dumps([config, seed, dtype], sort_keys=True).encode()).hexdigest()[:16]


def build(config: dict, out: Path, seed: int = 0, dtype: str = "bfloat16", device: str | None = None) -> bool:
    """Write the checkpoint into `out` unless it is there already; returns whether it was written."""
    import torch
    from transformers import AutoConfig

    qcfg = config.get("quantization_config")
    if qcfg and not (qcfg.get("quant_method") == "fp8" and qcfg.get("weight_block_size")):
        raise SystemExit(f"random_checkpoint: quantized shapes other than block fp8 are not supported "
                         f"({qcfg.get('quant_method')!r})")
    cfg = {k: v for k, v in config.items() if k != "auto_map"}
    fp = _fingerprint(cfg, seed, dtype)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp:
        return False
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    hf_cfg = AutoConfig.from_pretrained(str(out))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    block = tuple(qcfg["weight_block_size"]) if qcfg else None
    ignored = ignored_modules(qcfg or {})
    n, kept = write_streamed(hf_cfg, out, block, ignored, getattr(torch, dtype), device, seed)
    if block and (unlisted := [m for m in kept if not any(f".{i}." in f".{m}." for i in ignored)]):
        cfg["quantization_config"] = {**qcfg, "modules_to_not_convert": list(
            qcfg.get("modules_to_not_convert") or []) + unlisted}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    marker.write_text(json.dumps({"fingerprint": fp, "seed": seed, "dtype": dtype, "params": n,
                                  "build_s": round(time.perf_counter() - t, 1)}))
    return True


def write_streamed(hf_cfg, out: Path, block: tuple[int, int] | None, ignored: list[str], dtype, device: str,
                   seed: int, shard_bytes: float = 5e9) -> tuple[int, list[str]]:
    """The checkpoint tensor by tensor, never the whole model in memory: the architecture is built on the meta
    device, its state dict put back into checkpoint names and layout by transformers' revert_weight_conversion
    (per-expert tensors), and each tensor drawn on `device` at transformers' init scale (normal with std
    initializer_range; norms 1, biases 0), quantized (block fp8) and written in shards of ~shard_bytes with their
    index. A 30B model's bf16 build took 78 GiB of an 80 GiB H100 and ran out of memory (session 15); this needs
    one tensor at a time. Returns the parameter count and the decoder-layer linears left unquantized (block fp8:
    the routers; their module names)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion  # 5.17 on the device has it too

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    specs = revert_weight_conversion(model, model.state_dict())
    if getattr(hf_cfg, "tie_word_embeddings", False):
        specs.pop("lm_head.weight", None)  # the embedding table is the head
    std = float(getattr(hf_cfg, "initializer_range", 0.02))
    gen = torch.Generator(device).manual_seed(seed)
    if block:
        from moeserve.layers.quant.fp8 import quantize_blocks
    for old in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # an earlier build's shards
    shards: list[list[str]] = []  # the tensor names of each written shard
    current: dict = {}
    size = params = 0
    kept: list[str] = []

    def flush() -> None:
        save_file(current, str(out / f"model-{len(shards) + 1:05d}.safetensors"), metadata={"format": "pt"})
        shards.append(list(current))

    for name, meta in specs.items():
        params += meta.numel()
        if "norm" in name and name.endswith(".weight"):
            t = torch.ones(meta.shape, dtype=meta.dtype, device=device)
        elif name.endswith("bias"):
            t = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
        else:
            t = torch.empty(meta.shape, dtype=meta.dtype, device=device).normal_(0.0, std, generator=gen)
        tensors = {name: t}
        if block and fp8_quantized(name, t, ignored):
            q, s = quantize_blocks(t, block)
            tensors = {name: q, name.removesuffix(".weight") + ".weight_scale_inv": s}
        elif block and t.dim() == 2 and name.endswith(".weight") and ".layers." in name and "norm" not in name:
            kept.append(name.removesuffix(".weight"))
        for k, v in tensors.items():
            current[k] = v.contiguous().cpu()
            size += v.numel() * v.element_size()
        if size >= shard_bytes:  # host memory holds one shard at a time
            flush()
            current, size = {}, 0
    if current or not shards:
        flush()
    weight_map = {}
    for i, names in enumerate(shards):  # transformers' shard names and index
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"model-{i + 1:05d}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                  indent=1))
    return params, kept


def ignored_modules(qcfg: dict) -> list[str]:
    return list(qcfg.get("modules_to_not_convert") or []) + list(qcfg.get("ignored_layers") or [])


def fp8_quantized(name: str, t, ignored: list[str]) -> bool:
    """What the published block-fp8 checkpoints store in e4m3: every projection of a decoder layer; not the
    router (`mlp.gate`), embeddings, head, norms or biases, nor a module the config leaves unconverted."""
    return (t.dim() == 2 and name.endswith(".weight") and ".layers." in name and ".mlp.gate." not in name
            and "norm" not in name and not any(f".{m}." in f".{name}" for m in ignored))


def build_in_subprocess(config: dict, out: Path, timeout: float | None = None) -> int:
    """build() of `config` in a process of its own (the caller's process then never holds the model's memory, nor
    the GPU): the config is written beside `out` as OUT.config.json. Returns the exit code."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = out.with_name(out.name + ".config.json")
    src.write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--config", str(src), "--out", str(out)],
                          timeout=timeout).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", help="pinned shape name (benchmarks/shapes.py)")
    ap.add_argument("--config", help="instead of --shape: a config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)
    if bool(a.shape) == bool(a.config):
        ap.error("give --shape or --config")
    if a.config:
        config = json.loads(Path(a.config).read_text())
    else:
        from shapes import get_shape, load_config

        config = load_config(get_shape(a.shape))
    t = time.perf_counter()
    wrote = build(config, Path(a.out), a.seed, a.dtype)
    print(f"random_checkpoint: {'wrote' if wrote else 'reused'} {a.out} in {time.perf_counter() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
