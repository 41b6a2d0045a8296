"""One sequence being generated, and what it has so far. n > 1 completions are n Requests sharing a parent."""

from __future__ import annotations

import enum
import time

from moeserve.outputs import Logprob, RequestMetrics
from moeserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, parent_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, max_tokens: int, arrival_time: float | None = None):
        self.request_id = request_id
        self.parent_id = parent_id
        self.index = index  # which of the parent's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # already capped by max_model_len and the KV pool
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache (or being written by a launched step)
        # Async scheduling: tokens sampled by launched steps that the host has not seen yet, and the row of the
        # newest one in its step's sampled-token tensor (the next step reads its input token from there).
        self.num_pending = 0
        self.pending_row = -1
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hashes of this request's full blocks, in order
        self.num_registered_blocks = 0  # leading full blocks already entered in the prefix cache
        self.status = Status.WAITING
        self.dp_rank = 0  # which data-parallel rank's scheduler and KV pool hold it
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: str | None = None  # why it failed, when finish_reason is "error"
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        self.generator = None  # per-request torch.Generator when params.seed is set (made by the sampler)
        self.detokenizer = None
        self.grammar = None  # engine/structured.py's GrammarState when params.structured_outputs is set
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the model will have seen once the pending ones arrive: what the scheduler plans with."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
