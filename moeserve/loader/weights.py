"""Put checkpoint tensors into a model's parameters: HF names map one to one, except the experts, which
checkpoints store one tensor per expert (gate/up/down or w1/w3/w2) or fused, and we store stacked.

Every parameter must be filled exactly once and every tensor must land somewhere; the first mismatch is named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|w1|up_proj|w3|down_proj|w2)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class WeightLoader:
    def __init__(self, model: nn.Module, source: str = "checkpoint"):
        self.params = dict(model.named_parameters())
        self.source = source
        self.filled: dict[str, int] = {}  # parameter -> number of elements written
        self.tied = bool(getattr(model, "tie_word_embeddings", False))
        # e.g. DeepSeek-V3 / GLM-4.5 multi-token-prediction layers, stored after the last decoder layer
        self.skip = getattr(model, "skip_checkpoint_tensor", None)

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self.load_one(name, tensor)
        self.check_complete()

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        if self.skip is not None and self.skip(name):
            return
        if name in self.params:
            return self._copy(name, self.params[name].data, tensor)
        if name == "lm_head.weight" and self.tied:
            return  # tied checkpoints sometimes store it anyway
        if name.endswith("rotary_emb.inv_freq"):
            return
        m = _PER_EXPERT.match(name)
        if m:
            e, proj, prefix = int(m["e"]), m["proj"], m["prefix"]
            if proj in ("down_proj", "w2"):
                target, pname = self._param(f"{prefix}.w2", name), f"{prefix}.w2"
                return self._copy(pname, target[e], tensor, label=name)
            target, pname = self._param(f"{prefix}.w13", name), f"{prefix}.w13"
            half = target.shape[1] // 2
            rows = slice(0, half) if proj in ("gate_proj", "w1") else slice(half, 2 * half)
            return self._copy(pname, target[e, rows], tensor, label=name)
        m = _FUSED.match(name)
        if m:
            pname = f"{m['prefix']}.{'w13' if m['proj'] == 'gate_up_proj' else 'w2'}"
            target = self._param(pname, name)
            if tensor.shape != target.shape and tensor.transpose(1, 2).shape == target.shape:
                tensor = tensor.transpose(1, 2)
            return self._copy(pname, target, tensor, label=name)
        raise ValueError(f"{self.source}: tensor {name!r} matches no parameter of the model "
                         f"(the checkpoint does not match config.json).")

    def _param(self, pname: str, label: str) -> torch.Tensor:
        if pname not in self.params:
            raise ValueError(f"{self.source}: tensor {label!r} matches no parameter of the model.")
        return self.params[pname].data

    def _copy(self, pname: str, target: torch.Tensor, tensor: torch.Tensor, label: str | None = None) -> None:
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{self.source}: tensor {label or pname!r} has shape {tuple(tensor.shape)}, but the "
                             f"config implies {tuple(target.shape)}.")
        target.copy_(tensor)
        self.filled[pname] = self.filled.get(pname, 0) + tensor.numel()

    def check_complete(self) -> None:
        for pname, p in self.params.items():
            if self.filled.get(pname, 0) < p.numel():
                raise ValueError(f"{self.source}: no weights for parameter {pname!r} "
                                 f"(the checkpoint does not match config.json).")


def fill_dummy(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Seeded small uniform values, as vLLM's dummy format does: no checkpoint needed."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.uniform_(low, high, generator=gen)
