"""Which requests run this step, and how many tokens each (continuous batching with chunked prefill).

Every step has a token budget (max_num_batched_tokens). Running requests go first, in arrival order: a decode
costs one token, an unfinished prefill the next chunk of its prompt. Then waiting requests are admitted while
budget, max_num_seqs and KV blocks last. When blocks run out, the newest running request is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later from its tokens (so its
output continues exactly where it stopped).

With async scheduling a running request may have a pending token (sampled by the step still on the GPU): it is
scheduled as if that token had arrived, unless it is the request's last by max_tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per request this step
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0
        self.freed_ids: list[str] = []  # requests whose blocks went back since the workers last heard

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def load(self) -> tuple[int, int]:
        """How busy this scheduler is, for placing a new request on the least busy DP rank."""
        return len(self.running) + len(self.waiting), self.kv.pool.num_blocks - self.kv.pool.num_free

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: set[str] = frozenset(), max_seqs: int | None = None) -> ScheduledBatch:
        """busy: requests in a pipeline micro-batch still in flight (their next input is not known yet): neither
        scheduled nor preempted. max_seqs: at most this many requests in the batch (a micro-batch's share)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        cap = self.max_num_seqs if max_seqs is None else max_seqs
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0 and len(batch) < cap:
            req = self.running[i]
            if req.request_id in busy:
                i += 1
                continue
            if req.num_pending and len(req.output_token_ids) + req.num_pending >= req.max_tokens:
                i += 1  # its pending token is its last: nothing to compute
                continue
            n = min(req.num_scheduled_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                victim = next(r for r in reversed(self.running) if r.request_id not in busy)  # at worst req
                self.running.remove(victim)
                self._preempt(victim)
                batch.num_preempted += 1
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req itself was the newest and got preempted
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
            i += 1

        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(batch) < cap
               and not preempted):
            req = self.waiting[0]
            computed = self.kv.computed_blocks(req)
            n = req.num_tokens - len(computed) * self.kv.block_size
            if n > budget:
                if not self.chunked_prefill:
                    break
                n = budget
            if not self.kv.allocate(req, n, computed):
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = len(computed) * self.kv.block_size
            req.num_computed_tokens = len(computed) * self.kv.block_size
            req.status = Status.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.freed_ids.append(req.request_id)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished (or aborted) request wherever it is and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        self.freed_ids.append(req.request_id)
        req.status = Status.FINISHED
