"""The step message: what the scheduler tells the workers, as plain data (lists, ints, strings).

Nothing in it refers to a live Python object, so the same message drives a runner in this process or one in
another process, on another GPU or another node. A worker keeps its own state from the messages: each request's
block list grows by `new_blocks` and restarts on `reset`; `freed` requests are forgotten.

Columns are per scheduled request, in batch order:
    req_ids[i]       which request
    starts[i]        its first position computed this step (tokens before it are in the KV cache)
    num_tokens[i]    how many positions it computes this step
    token_ids[i]     the input tokens the host knows for those positions: all of them, or all but the last when
                     the last is still pending on the device (async scheduling)
    pending_rows[i]  -1, or the row of the previous step's sampled tokens that holds the pending last input
sample_rows lists the batch rows that produce a logits row (they reached their newest token), in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInput:
    req_ids: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    new_blocks: dict[str, list[int]] = field(default_factory=dict)  # block ids appended since the last message
    reset: list[str] = field(default_factory=list)  # requests whose block list starts anew (new or resumed)
    freed: list[str] = field(default_factory=list)  # requests the workers can forget
    is_dummy: bool = False  # DP: a rank with no work runs a step anyway so that collectives never hang
    # DP: for a request new to its rank (or resumed), what that rank's leader needs to sample it:
    # request id -> (parent id, index, prompt token ids, output token ids so far, SamplingParams)
    sampling: dict[str, tuple] = field(default_factory=dict)
    # DP with experts: every DP rank's forward pads its tokens to the same count inside the experts' collectives.
    dp_graph_batch: int = 0  # all ranks decode only: replay the graph of this batch size (0: run eagerly)
    dp_max_tokens: int = 0  # eager: the most tokens any DP rank runs this step
    # DP under async scheduling: the rank's leader keeps this step's draws on its device (the next step's pending
    # inputs, `pending_rows`) and sends them to rank 0 only once the next message came (a step, or a flush: [])
    sample_async: bool = False

    def __len__(self) -> int:
        return len(self.req_ids)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.num_tokens) and len(self.sample_rows) == len(self.req_ids)


class BlockTables:
    """A worker's view of each request's KV blocks, kept from the step messages. A reset gives the request a
    new list object, so a cached row of a device table knows it must be rewritten."""

    def __init__(self):
        self.blocks: dict[str, list[int]] = {}

    def apply(self, step: StepInput) -> None:
        for rid in step.freed:
            self.blocks.pop(rid, None)
        for rid in step.reset:
            self.blocks[rid] = []
        for rid, new in step.new_blocks.items():
            self.blocks[rid].extend(new)

    def __getitem__(self, req_id: str) -> list[int]:
        return self.blocks[req_id]
