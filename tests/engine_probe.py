"""Run the engine's runner on hand-made prefill batches: hidden states at every position, through the paged path."""

from __future__ import annotations

import torch

from moeserve.engine.step import StepInput


def prefill_hidden(engine, reqs) -> torch.Tensor:
    """reqs: Requests with blocks allocated for their whole prompts. Returns hidden states [sum(lens), H]."""
    ids = [f"probe-{r.request_id}" for r in reqs]
    step = StepInput(req_ids=ids, starts=[0] * len(reqs), num_tokens=[r.num_tokens for r in reqs],
                     token_ids=[list(r.all_token_ids) for r in reqs], pending_rows=[-1] * len(reqs),
                     new_blocks={i: list(r.block_ids) for i, r in zip(ids, reqs)}, reset=list(ids))
    runner = engine.runner
    runner.tables.apply(step)
    try:
        B, T = runner._prepare(step)
        return runner._run_eager(B, T)
    finally:
        runner.tables.apply(StepInput(freed=ids))
