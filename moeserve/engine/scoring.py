"""Teacher-forced scoring: the model's full-vocabulary next-token log-probabilities at given positions of given
token sequences, through the engine's own paged prefill path (the runner, its KV pool and block tables).

The one hook `moeserve check-quant` needs and the sampler does not give (it returns top-K logprobs of sampled
tokens only). One process only: a tensor-, pipeline- or data-parallel engine's other ranks would have to run the
same step, which goes through the scheduler's step message, not through here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moeserve.engine.request import Request
from moeserve.engine.step import StepInput
from moeserve.sampling_params import SamplingParams


def score_logprobs(engine, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                   max_positions: int = 1024) -> Iterator[torch.Tensor]:
    """For each token sequence s with start p, yield the log-softmax (float32, over the whole vocabulary, on the
    engine's device) of the model's next-token logits at positions p .. len(s)-1: a [len(s) - p, V] tensor whose
    row j is the distribution of the token after s[:p + j + 1]. Sequences are packed into prefill batches under
    the engine's token and sequence budgets, and at most `max_positions` scored rows per batch (each row is V
    floats on the device); the engine must have no request in flight."""
    cfg = engine.config
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size * cfg.data_parallel_size != 1:
        raise ValueError("scoring runs on one process (tensor/pipeline/data parallel size 1)")
    if engine.has_unfinished_requests():
        raise RuntimeError("score_logprobs needs an idle engine")
    budget, max_seqs = engine.max_num_batched_tokens, engine.runner.max_num_seqs
    vocab = engine.hf_config.vocab_size
    batch: list[tuple[int, list[int], int]] = []
    used = scored = 0
    for i, (s, p) in enumerate(zip(seqs, starts)):
        s = list(s)
        if not 0 <= p < len(s):
            raise ValueError(f"sequence {i}: start {p} outside its {len(s)} tokens")
        if len(s) > min(budget, engine.max_model_len):
            raise ValueError(f"sequence {i} has {len(s)} tokens; the engine runs at most "
                             f"{min(budget, engine.max_model_len)} in one prefill (raise --max-num-batched-tokens "
                             f"or --max-model-len)")
        if batch and (used + len(s) > budget or len(batch) == max_seqs or scored + len(s) - p > max_positions):
            yield from _run(engine, batch, vocab)
            batch, used, scored = [], 0, 0
        batch.append((i, s, p))
        used += len(s)
        scored += len(s) - p
    if batch:
        yield from _run(engine, batch, vocab)


def _run(engine, batch: list[tuple[int, list[int], int]], vocab: int) -> Iterator[torch.Tensor]:
    reqs = []
    try:
        for i, s, _ in batch:
            r = Request(f"score-{i}", f"score-{i}", 0, s, SamplingParams(), max_tokens=1)
            reqs.append(r)  # before allocate: a partial allocation is freed too
            if not engine.kv.allocate(r, len(s)):
                raise RuntimeError(f"the KV pool ({engine.kv.capacity_tokens} tokens) cannot hold a scoring batch "
                                   f"of {sum(len(x) for _, x, _ in batch)} tokens")
        ids = [r.request_id for r in reqs]
        step = StepInput(req_ids=ids, starts=[0] * len(reqs), num_tokens=[len(s) for _, s, _ in batch],
                         token_ids=[s for _, s, _ in batch], pending_rows=[-1] * len(reqs),
                         new_blocks={r.request_id: list(r.block_ids) for r in reqs}, reset=list(ids))
        runner = engine.runner
        runner.tables.apply(step)
        try:
            with torch.inference_mode():
                B, T = runner._prepare(step)
                hidden = runner._run_eager(B, T)
                offset = 0
                rows = []
                for _, s, p in batch:
                    rows.append(torch.arange(offset + p, offset + len(s), device=hidden.device))
                    offset += len(s)
                logits = engine.model.compute_logits(hidden[torch.cat(rows)])[:, :vocab]
                lp = torch.log_softmax(logits.float(), dim=-1)
        finally:
            runner.tables.apply(StepInput(freed=ids))
    finally:
        for r in reqs:
            engine.kv.free(r)
    offset = 0
    for _, s, p in batch:
        n = len(s) - p
        yield lp[offset:offset + n]
        offset += n
