"""Read HF checkpoints: config.json + one or sharded *.safetensors (with model.safetensors.index.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({d / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard {missing[0]}, which is not in {d}.")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {d} (use load_format='dummy' for random weights).")
    return files


def iterate_safetensors(model_dir: str | os.PathLike, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint. lazy=True yields safetensors slices instead, which read
    only the part a rank asks for (loader.tensor_slices); each is valid until the next one is yielded."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))
