"""Runs one scheduled step on the device: flat token batch in, one logits row per sampling request out.

Inputs are built with numpy into buffers allocated once, copied to the device in one go (pinned, async on
CUDA). Decode-only batches on CUDA replay a CUDA graph captured per padded batch size.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import time

import numpy as np
import torch

from moeserve.engine import shared_prefix
from moeserve.engine.piecewise import PiecewiseGraph, StaticBuffers
from moeserve.engine.shared_prefix import SharedPrefixes
from moeserve.engine.step import BlockTables, StepInput
from moeserve.distributed.parallel_state import layout
from moeserve.layers.experts import set_dp_max_tokens
from moeserve.layers.attention import AttentionMetadata, ForwardContext, PagedAttention


class _Staging:
    """One set of pinned host buffers for a step's inputs. The runner keeps two and alternates, so that with
    async scheduling the host fills one while the previous step's copies out of the other may still be queued
    behind the GPU's work; `claim` waits for that set's last copies to have left."""

    def __init__(self, T: int, B: int, max_blocks_per_seq: int, pin: bool):
        self.input_ids = torch.zeros(T, dtype=torch.int64, pin_memory=pin)
        self.prev_rows = torch.zeros(T, dtype=torch.int64, pin_memory=pin)  # row of a pending input token, or -1
        self.positions = torch.zeros(T, dtype=torch.int64, pin_memory=pin)
        self.slots = torch.zeros(T, dtype=torch.int64, pin_memory=pin)
        self.qsl = torch.zeros(B + 1, dtype=torch.int32, pin_memory=pin)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, pin_memory=pin)
        self.tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.logits_idx = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
        # A decode step's shared-prefix groups (engine/shared_prefix.Plan), when it has any.
        self.sp_rows = torch.zeros(B, dtype=torch.int32, pin_memory=pin)
        self.sp_start = torch.zeros(shared_prefix.MAX_GROUPS + 1, dtype=torch.int32, pin_memory=pin)
        self.sp_plen = torch.zeros(shared_prefix.MAX_GROUPS, dtype=torch.int32, pin_memory=pin)
        self.sp_row_prefix = torch.zeros(B, dtype=torch.int32, pin_memory=pin)
        self.row_owner: list[tuple[list | None, int]] = [(None, 0)] * B  # the block list row b was written from
        self.copied = torch.cuda.Event() if pin else None

    def claim(self) -> "_Staging":
        if self.copied is not None:
            self.copied.synchronize()
        return self


def _graph_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, use_cuda_graphs: bool,
                 kv_cache_dtype: str = "auto"):
        self.model = model
        self.device, self.dtype = device, dtype
        # The KV cache's element type: the model's, or float8_e4m3fn for kv_cache_dtype fp8 / fp8_e4m3 (the
        # attention layers quantize on write and dequantize on read by their per-tensor scales).
        self.kv_dtype = torch.float8_e4m3fn if kv_cache_dtype in ("fp8", "fp8_e4m3") else dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches: list[torch.Tensor] | None = None
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []  # their batch sizes, ascending
        self.expert_load = None  # layers/expert_load.ExpertLoad, set by the worker when telemetry is on
        pin = device.type == "cuda"
        T, B = max_num_batched_tokens + max_num_seqs, max_num_seqs
        # Host staging buffers (allocated once), two sets used in turn.
        self.stagings = [_Staging(T, B, self.max_blocks_per_seq, pin) for _ in range(2 if pin else 1)]
        self.num_steps = 0
        self.tables = BlockTables()  # each request's KV blocks, kept from the step messages
        self.data_parallel = layout().dp > 1 and layout().enable_expert_parallel
        # Pipeline parallelism: this stage receives its inputs from the one before and/or hands on to the next.
        self.link = None
        if layout().pp > 1:
            from moeserve.distributed.pipeline import StageLink

            self.link = StageLink(T, model.config.hidden_size, dtype, device)
            self.use_cuda_graphs = False  # not yet: a replay would need the hand-over inside the graph
        # NCCL without graph-mixing support (distributed/launch.nccl_graph_mixing_off): no eager collective while
        # a replay of this rank's is outstanding, so an eager forward after a replay waits for it first.
        self.wait_graph_before_eager = (self.use_cuda_graphs and layout().world_size > 1
                                        and os.environ.get("NCCL_GRAPH_MIXING_SUPPORT") == "0")
        self._replayed = torch.cuda.Event() if self.wait_graph_before_eager else None
        self._replay_outstanding = False
        # Device buffers: the same tensors every step, so CUDA graphs can replay over them.
        self.d_input_ids = torch.zeros(T, dtype=torch.int64, device=device)
        self.d_prev_rows = torch.zeros(T, dtype=torch.int64, device=device)
        self.d_positions = torch.zeros(T, dtype=torch.int64, device=device)
        self.d_slots = torch.zeros(T, dtype=torch.int64, device=device)
        # One sequence row more than max_num_seqs: a mixed-batch graph gives its padding tokens a sequence of their own.
        self.d_qsl = torch.zeros(B + 2, dtype=torch.int32, device=device)
        self.d_seq_lens = torch.zeros(B + 1, dtype=torch.int32, device=device)
        # Wide enough for the padding sequence of a mixed graph too (up to a whole step's tokens long).
        width = max(self.max_blocks_per_seq, -(-max_num_batched_tokens // block_size))
        self.d_tables = torch.zeros(B + 1, width, dtype=torch.int32, device=device)
        self.mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mixed_sizes: list[int] = []  # their padded token counts, ascending
        self.num_mixed_replays = 0
        self.piecewise = False  # mixed graphs cut around a front that cannot be captured (engine/piecewise)
        self.d_logits_idx = torch.zeros(B, dtype=torch.int64, device=device)
        # Decode rows that share a prompt prefix's blocks read it once per group (engine/shared_prefix): paged
        # attention on CUDA, one process per replica (every TP rank plans the same groups from the same tables).
        self.plan_shared = (device.type == "cuda" and not self.data_parallel and self.link is None
                            and any(isinstance(m, PagedAttention) for m in model.modules()))
        self.step_shared = False  # this step's decode rows have groups
        self.shared_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_shared_steps = 0
        G = shared_prefix.MAX_GROUPS
        self.d_shared = SharedPrefixes(
            rows=torch.zeros(B + 1, dtype=torch.int32, device=device),
            start=torch.zeros(G + 1, dtype=torch.int32, device=device),
            plen=torch.zeros(G, dtype=torch.int32, device=device),
            row_prefix=torch.zeros(B + 1, dtype=torch.int32, device=device))
        # Positions of a mixed graph's padding tokens (any valid position: they only rotate themselves).
        self._pad_positions = torch.arange(T, dtype=torch.int64, device=device) % max_model_len

    # -- KV cache --
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.model.kv_cache_shape(num_blocks, self.block_size)

    def kv_bytes_per_block(self) -> int:
        shape = self.kv_cache_shape(1)
        return int(np.prod(shape)) * self.model.num_kv_layers() * self.kv_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self.kv_cache_shape(num_blocks)
        # CUDA: zeros, not empty: padded rows of a CUDA graph may read blocks nothing wrote, and must not read
        # NaNs. The CPU path reads only what it wrote, and untouched pages cost nothing there.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        # Indexed by the global layer: a pipeline stage holds only its own layers, from kv_layer_start on.
        self.kv_caches = [None] * getattr(self.model, "kv_layer_start", 0) + [
            alloc(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.model.num_kv_layers())]

    # -- one step --
    @torch.inference_mode()
    def execute(self, step: StepInput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step; returns the logits [S, V] of the step's sample_rows, in order (None on a pipeline stage
        before the last, which hands its hidden states on instead).
        prev_tokens: the tokens the step before sampled, still on the device (async scheduling), where the
        requests' pending input tokens are (`step.pending_rows`)."""
        self.tables.apply(step)
        if step.is_dummy:
            B, T = self._prepare_dummy()
        else:
            B, T = self._prepare(step, prev_tokens)
        decode_only = T == B
        if self.expert_load is not None:  # real rows: a graph's padding rows and dummy steps route nothing
            self.expert_load.set_valid_tokens(0 if step.is_dummy else T)
        if decode_only and self.use_cuda_graphs and self.graphs and (not self.data_parallel or step.dp_graph_batch):
            hidden = self._replay(B, step.dp_graph_batch)
        elif self.mixed_sizes and T <= self.mixed_sizes[-1] and not step.is_dummy:
            hidden = self._replay_mixed(B, T)
        else:
            if self.data_parallel:  # the experts pad every DP rank's tokens to this many: no count all-gather
                set_dp_max_tokens(step.dp_max_tokens or None)
            hidden = self._run_eager(B, T)
        if hidden is None:
            return None
        S = len(step.sample_rows)
        if S == 0:
            return torch.empty(0, device=self.device)
        return self.model.compute_logits(hidden[self.d_logits_idx[:S]])

    def _prepare(self, step: StepInput, prev_tokens: torch.Tensor | None = None) -> tuple[int, int]:
        h = self.stagings[self.num_steps % len(self.stagings)].claim()
        self.num_steps += 1
        self.step_shared = False
        if step.decode_only:
            return self._prepare_decode(step, h, prev_tokens)
        bs = self.block_size
        ids, pos, slots, prev = h.input_ids.numpy(), h.positions.numpy(), h.slots.numpy(), h.prev_rows.numpy()
        qsl, seq_lens = h.qsl.numpy(), h.seq_lens.numpy()
        t = 0
        ends = []
        any_pending = False
        qsl[0] = 0
        for b, (rid, start, n, known_ids, pending) in enumerate(zip(
                step.req_ids, step.starts, step.num_tokens, step.token_ids, step.pending_rows)):
            end = start + n
            ids[t:t + len(known_ids)] = known_ids
            prev[t:t + n] = -1
            if pending >= 0:  # a pending token can only be the last one
                prev[t + n - 1] = pending
                any_pending = True
            p = np.arange(start, end)
            pos[t:t + n] = p
            blocks = self.tables[rid]
            slots[t:t + n] = np.asarray(blocks, dtype=np.int64)[p // bs] * bs + p % bs
            self._table_row(h, b, blocks)
            seq_lens[b] = end
            t += n
            qsl[b + 1] = t
            ends.append(t - 1)
        h.logits_idx.numpy()[:len(step.sample_rows)] = [ends[b] for b in step.sample_rows]
        B = len(step)
        self._upload(h, B, t, len(step.sample_rows), prev_tokens if any_pending else None)
        self.meta_cpu = (qsl[: B + 1].copy(), seq_lens[:B].copy())
        return B, t

    def _prepare_decode(self, step: StepInput, h: _Staging, prev_tokens: torch.Tensor | None) -> tuple[int, int]:
        """Every request feeds its newest token and samples (a decode step): whole-array numpy."""
        B, bs = len(step), self.block_size
        p = np.asarray(step.starts, dtype=np.int64)
        prev = np.asarray(step.pending_rows, dtype=np.int64)
        any_pending = bool((prev >= 0).any())
        h.input_ids.numpy()[:B] = [t[0] if t else 0 for t in step.token_ids]
        h.prev_rows.numpy()[:B] = prev
        h.positions.numpy()[:B] = p
        tables = [self.tables[rid] for rid in step.req_ids]
        page = np.fromiter((blocks[k] for blocks, k in zip(tables, (p // bs).tolist())), dtype=np.int64, count=B)
        h.slots.numpy()[:B] = page * bs + p % bs
        for b, blocks in enumerate(tables):
            self._table_row(h, b, blocks)
        seq_lens = h.seq_lens.numpy()
        seq_lens[:B] = p + 1
        qsl = h.qsl.numpy()
        qsl[: B + 1] = np.arange(B + 1)
        h.logits_idx.numpy()[:B] = np.arange(B)
        if self.plan_shared:
            self._plan_shared(h, B, p)
        self._upload(h, B, B, B, prev_tokens if any_pending else None)
        self.meta_cpu = (qsl[: B + 1].copy(), seq_lens[:B].copy())
        return B, B

    def _plan_shared(self, h: _Staging, B: int, positions: np.ndarray) -> None:
        """Group the decode rows by a shared prefix of blocks (engine/shared_prefix) and stage the groups' device
        copy; rows past B (a graph's padding) stay in no group."""
        plan = shared_prefix.plan(h.tables.numpy()[:B], positions, self.block_size)
        if plan is None:
            return
        self.step_shared = True
        self.num_shared_steps += 1
        n = len(plan.rows)
        h.sp_rows.numpy()[:n] = plan.rows
        h.sp_start.numpy()[:] = plan.start
        h.sp_plen.numpy()[:] = plan.plen
        h.sp_row_prefix.numpy()[:B] = plan.row_prefix
        d = self.d_shared  # before _upload records the staging set's copies as done
        d.rows[:n].copy_(h.sp_rows[:n], non_blocking=True)
        d.start.copy_(h.sp_start, non_blocking=True)
        d.plen.copy_(h.sp_plen, non_blocking=True)
        d.row_prefix[:B].copy_(h.sp_row_prefix[:B], non_blocking=True)

    def _prepare_dummy(self) -> tuple[int, int]:
        """One token at position 0 that writes nothing and reads one slot: a DP rank with no requests still runs
        the forward pass, so that the collectives of the others' experts complete."""
        h = self.stagings[self.num_steps % len(self.stagings)].claim()
        self.num_steps += 1
        self.step_shared = False
        h.input_ids.numpy()[0] = 0
        h.positions.numpy()[0] = 0
        h.slots.numpy()[0] = -1
        h.qsl.numpy()[:2] = (0, 1)
        h.seq_lens.numpy()[0] = 1
        h.tables.numpy()[0, :1] = 0
        h.row_owner[0] = (None, 0)
        self._upload(h, 1, 1, 0, None)
        self.meta_cpu = (h.qsl.numpy()[:2].copy(), h.seq_lens.numpy()[:1].copy())
        return 1, 1

    @staticmethod
    def _table_row(h: _Staging, b: int, blocks: list[int]) -> None:
        """Write row b of the host block table: only the entries added since the row was last written from this
        same block list. A running request's list only grows; a reset gives the request a new list object, so a
        preempted and resumed request, like any other new owner, rewrites the row."""
        owner, known = h.row_owner[b]
        if owner is not blocks:
            known = 0
        if known < len(blocks):
            h.tables.numpy()[b, known: len(blocks)] = blocks[known:]
            h.row_owner[b] = (blocks, len(blocks))

    def _upload(self, h: _Staging, B: int, T: int, S: int, prev_tokens: torch.Tensor | None) -> None:
        nb = self.device.type == "cuda"
        self.d_input_ids[:T].copy_(h.input_ids[:T], non_blocking=nb)
        self.d_positions[:T].copy_(h.positions[:T], non_blocking=nb)
        self.d_slots[:T].copy_(h.slots[:T], non_blocking=nb)
        self.d_qsl[: B + 1].copy_(h.qsl[: B + 1], non_blocking=nb)
        self.d_seq_lens[:B].copy_(h.seq_lens[:B], non_blocking=nb)
        self.d_tables[:B, : self.max_blocks_per_seq].copy_(h.tables[:B], non_blocking=nb)
        self.d_logits_idx[:S].copy_(h.logits_idx[:S], non_blocking=nb)
        if prev_tokens is not None:  # input tokens the last step sampled and the host has not seen yet
            rows = self.d_prev_rows[:T]
            rows.copy_(h.prev_rows[:T], non_blocking=nb)
            ids = self.d_input_ids[:T]
            ids.copy_(torch.where(rows >= 0, prev_tokens[rows.clamp(min=0)], ids))
        if h.copied is not None:
            h.copied.record()

    def _metadata(self, B: int, T: int, max_query_len: int, max_seq_len: int) -> AttentionMetadata:
        qsl, seq_lens = self.meta_cpu
        return AttentionMetadata(
            slot_mapping=self.d_slots[:T], query_start_loc=self.d_qsl[: B + 1], seq_lens=self.d_seq_lens[:B],
            block_tables=self.d_tables[:B], max_query_len=max_query_len, max_seq_len=max_seq_len,
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, shared=self._shared(B) if self.step_shared else None,
        )

    def _shared(self, B: int) -> SharedPrefixes:
        d = self.d_shared
        return SharedPrefixes(rows=d.rows[:B], start=d.start, plen=d.plen, row_prefix=d.row_prefix[:B])

    def _mark_replayed(self) -> None:
        if self._replayed is not None:
            self._replayed.record()
            self._replay_outstanding = True

    def _run_eager(self, B: int, T: int) -> torch.Tensor:
        if self._replay_outstanding:
            self._replayed.synchronize()
            self._replay_outstanding = False
        qsl, seq_lens = self.meta_cpu
        meta = self._metadata(B, T, int(np.diff(qsl).max()), int(seq_lens.max()))
        return self._forward(T, ForwardContext(meta, self.kv_caches))

    def _forward(self, T: int, ctx: ForwardContext, handover: bool = True) -> torch.Tensor | None:
        """The model over the first T tokens of the input buffers. On a pipeline stage: take the hand-over from
        the stage before (zeros when `handover` is off, for profiling), and give a stage before the last's
        result to the next stage (returning None)."""
        ids, pos = self.d_input_ids[:T], self.d_positions[:T]
        if self.link is None:
            return self.model(ids, pos, ctx)
        inputs = None
        if not self.link.is_first:
            inputs = self.link.recv(T) if handover else self.link.zeros(T)
        out = self.model(ids, pos, ctx, inputs)
        if self.link.is_last:
            return out
        if handover:
            self.link.send(*out)
        return None

    # -- kernel warm-up (CUDA) --
    @torch.inference_mode()
    def warm_up_prefill(self) -> float:
        """One eager forward per power-of-two token count up to max_num_batched_tokens, so that every prefill
        shape bucket is autotuned and compiled at startup rather than inside a user's first request."""
        if self.device.type != "cuda" or self.kv_caches is None:
            return 0.0
        t0 = time.perf_counter()
        limit = min(self.max_tokens, self.max_num_seqs * self.max_model_len)  # the largest step possible
        T = 1 if self.data_parallel else 2  # DP: an idle rank's dummy step is one eager token
        while True:
            T = min(T, limit)
            B = -(-T // self.max_model_len)  # sequences of at most max_model_len tokens
            self._prefill_inputs(B, T)
            self._run_eager(B, T)
            if T >= limit:
                break
            T *= 2
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _prefill_inputs(self, B: int, T: int, vocab: int = 100) -> None:
        """Inputs of B fresh prompts, T tokens in all (lengths as even as they split), that write no KV and read
        only page 0 (which must exist: a KV cache of at least one block is attached)."""
        lens = np.full(B, T // B, dtype=np.int32)
        lens[: T - int(lens.sum())] += 1
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        self.meta_cpu = (qsl, lens)
        self.d_qsl[: B + 1].copy_(torch.from_numpy(qsl))
        self.d_seq_lens[:B].copy_(torch.from_numpy(lens))
        self.d_tables[:B].zero_()  # every page is page 0: read, never written
        self.d_slots[:T].fill_(-1)
        self.d_input_ids[:T].random_(0, vocab)
        self.d_positions[:T].copy_(torch.from_numpy(np.concatenate([np.arange(n) for n in lens])))

    @torch.inference_mode()
    def time_prefill(self, T: int, seq_len: int, vocab: int, reps: int = 3) -> tuple[float, int]:
        """(median seconds of one eager forward over T prompt tokens in prompts of about seq_len tokens, peak bytes
        allocated by the timed ones). One untimed forward first, which compiles and autotunes this shape's kernels.
        Token ids span the vocabulary (vocab), so the router spreads them over the experts as real text does. Needs
        a KV cache of at least one block attached (engine/worker.py measures with a one-block cache)."""
        B = min(self.max_num_seqs, -(-T // max(1, seq_len)))
        self._prefill_inputs(B, T, vocab=vocab)
        self._run_eager(B, T)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)  # after the first: tuning's own buffers do not count
        seconds = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._run_eager(B, T)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        return float(np.median(seconds)), int(torch.cuda.max_memory_allocated(self.device))

    # -- CUDA graphs for decode --
    def capture_cuda_graphs(self) -> float:
        """Capture one graph per padded decode batch size, and where the model allows one per padded token count
        of mixed batches (capture_mixed_graphs); returns the seconds it took."""
        if not self.use_cuda_graphs:
            return 0.0
        t0 = time.perf_counter()
        pool = None
        for B in sorted(_graph_sizes(self.max_num_seqs), reverse=True):
            self.d_qsl[: B + 1].copy_(torch.arange(B + 1, dtype=torch.int32))
            self.d_seq_lens[:B].fill_(1)
            self.d_slots[:B].fill_(-1)
            meta = AttentionMetadata(
                slot_mapping=self.d_slots[:B], query_start_loc=self.d_qsl[: B + 1], seq_lens=self.d_seq_lens[:B],
                block_tables=self.d_tables[:B], max_query_len=1, max_seq_len=self.max_model_len,
            )
            ctx = ForwardContext(meta, self.kv_caches)
            if self.data_parallel:  # every DP rank replays the same size, so the experts' padding is B
                set_dp_max_tokens(B)
            graph, out, pool = self._capture(B, ctx, pool)
            self.graphs[B] = (graph, out)
            if self.plan_shared and B >= shared_prefix.MIN_ROWS:  # the same step with shared-prefix groups
                self.d_shared.start.zero_()  # captured with no groups: the replays read the step's own
                self.d_shared.row_prefix[:B].zero_()
                meta = dataclasses.replace(meta, shared=self._shared(B))
                graph, out, pool = self._capture(B, ForwardContext(meta, self.kv_caches), pool)
                self.shared_graphs[B] = (graph, out)
        set_dp_max_tokens(None)
        self.graph_sizes = sorted(self.graphs)
        if self._mixed_graphs_possible():
            self.capture_mixed_graphs(pool)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-ups' blocks: the graphs keep their own pool
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _capture(self, T: int, ctx: ForwardContext, pool):
        """(graph, its output, the pool) of the model over the first T input tokens: run once eagerly first
        (kernels autotune and compile, lazy tables get built), then captured into the shared memory pool."""
        self.model(self.d_input_ids[:T], self.d_positions[:T], ctx)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(self.d_input_ids[:T], self.d_positions[:T], ctx)
        return graph, out, graph.pool()

    # -- CUDA graphs for mixed batches (prefill chunks beside decodes) --
    # Steps of more tokens run eagerly: their kernels outlast the launches (an 8192-token step still did not), and
    # a budget of a whole context (no chunked prefill) would otherwise capture graphs of 100k+ tokens at start-up.
    MAX_MIXED_GRAPH_TOKENS = 16384

    def _mixed_graph_sizes(self) -> list[int]:
        """Padded token counts of the mixed-batch graphs, up to the step's token budget (at most
        MAX_MIXED_GRAPH_TOKENS): each at most ~25% (mostly ~1/8) above the one below, so a step pads by that much."""
        top = min(self.max_tokens, self.MAX_MIXED_GRAPH_TOKENS)
        sizes = [64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144,
                 7168, 8192, 10240, 12288, 14336]
        return [s for s in sizes if s < top] + [top]

    def _mixed_graphs_possible(self) -> bool:
        """Whether mixed batches can replay graphs in this layout: one process of it (no DP padding, no pipeline
        hand-over). Fronts that read lengths on the host (graph_safe_mixed False: MLA) make them piecewise."""
        fronts = [m for m in self.model.modules() if hasattr(m, "graph_safe_mixed")]
        return self.use_cuda_graphs and bool(fronts) and not self.data_parallel and self.link is None

    @torch.inference_mode()
    def capture_mixed_graphs(self, pool=None) -> None:
        """One graph per padded token count, every one over max_num_seqs + 1 sequence rows (the last real rows, then
        the padding's own sequence, then empty ones). The kernels read lengths and block tables on the device, so a
        replay serves any mix of prefill chunks and decodes that fits. With a front that cannot be captured, each
        is a PiecewiseGraph whose cuts run that front eagerly over the step's real rows (capturing: the padding's
        sequence alone)."""
        B_pad = self.max_num_seqs + 1
        self.d_qsl[:1].zero_()
        buffers = StaticBuffers()
        self.piecewise = not all(m.graph_safe_mixed for m in self.model.modules() if hasattr(m, "graph_safe_mixed"))
        for T in sorted(self._mixed_graph_sizes(), reverse=True):
            self._pad_mixed(0, 0, T)
            meta = AttentionMetadata(
                slot_mapping=self.d_slots[:T], query_start_loc=self.d_qsl[: B_pad + 1], seq_lens=self.d_seq_lens[:B_pad],
                block_tables=self.d_tables[:B_pad], max_query_len=T, max_seq_len=self.max_model_len)
            ctx = ForwardContext(meta, self.kv_caches)
            if self.piecewise:
                one = np.array([0, T], dtype=np.int32)
                cut_meta = AttentionMetadata(
                    slot_mapping=self.d_slots[:T], query_start_loc=self.d_qsl[:2], seq_lens=self.d_seq_lens[:1],
                    block_tables=self.d_tables[:1], max_query_len=T, max_seq_len=T,
                    query_start_loc_cpu=one, seq_lens_cpu=one[1:].copy())
                ctx.cuts = PiecewiseGraph(buffers, ForwardContext(cut_meta, self.kv_caches), pool)
                self.model(self.d_input_ids[:T], self.d_positions[:T], ctx)  # eager first: buffers, compiles
                out = ctx.cuts.capture(lambda: self.model(self.d_input_ids[:T], self.d_positions[:T], ctx))
                graph, pool = ctx.cuts, ctx.cuts.pool
            else:
                graph, out, pool = self._capture(T, ctx, pool)
            self.mixed_graphs[T] = (graph, out)
        self.mixed_sizes = sorted(self.mixed_graphs)

    def _pad_mixed(self, B: int, T: int, T_pad: int) -> None:
        """Rows past the step's B sequences and T tokens: tokens T..T_pad-1 form sequence B, a causal prompt of
        their own at positions 0.. that writes nothing and reads page 0; later sequences are empty."""
        n = T_pad - T
        B_pad = self.max_num_seqs + 1
        self.d_slots[T:T_pad].fill_(-1)
        self.d_positions[T:T_pad].copy_(self._pad_positions[:n])
        self.d_input_ids[T:T_pad].zero_()
        self.d_seq_lens[B].fill_(n)
        self.d_seq_lens[B + 1: B_pad].zero_()
        self.d_tables[B].zero_()
        self.d_qsl[B + 1: B_pad + 1].fill_(T_pad)

    def _replay_mixed(self, B: int, T: int) -> torch.Tensor:
        T_pad = self.mixed_sizes[bisect.bisect_left(self.mixed_sizes, T)]
        self._pad_mixed(B, T, T_pad)
        graph, out = self.mixed_graphs[T_pad]
        if self.piecewise:  # the cuts attend over the step's own sequences, planned from its host lengths
            qsl, seq_lens = self.meta_cpu
            meta = self._metadata(B, T, int(np.diff(qsl).max()), int(seq_lens.max()))
            graph.replay(ForwardContext(meta, self.kv_caches), T)
        else:
            graph.replay()
        self._mark_replayed()
        self.num_mixed_replays += 1
        return out[:T]

    def _replay(self, B: int, at_least: int = 0) -> torch.Tensor:
        """at_least: DP ranks all replay the graph of the largest batch among them (a collective's shape)."""
        padded = self.graph_sizes[bisect.bisect_left(self.graph_sizes, max(B, at_least))]
        shared = self.step_shared and padded in self.shared_graphs
        if padded > B:  # padding rows: one query each, nothing written, a 1-token context
            self.d_slots[B:padded].fill_(-1)
            self.d_seq_lens[B:padded].fill_(1)
            self.d_qsl[B + 1: padded + 1].copy_(
                torch.arange(B + 1, padded + 1, dtype=torch.int32, device=self.device))
            if shared:
                self.d_shared.row_prefix[B:padded].zero_()  # in no group
        graph, out = (self.shared_graphs if shared else self.graphs)[padded]
        graph.replay()
        self._mark_replayed()
        return out[:B]

    # -- memory profiling (CUDA) --
    @torch.inference_mode()
    def profile_peak_bytes(self) -> int:
        """Peak device memory of the largest step the scheduler can produce, with no KV cache attached."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        T = self.max_tokens
        B = min(self.max_num_seqs, T)
        per = T // B
        lens = np.full(B, per)
        lens[-1] += T - per * B
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        self.meta_cpu = (qsl, lens.astype(np.int32))
        meta = AttentionMetadata(
            slot_mapping=self.d_slots[:T], query_start_loc=self.d_qsl[: B + 1], seq_lens=self.d_seq_lens[:B],
            block_tables=self.d_tables[:B], max_query_len=int(lens.max()), max_seq_len=int(lens.max()),
            query_start_loc_cpu=qsl, seq_lens_cpu=lens,
        )
        self.d_input_ids[:T].random_(0, 100)
        self.d_positions[:T].copy_(torch.from_numpy(np.concatenate([np.arange(n) for n in lens])))
        hidden = self._forward(T, ForwardContext(meta, None), handover=False)
        if hidden is not None:
            self.model.compute_logits(hidden[: self.max_num_seqs])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
