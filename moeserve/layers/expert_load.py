"""Expert-load telemetry (issue 18.2): tokens routed to each expert, per MoE layer, counted on the device.

`ExpertLoad.attach(model)` gives every Router of the model an int64 counts buffer [num_experts] and a shared
0-d `valid_tokens` tensor. Each router forward adds its chosen ids into its buffer on the device (no host sync,
so it replays inside a CUDA graph; on CUDA the router kernels count as they choose, other routers with one
atomic-add kernel); rows at or past `valid_tokens` (a graph's padding rows) count nothing. The runner writes `valid_tokens` before each forward. Off by default (`--expert-load-telemetry`): a
router without a buffer pays one attribute check.

`ExpertLoad.snapshot()` (the engine thread, between steps, only when asked) copies the counts to the host and
returns the counts over a sliding window: now minus the newest snapshot at least `window_s` old (or since the
start, while there is none that old).
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_WINDOW_S = 60.0
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def count_routed(counts: torch.Tensor, ids: torch.Tensor, valid_tokens: torch.Tensor) -> None:
    """counts[e] += how many of the first `valid_tokens` rows of ids [T, k] chose expert e. In place. CUDA: one
    kernel (kernels/router.count_routed; the router kernels count inside themselves); this is the
    reference."""
    if ids.is_cuda:
        from moeserve.kernels.router import count_routed as count_on_device

        return count_on_device(counts, ids, valid_tokens)
    flat = ids.reshape(-1).long()
    rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    counts.scatter_add_(0, flat, (rows < valid_tokens).long())


@dataclass
class ExpertLoadSnapshot:
    layers: list[int]  # the model's layer index of each row
    counts: list[list[int]]  # [layer][expert]: tokens routed over the window
    window_s: float  # seconds the window actually spans
    ep_size: int = 1  # expert-parallel ranks; rank r holds the experts of moeserve.layers.experts.expert_range

    def rank_counts(self) -> list[list[int]]:
        """[layer][EP rank]: tokens routed to the experts each rank holds (empty without EP)."""
        if self.ep_size <= 1 or not self.counts:
            return []
        from moeserve.layers.experts import expert_range

        spans = [expert_range(len(self.counts[0]), self.ep_size, r) for r in range(self.ep_size)]
        return [[sum(row[first:first + n]) for first, n in spans] for row in self.counts]

    def rank_shares(self) -> list[float]:
        """Each EP rank's share of all routed tokens over the window, summed over layers (empty without EP)."""
        per_layer = self.rank_counts()
        total = sum(map(sum, per_layer))
        return [sum(layer[r] for layer in per_layer) / total for r in range(self.ep_size)] if total else []

    def to_json(self) -> dict:
        out = {"layers": [{"layer": layer, "counts": row, "total": sum(row)}
                          for layer, row in zip(self.layers, self.counts)],
               "num_experts": len(self.counts[0]) if self.counts else 0, "window_s": round(self.window_s, 3)}
        if self.ep_size > 1:
            out["ep_size"] = self.ep_size
            for entry, ranks in zip(out["layers"], self.rank_counts()):
                entry["ranks"] = ranks
        return out

    def layer_stats(self) -> list[tuple[int, float, float]]:
        """(layer, imbalance = max / mean, the hottest expert's share) for each layer that routed any token."""
        out = []
        for layer, row in zip(self.layers, self.counts):
            total = sum(row)
            if total:
                out.append((layer, max(row) * len(row) / total, max(row) / total))
        return out


class ExpertLoad:
    def __init__(self, layers: list[int], routers: list[nn.Module], device: torch.device,
                 window_s: float = DEFAULT_WINDOW_S):
        from moeserve.distributed.parallel_state import layout

        self.layers, self.routers, self.window_s = layers, routers, window_s
        self.ep_size = layout().ep  # the layout at build time: the experts' placement
        self.valid_tokens = torch.zeros((), dtype=torch.int64, device=device)
        for r in routers:
            r.expert_counts = torch.zeros(r.cfg.num_experts, dtype=torch.int64, device=device)
            r.valid_tokens = self.valid_tokens
        self._history: collections.deque = collections.deque()  # (monotonic time, host counts [L, E])
        self.reset()

    @classmethod
    def attach(cls, model: nn.Module, device: torch.device, window_s: float = DEFAULT_WINDOW_S) -> "ExpertLoad | None":
        """Counts for every Router of `model` (this rank's layers); None for a model without one (dense)."""
        from moeserve.layers.moe import Router

        found = []
        for name, m in model.named_modules():
            if isinstance(m, Router):
                match = _LAYER_INDEX.search(name)
                found.append((int(match.group(1)) if match else len(found), m))
        if not found:
            return None
        found.sort(key=lambda lm: lm[0])
        return cls([layer for layer, _ in found], [m for _, m in found], device, window_s)

    def set_valid_tokens(self, n: int) -> None:
        """Before a forward: its first n rows are real tokens. A device fill, no sync."""
        self.valid_tokens.fill_(n)

    def reset(self) -> None:
        """Zero the counts (after warm-up and graph capture, whose forwards are not traffic)."""
        for r in self.routers:
            r.expert_counts.zero_()
        self._history.clear()
        self._history.append((time.monotonic(), torch.zeros(len(self.routers), self.routers[0].cfg.num_experts,
                                                            dtype=torch.int64)))

    def totals(self) -> torch.Tensor:
        """Host copy of the counts since the start, [layers, experts]."""
        return torch.stack([r.expert_counts for r in self.routers]).cpu()

    def snapshot(self, now: float | None = None) -> ExpertLoadSnapshot:
        now = time.monotonic() if now is None else now
        current = self.totals()
        history = self._history
        # keep the newest snapshot at least window_s old as the base; drop the older ones
        while len(history) > 1 and now - history[1][0] >= self.window_s:
            history.popleft()
        base_time, base = history[0]
        history.append((now, current))
        return ExpertLoadSnapshot(self.layers, (current - base).tolist(), now - base_time, self.ep_size)
