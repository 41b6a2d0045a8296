"""Pipeline parallelism: which decoder layers this stage holds, and the hand-over between stages.

Layers are split in contiguous ranges, as evenly as they go; the remainder goes to the stages just before the
last one (vLLM's split), because the last stage also holds the final norm, the LM head and the sampler, and the
first one the embedding (cheap). Each stage builds only its own layers; the others are `MissingLayer`s without
parameters, so the loader skips their tensors and the KV cache holds only this stage's layers.

Between stages the running (hidden, residual) pair of the step's T tokens travels point to point over the PP
group, as two fixed-shape [T, hidden] tensors: every stage knows T from the step message. A stage does not wait
for its hand-over to arrive: with several micro-batches in flight (engine.py) it goes on to the next one while
the stage after it is still busy with the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeserve.distributed.parallel_state import PendingSends, get_pp_group


def stage_layer_range(num_layers: int, stage: int, num_stages: int) -> tuple[int, int]:
    """[start, end) of the decoder layers that `stage` of `num_stages` holds."""
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size={num_stages} is more than the model's {num_layers} layers.")
    sizes = [num_layers // num_stages] * num_stages
    for i in range(num_layers % num_stages):  # the remainder to the stages before the last
        sizes[-2 - i] += 1
    start = sum(sizes[:stage])
    return start, start + sizes[stage]


@dataclass(frozen=True)
class PipelineStage:
    start: int  # first decoder layer held here
    end: int  # one past the last
    is_first: bool  # holds the embedding and reads token ids
    is_last: bool  # holds the final norm and the LM head, and produces logits

    def holds(self, layer_idx: int) -> bool:
        return self.start <= layer_idx < self.end


def pipeline_stage(num_layers: int) -> PipelineStage:
    """This rank's stage, from the PP group (the whole model when there is no pipeline)."""
    pp = get_pp_group()
    start, end = stage_layer_range(num_layers, pp.rank, pp.size)
    return PipelineStage(start, end, pp.is_first, pp.is_last)


class MissingLayer(nn.Module):
    """Stands in for a module another stage holds: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("This module lives on another pipeline stage.")


def missing_prefixes(model: nn.Module) -> set[str]:
    """Names of the modules that live on other stages (their checkpoint tensors are not this rank's)."""
    return {name for name, m in model.named_modules() if isinstance(m, MissingLayer)}


class StageLink:
    """One stage's ends of the pipeline: receives (hidden, residual) from the stage before, sends them to the one
    after. Receive buffers are allocated once at the largest step."""

    def __init__(self, max_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.pp = get_pp_group()
        self.recv_hidden = torch.empty(max_tokens, hidden_size, dtype=dtype, device=device)
        self.recv_residual = torch.empty(max_tokens, hidden_size, dtype=dtype, device=device)
        self.sending = PendingSends()  # hand-overs on their way

    @property
    def is_first(self) -> bool:
        return self.pp.is_first

    @property
    def is_last(self) -> bool:
        return self.pp.is_last

    def recv(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, r = self.recv_hidden[:T], self.recv_residual[:T]
        self.pp.recv(h, src=self.pp.rank - 1)
        self.pp.recv(r, src=self.pp.rank - 1)
        return h, r

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Start the hand-over to the next stage and return; the tensors are kept until it has left."""
        for t in (hidden.contiguous(), residual.contiguous()):
            self.sending.add(self.pp.isend(t, dst=self.pp.rank + 1), t)

    def zeros(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stand-in inputs for a forward without a stage before it (memory profiling)."""
        return self.recv_hidden[:T].zero_(), self.recv_residual[:T].zero_()
