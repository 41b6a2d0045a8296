"""LLMEngine: requests in, a step at a time, outputs back. Synchronous; the server drives it from one thread.

    add_request -> Scheduler.schedule -> ModelRunner.execute -> Sampler -> detokenize/stop -> RequestOutput

With async scheduling (the CUDA default) a step launches the next batch before it reads the tokens of the one
still running: each request's newest token goes from the sampler to the next step's input on the device, and
the host's bookkeeping (tokens, stop checks, outputs) for step n overlaps the GPU's work on step n+1. A request
that stopped at step n had one more token computed at n+1, which is thrown away. Requests whose sampling reads
their own newest tokens (penalties, min_tokens) make the engine wait for each step instead. With data
parallelism the same holds per DP rank: each rank's leader keeps its draws on its device for the next step and
sends them here once the next step's message came (or a flush, when nothing follows).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from moeserve.config import EngineConfig
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.errors import RequestRejected
from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.request import Request
from moeserve.engine.executor import InProcessExecutor, MultiprocExecutor
from moeserve.engine import host_memory
from moeserve.engine.worker import DoesNotFit, Worker, check_fits_before_loading  # noqa: F401 (re-exported)
from moeserve.engine.sampler import PendingSample, Sampler
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.step import StepInput
from moeserve.loader.model_loader import ModelSource, resolve_device, resolve_dtype, resolve_source
from moeserve.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("moeserve")



@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int


@dataclass
class _Launched:
    """A step on its way: the requests that sample in it, in row order, and their draws."""
    sampled: list[Request]
    draws: PendingSample | None


@dataclass
class _DataParallelLaunched:
    """A DP step on its way: per DP rank, the requests that sample in it (in its sample_rows order); DP rank 0's
    draws (the others' come from their leaders); and the step messages."""
    sampled: list[list[Request]]
    draws: PendingSample | None
    steps: list[StepInput]


def _is_device_fault(e: Exception) -> bool:
    """A CUDA error or an out-of-memory: the step itself is broken, not one request."""
    return isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e) or "cuda" in type(e).__module__


def make_executor(config: EngineConfig, device: torch.device, dtype: torch.dtype, source: ModelSource):
    """One rank in this process, or rank 0 of several (the others spawned here, or already started by torchrun)."""
    if config.world_size == 1:
        return InProcessExecutor(Worker(config, device, dtype, source))
    from moeserve.distributed.launch import RankInfo, from_torchrun_env, rank_device

    info = from_torchrun_env()
    spawn = info is None
    if info is None:
        info = RankInfo(rank=0, world_size=config.world_size, local_rank=0, nnodes=config.nnodes,
                        node_rank=config.node_rank, master_addr=config.master_addr, master_port=config.master_port)
    if info.world_size != config.world_size:
        raise ValueError(f"The launcher started {info.world_size} ranks, but tp x pp x dp = {config.world_size}.")
    if info.rank != 0:
        raise ValueError("Only rank 0 runs the engine; the other ranks run distributed.worker_main.")
    return MultiprocExecutor(config, info, rank_device(device.type, info.local_rank), dtype, source, spawn=spawn)


def _mark_scheduled(batch) -> None:
    """A batch's requests scheduled for the first time get that time (their queueing ends here)."""
    now = time.time()
    for req in batch.requests:
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = now


def _mark_computed(batch, kv: KVCacheManager) -> None:
    """After a launch: the batch's tokens count as computed (their K/V is being written), full blocks are entered
    in the prefix cache."""
    for req, n in zip(batch.requests, batch.num_tokens):
        req.num_computed_tokens += n
        kv.register_full_blocks(req)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype_name, self.device)
        torch.manual_seed(config.seed)

        source = resolve_source(config)
        self.executor = make_executor(config, self.device, self.dtype, source)
        if self.device.type == "cpu":
            host_memory.trim()
        worker = self.executor.worker
        self.device = worker.device
        loaded = worker.loaded
        self.model, self.hf_config, self.tokenizer = loaded.model, loaded.hf_config, loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.model_name = config.served_model_name or loaded.source.name
        self.max_model_len = worker.max_model_len
        self.max_num_batched_tokens = worker.max_num_batched_tokens
        self.batched_tokens_source = worker.batched_tokens_source  # flag, default, measured or cache
        self.weights_bytes = worker.weights_bytes
        self.runner = worker.runner
        self.timings = worker.timings
        self.profile_peak_bytes = worker.profile_peak_bytes
        num_blocks = self.executor.num_blocks
        # One scheduler and KV pool per data-parallel rank (DP attention): each DP rank holds its own requests'
        # KV, and all of them step together. self.scheduler / self.kv are DP rank 0's.
        self.kvs = [KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
                    for _ in range(config.data_parallel_size)]
        self.schedulers = [Scheduler(kv, config.max_num_seqs, self.max_num_batched_tokens,
                                     config.enable_chunked_prefill) for kv in self.kvs]
        self.kv, self.scheduler = self.kvs[0], self.schedulers[0]
        self.sampler = Sampler(self.hf_config.vocab_size, self.device, config.seed)
        self.grammars = None  # engine/structured.py's Grammars, made when a request first asks for one

        # Pipeline parallelism: the last stage samples, from a mirror of the requests like a DP leader's.
        self.pipeline = config.pipeline_parallel_size > 1
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda") and not self.pipeline
        self.inflight: _Launched | _DataParallelLaunched | None = None
        # PP: micro-batches in flight through the stages (oldest first), as many as there are stages, each of
        # requests no other one holds (per DP rank: its requests and its step); their ids, which wait for their
        # tokens before they are scheduled again.
        self.pp_inflight: deque[tuple[list[list[Request]], list[StepInput]]] = deque()
        self.pp_busy: set[str] = set()
        self.sync_requests: set[str] = set()  # alive requests whose sampling reads their newest tokens
        self.requests: dict[str, Request] = {}
        self.parents: dict[str, list[Request]] = {}
        self.parent_prompt: dict[str, str | None] = {}
        self.failed_parents: dict[str, None] = {}
        self.sent_blocks: dict[str, int] = {}  # request -> how many of its blocks the workers know  # parents with a child failed since the last step's report
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info("moeserve engine: model=%s device=%s dtype=%s load=%.1fs profile=%.1fs graphs=%.1fs "
                    "KV blocks=%d (%d tokens, %.2f GiB)", self.model_name, self.device, self.dtype,
                    self.timings["load_s"], self.timings.get("profile_s", 0.0), self.timings["cuda_graphs_s"],
                    num_blocks, num_blocks * config.block_size, num_blocks * self.runner.kv_bytes_per_block() / 2**30)

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    def memory_report(self) -> dict:
        per_block = self.runner.kv_bytes_per_block()
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        return {
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": per_block // self.config.block_size,
            "num_blocks": self.kv.num_blocks,
            "block_size": self.config.block_size,
            "kv_capacity_tokens": self.kv.capacity_tokens,
            "kv_cache_bytes": per_block * self.kv.num_blocks,
            "profile_peak_bytes": self.profile_peak_bytes,
            "device_memory_bytes": total,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_batched_tokens_source": self.batched_tokens_source,
            "timings": dict(self.timings),
        }

    def config_info(self) -> dict[str, dict[str, str]]:
        """The facts /metrics publishes as info gauges (vLLM's cache_config_info idea), so that a checker can hold
        the running server against the planner: the KV pool of one rank, the layout, the step's token budget."""
        mem, c = self.memory_report(), self.config
        lay = c.parallel_layout()
        cache = {"block_size": mem["block_size"], "num_gpu_blocks": mem["num_blocks"],
                 "kv_capacity_tokens": mem["kv_capacity_tokens"], "kv_cache_bytes": mem["kv_cache_bytes"],
                 "kv_bytes_per_token": mem["kv_bytes_per_token"], "weights_bytes": mem["weights_bytes"],
                 "max_model_len": self.max_model_len, "max_num_seqs": c.max_num_seqs,
                 "gpu_memory_utilization": c.gpu_memory_utilization, "device": self.device.type,
                 "kv_cache_dtype": c.kv_cache_dtype, "quantization": c.quantization or "none"}
        parallel = {"tensor_parallel_size": lay.tp, "pipeline_parallel_size": lay.pp, "data_parallel_size": lay.dp,
                    "expert_parallel_size": lay.ep}
        # the step's token budget as the scheduler uses it, and where it came from (engine/token_budget.py)
        scheduler = {"max_num_batched_tokens": self.max_num_batched_tokens,
                     "max_num_batched_tokens_source": self.batched_tokens_source, "max_num_seqs": c.max_num_seqs,
                     "enable_chunked_prefill": c.enable_chunked_prefill}
        return {"cache_config_info": {k: str(v) for k, v in cache.items()},
                "parallel_config_info": {k: str(v) for k, v in parallel.items()},
                "scheduler_config_info": {k: str(v) for k, v in scheduler.items()}}

    # -- requests --
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("This model has no tokenizer (dummy weights without tokenizer files): "
                                 "pass prompt_token_ids instead of text.")
            text = prompt
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            vocab = self.hf_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}).")
        if not prompt_ids:
            raise ValueError("The prompt is empty.")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise RequestRejected(f"The prompt has {n_prompt} tokens, but max_model_len is {self.max_model_len} "
                                  f"(prompt plus at least one generated token must fit).",
                                  code="context_length_exceeded")
        # A request must fit the whole KV pool alone, or it could never finish: refuse it now rather than cut it
        # short later. Without max_tokens it may generate until the pool (or max_model_len) is full.
        need = n_prompt + (params.max_tokens or 1)
        if need > self.kv.capacity_tokens:
            raise RequestRejected(f"The request needs {need} tokens of KV cache ({n_prompt} in the prompt, "
                                  f"{params.max_tokens or 1} to generate), but the whole pool holds "
                                  f"{self.kv.capacity_tokens}.", code="kv_cache_exceeded")
        limit = min(self.max_model_len, self.kv.capacity_tokens) - n_prompt
        max_tokens = min(params.max_tokens or limit, limit)
        grammars = self._grammars(params)  # compiles (or finds cached) before anything is allocated
        children = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, request_id, i, prompt_ids, params, max_tokens, arrival_time)
            if self.tokenizer is not None and params.detokenize:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                                         params.stop, params.include_stop_str_in_output)
            if grammars is not None:
                req.grammar = grammars.state(params.structured_outputs)
            children.append(req)
        dp_rank = min(range(len(self.schedulers)), key=lambda d: self.schedulers[d].load())  # the least loaded
        for req in children:
            req.dp_rank = dp_rank
            self.requests[req.request_id] = req
            if params.reads_own_tokens:
                self.sync_requests.add(req.request_id)
            self.schedulers[dp_rank].add(req)
        self.parents[request_id] = children
        self.parent_prompt[request_id] = text

    def _grammars(self, params: SamplingParams):
        """The grammar compiler (made at the first request with structured outputs), or None without one."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("Structured outputs need the model's tokenizer (this model has none).")
        if self.grammars is None:
            from moeserve.engine.structured import Grammars
            self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        return self.grammars

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            for req in self.parents.pop(rid, []):
                if not req.finished:
                    self.schedulers[req.dp_rank].finish(req)
                    req.finish_reason = "abort"
                self.requests.pop(req.request_id, None)
                self.sync_requests.discard(req.request_id)
            self.parent_prompt.pop(rid, None)

    def shutdown(self) -> None:
        """Stop the other ranks' processes (nothing to do on one rank), once the micro-batches still in the
        pipeline are back."""
        try:
            while self.pp_inflight:
                self._collect_micro_batch({})
        finally:
            self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return any(s.has_work() for s in self.schedulers) or self.inflight is not None or bool(self.pp_inflight)

    def expert_load(self):
        """The expert-load table over the sliding window (layers/expert_load.py), or None when telemetry is off
        or the model has no router. Copies the counts to the host: call between steps, when asked."""
        load = self.executor.worker.expert_load
        return None if load is None else load.snapshot()

    def get_stats(self) -> EngineStats:
        scheds, kvs = self.schedulers, self.kvs
        free, total = sum(kv.pool.num_free for kv in kvs), sum(kv.num_blocks for kv in kvs)
        return EngineStats(
            num_running=sum(len(s.running) for s in scheds), num_waiting=sum(len(s.waiting) for s in scheds),
            kv_cache_usage=1.0 - free / total, num_preemptions_total=sum(s.num_preemptions_total for s in scheds),
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            num_free_blocks=free, num_total_blocks=total,
            prefix_cache_queries=sum(kv.prefix_queries for kv in kvs), prefix_cache_hits=sum(kv.prefix_hits for kv in kvs),
        )

    # -- one step --
    def step(self) -> list[RequestOutput]:
        """One step. Raises only for a fault of the whole step (the device, the model): the engine is then in no
        state to go on. A failure of one request's own sampling or output ends that request alone."""
        touched = self.failed_parents  # parents with news, in order (failed ones first)
        self.failed_parents = {}
        if self.pipeline:
            self._step_pipeline(touched)
        elif len(self.schedulers) > 1:
            self._step_data_parallel(touched)
        else:
            self._step_one(touched)
        touched.update(self.failed_parents)
        self.failed_parents = {}
        return [self._output(pid) for pid in touched if pid in self.parents and self._reports(pid)]

    def _step_one(self, touched: dict[str, None]) -> None:
        if self.inflight is not None and self.sync_requests:
            self._process(self.inflight, touched)
            self.inflight = None
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.requests else None
        if self.inflight is not None:  # the host's share of the last step, while the GPU runs this one
            self._process(self.inflight, touched)
        self.inflight = launched
        if launched is not None and (not self.async_scheduling or self.sync_requests):
            self._process(launched, touched)
            self.inflight = None

    def _step_data_parallel(self, touched: dict[str, None]) -> None:
        """DP attention: every DP rank runs this step (a dummy one when it has nothing, so the experts'
        collectives line up), each rank's leader samples its own rows, and their tokens come back here. With async
        scheduling, as in _step_one: the step is launched before the one still running is collected."""
        asynchronous = self.async_scheduling and not self.sync_requests
        if self.inflight is not None and not asynchronous:  # a waiting step next: the leaders' draws first
            self.executor.flush_samples()
            self._collect_data_parallel(self.inflight, touched)
            self.inflight = None
        batches = [s.schedule() for s in self.schedulers]
        launched = self._launch_data_parallel(batches, asynchronous) if any(b.requests for b in batches) else None
        if self.inflight is not None:  # the host's share of the last step, while the GPU runs this one
            if launched is None:  # no message follows it: ask the leaders for their draws
                self.executor.flush_samples()
            self._collect_data_parallel(self.inflight, touched)
        self.inflight = launched
        if launched is not None and not asynchronous:
            self._collect_data_parallel(launched, touched)
            self.inflight = None

    def _launch_data_parallel(self, batches, asynchronous: bool) -> _DataParallelLaunched:
        steps = self._step_inputs(batches)
        for st in steps:
            st.sample_async = asynchronous
        prev = self.inflight.draws.tokens if self.inflight is not None and self.inflight.draws is not None else None
        logits = self.executor.execute_data_parallel(steps, prev)
        for d, batch in enumerate(batches):
            _mark_computed(batch, self.kvs[d])
        sampled = [[batch.requests[i] for i in st.sample_rows] for batch, st in zip(batches, steps)]
        draws = None
        if sampled[0]:
            try:
                draws = self.sampler.sample(logits, sampled[0], self.eos_token_ids)
            except Exception:
                sampled[0], draws = self._sample_isolated(logits, sampled[0])
        if asynchronous:  # the tokens stay on the devices: the next step's pending inputs (row j of its rank's)
            self.executor.share_sampled(draws.tokens if draws is not None else None, len(steps[0].sample_rows))
            for reqs in sampled:
                for j, req in enumerate(reqs):
                    req.num_pending += 1
                    req.pending_row = j
        return _DataParallelLaunched(sampled, draws, steps)

    def _collect_data_parallel(self, launched: _DataParallelLaunched, touched: dict[str, None]) -> None:
        results = [launched.draws.result() if launched.draws is not None else None]
        results += self.executor.collect_samples(launched.steps)
        for reqs, result, step in zip(launched.sampled, results, launched.steps):
            if step.sample_async:
                for req in reqs:
                    req.num_pending -= 1
            if result is not None:
                self._apply_sampled(reqs, result, touched)

    def _step_inputs(self, batches) -> list[StepInput]:
        """Each DP rank's step message; with several, padded alike: the experts' collectives see the same token
        count on every rank (a rank with nothing runs a dummy step of one decode token)."""
        steps = []
        for d, batch in enumerate(batches):
            _mark_scheduled(batch)
            steps.append(self._step_input(batch, d))
        if len(steps) > 1 and all(st.decode_only for st in steps):
            pad = max(max(len(st), 1) for st in steps)
            for st in steps:
                st.dp_graph_batch = pad
        elif len(steps) > 1:
            most = max(max(st.total_tokens, 1) for st in steps)
            for st in steps:
                st.dp_max_tokens = most
        return steps

    def _step_pipeline(self, touched: dict[str, None]) -> None:
        """Pipeline parallelism: rank 0 runs the first stage of a micro-batch and hands it on; the last stage's
        leader samples from its mirror of the requests (new ones carry their sampling state in the step) and sends
        the tokens back, so rank 0 never sees logits. Up to one micro-batch per stage is in flight, each of its
        own requests (a share of those there are), so the stages work on different micro-batches at once; the
        oldest is collected when the pipeline is full or nothing else can start. With DP, a micro-batch is one
        step of every DP rank (each its own pipeline; a stage's DP ranks meet in the experts' collectives)."""
        stages = self.config.pipeline_parallel_size
        launched = False
        if len(self.pp_inflight) < stages:
            batches = []
            for s in self.schedulers:
                share = max(1, -(-(len(s.running) + len(s.waiting)) // stages))
                batches.append(s.schedule(self.pp_busy, share))
            if any(b.requests for b in batches):
                steps = self._step_inputs(batches)
                if len(steps) > 1:
                    self.executor.execute_data_parallel(steps)
                else:
                    self.executor.execute(steps[0], None)
                for d, batch in enumerate(batches):
                    _mark_computed(batch, self.kvs[d])
                    self.pp_busy.update(r.request_id for r in batch.requests)
                self.pp_inflight.append(([b.requests for b in batches], steps))
                launched = True
        if self.pp_inflight and (not launched or len(self.pp_inflight) == stages):
            self._collect_micro_batch(touched)

    def _collect_micro_batch(self, touched: dict[str, None]) -> None:
        reqs, steps = self.pp_inflight.popleft()
        for d, (rs, step) in enumerate(zip(reqs, steps)):
            self.pp_busy.difference_update(r.request_id for r in rs)
            if step.sample_rows:
                result = self.executor.collect_last_stage(d)
                self._apply_sampled([rs[i] for i in step.sample_rows], result, touched)

    def _apply_sampled(self, reqs: list[Request], result, touched: dict[str, None]) -> None:
        """A leader's SampleResult (rows in `reqs` order, `errors` by row) given to its requests."""
        now = time.time()
        for j, req in enumerate(reqs):
            if req.finished:
                continue
            error = result.errors.get(j)
            if error:
                self._fail(req, error)
                continue
            try:
                self._append(req, result.token_ids[j], result.logprobs[j], result.token_logprobs[j], now)
            except Exception as e:
                self._fail(req, f"processing its output failed: {e!r}")
            if req.finished or req.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                touched[req.parent_id] = None

    def _launch(self, batch) -> _Launched:
        _mark_scheduled(batch)
        prev = self.inflight.draws.tokens if self.inflight is not None and self.inflight.draws is not None else None
        step = self._step_input(batch)
        logits = self.executor.execute(step, prev)
        _mark_computed(batch, self.kv)
        sampled = [batch.requests[i] for i in step.sample_rows]
        if not sampled:
            self.executor.share_sampled(None, 0)
            return _Launched([], None)
        try:
            draws = self.sampler.sample(logits, sampled, self.eos_token_ids)
        except Exception:  # one request's parameters broke the batched draw: find it, end it, draw the rest
            sampled, draws = self._sample_isolated(logits, sampled)
            if not sampled:
                self.executor.share_sampled(None, len(step.sample_rows))
                return _Launched([], None)
        self.executor.share_sampled(draws.tokens, len(step.sample_rows))
        for j, req in enumerate(sampled):
            req.num_pending += 1
            req.pending_row = j
        return _Launched(sampled, draws)

    def _step_input(self, batch, dp_rank: int = 0) -> StepInput:
        """The scheduler's decision as plain data for the workers (see engine/step.py). With DP, a request new to
        its rank's leader (with PP: the last stage's leader) also carries what that leader needs to sample it."""
        scheduler = self.schedulers[dp_rank]
        step = StepInput(freed=scheduler.freed_ids, is_dummy=not batch.requests)
        scheduler.freed_ids = []
        for rid in step.freed:
            self.sent_blocks.pop(rid, None)
        for b, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            rid, start = req.request_id, req.num_computed_tokens
            end = start + n
            known = min(end, req.num_tokens)
            step.req_ids.append(rid)
            step.starts.append(start)
            step.num_tokens.append(n)
            step.token_ids.append(req.all_token_ids[start:known])
            step.pending_rows.append(req.pending_row if known < end else -1)
            if end == req.num_scheduled_tokens:  # reached its newest token: it samples
                step.sample_rows.append(b)
            sent = self.sent_blocks.get(rid)
            if sent is None:
                step.reset.append(rid)
                sent = 0
                if dp_rank > 0 or self.pipeline:
                    step.sampling[rid] = (req.parent_id, req.index, req.prompt_token_ids,
                                          list(req.output_token_ids), req.params)
            if len(req.block_ids) > sent:
                step.new_blocks[rid] = req.block_ids[sent:]
                self.sent_blocks[rid] = len(req.block_ids)
            elif sent == 0:
                self.sent_blocks[rid] = 0
        return step

    def _sample_isolated(self, logits: torch.Tensor, sampled: list[Request]) -> tuple[list[Request], PendingSample]:
        """Sample each request alone to find the ones whose own sampling raises; fail those, redraw the others
        together. A fault of the device itself (CUDA error, OOM) raises again here and fails the step."""
        keep = []
        for j, req in enumerate(sampled):
            try:
                self.sampler.sample(logits[j: j + 1], [req], self.eos_token_ids).result()
                keep.append(j)
            except Exception as e:
                if _is_device_fault(e):
                    raise
                logger.warning("moeserve: request %s failed while sampling: %r", req.request_id, e)
                self._fail(req, f"sampling failed: {e!r}")
        survivors = [sampled[j] for j in keep]
        if not survivors:
            return [], None
        rows = torch.tensor(keep, device=logits.device)
        return survivors, self.sampler.sample(logits[rows], survivors, self.eos_token_ids)

    def _fail(self, req: Request, message: str) -> None:
        """End one request with an error; the others go on."""
        if req.finished:
            return
        req.error = message
        self._finish(req, "error", None, time.time())
        self.failed_parents[req.parent_id] = None

    def _process(self, launched: _Launched, touched: dict[str, None]) -> None:
        """Wait for a launched step's tokens and give them to their requests."""
        if launched.draws is None:
            return
        result = launched.draws.result()
        now = time.time()
        for j, req in enumerate(launched.sampled):
            req.num_pending -= 1
            if req.finished:  # stopped by an earlier token, or aborted, while this step ran: a wasted token
                continue
            try:
                self._append(req, result.token_ids[j], result.logprobs[j], result.token_logprobs[j], now)
            except Exception as e:  # e.g. its detokenizer or stop check: this request alone ends
                logger.warning("moeserve: request %s failed after sampling: %r", req.request_id, e)
                self._fail(req, f"processing its output failed: {e!r}")
            if req.finished or req.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                touched[req.parent_id] = None

    def _reports(self, parent_id: str) -> bool:
        """FINAL_ONLY parents report once, when their last child ends."""
        children = self.parents[parent_id]
        return (children[0].params.output_kind is not RequestOutputKind.FINAL_ONLY
                or all(r.finished for r in children))

    def _append(self, req: Request, token: int, logprobs, token_logprob, now: float) -> None:
        req.append_token(token)
        self.generation_tokens_total += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.prompt_tokens_total += req.num_prompt_tokens
        req.metrics.last_token_time = now
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += token_logprob
        p = req.params
        stop_token = (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
                      or (req.grammar is not None and token in self.eos_token_ids))  # the grammar let EOS by: done
        if stop_token:  # the sampler bans them until min_tokens
            return self._finish(req, "stop", token, now)
        if req.detokenizer is not None:
            hit = req.detokenizer.add(token)
            if hit is not None and len(req.output_token_ids) >= p.min_tokens:
                return self._finish(req, "stop", hit, now)
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return self._finish(req, "length", None, now)

    def _finish(self, req: Request, reason: str, stop_reason, now: float) -> None:
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = now
        self.schedulers[req.dp_rank].finish(req)
        self.sync_requests.discard(req.request_id)

    def _output(self, parent_id: str) -> RequestOutput:
        children = self.parents[parent_id]
        outs = []
        for r in children:
            text = r.detokenizer.visible_text(r.finished) if r.detokenizer is not None else ""
            outs.append(CompletionOutput(
                index=r.index, text=text, token_ids=list(r.output_token_ids),
                cumulative_logprob=r.cumulative_logprob if r.logprobs is not None else None,
                logprobs=list(r.logprobs) if r.logprobs is not None else None,
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            ))
        first = children[0]
        errors = [r.error for r in children if r.error]
        if errors:  # one failed child fails the parent: abort its siblings
            for r in children:
                if not r.finished:
                    self._finish(r, "abort", None, time.time())
        finished = all(r.finished for r in children)
        metrics = first.metrics
        if len(children) > 1:
            from dataclasses import replace
            metrics = replace(first.metrics,
                              first_token_time=min((r.metrics.first_token_time for r in children
                                                    if r.metrics.first_token_time), default=None),
                              finished_time=max((r.metrics.finished_time or 0) for r in children) or None)
        out = RequestOutput(request_id=parent_id, prompt=self.parent_prompt.get(parent_id),
                            prompt_token_ids=first.prompt_token_ids, outputs=outs, finished=finished,
                            metrics=metrics, num_cached_tokens=first.num_cached_tokens,
                            error=errors[0] if errors else None)
        if finished:
            for r in children:
                self.requests.pop(r.request_id, None)
            self.parents.pop(parent_id, None)
            self.parent_prompt.pop(parent_id, None)
        return out
