"""One rank's share of the engine: its model shard, its runner and its KV cache.

The engine's own process holds rank 0's Worker; with several ranks, every other rank runs the same Worker in a
process of its own (distributed/worker_main.py), fed the same step messages. Every rank takes the same start-up
path in the same order (load, size the KV cache, warm up, capture graphs), so the collectives inside the
forward passes line up.
"""

from __future__ import annotations

import time

import torch

from moeserve.config import EngineConfig
from moeserve.engine.request import Request
from moeserve.engine.runner import ModelRunner
from moeserve.layers.expert_load import ExpertLoad
from moeserve.engine.sampler import SampleResult, Sampler
from moeserve.engine.step import StepInput
from moeserve.loader.model_loader import ModelSource, load_model

CPU_DEFAULT_KV_BYTES = 1 << 30


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    model_max = int(hf_config.get("max_position_embeddings", 0) or 0)
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
    limit = min(x for x in (model_max, window) if x) if (model_max or window) else None
    want = config.max_model_len
    if want is None:
        if limit is None:
            raise ValueError("config.json gives no max_position_embeddings; pass max_model_len.")
        return limit
    if limit and want > limit:
        raise ValueError(f"max_model_len={want} exceeds the model's limit of {limit} "
                         f"({'sliding_window' if window and limit == window else 'max_position_embeddings'}).")
    return want


def resolve_batched_tokens(config: EngineConfig, max_model_len: int) -> int:
    n = config.max_num_batched_tokens
    if not config.enable_chunked_prefill:
        n = n or max_model_len
        if n < max_model_len:
            raise ValueError(f"Without chunked prefill, max_num_batched_tokens ({n}) must be >= "
                             f"max_model_len ({max_model_len}).")
        return n
    return n or max(8192, config.max_num_seqs)


class DoesNotFit(ValueError):
    """The model cannot be served on this device with these settings; raised before any weight is loaded."""


def check_fits_before_loading(config: EngineConfig, source: ModelSource, dtype: torch.dtype,
                              device_memory_bytes: int) -> None:
    """The planner's arithmetic, before loading: weights + KV of one max_model_len sequence + overhead."""
    from moeserve.models.hf_config import normalize
    from moeserve.plan.arch import read_arch
    from moeserve.plan.fit import check_startup_fit
    from moeserve.plan.memory import kv_dtype_bytes

    spec = read_arch(normalize(source.config))
    max_len = config.max_model_len or spec.max_position_embeddings
    elem = torch.tensor([], dtype=dtype).element_size()
    kv_elem = kv_dtype_bytes(config.kv_cache_dtype) if config.kv_fp8 else elem  # the planner's table, as `plan`
    verdict = check_startup_fit(
        spec, weight_dtype_bytes=elem, kv_dtype_bytes=kv_elem, max_model_len=max_len,
        weight_dtype="fp8" if config.quantization == "fp8" else None,  # online fp8: sized as it will be held
        device_memory_bytes=device_memory_bytes, memory_utilization=config.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens or 8192, max_num_seqs=config.max_num_seqs,
        tp=config.tensor_parallel_size, pp=config.pipeline_parallel_size, dp=config.data_parallel_size,
        enable_expert_parallel=config.enable_expert_parallel,
    )
    if not verdict.fits:
        raise DoesNotFit(f"{verdict.message}. Suggestion: {verdict.suggestion}")


class Worker:
    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, source: ModelSource):
        self.config, self.device, self.dtype = config, device, dtype
        self.timings: dict[str, float] = {}
        if device.type == "cuda" and source.config:  # every rank, on its own GPU, before a weight is loaded
            check_fits_before_loading(config, source, dtype, torch.cuda.get_device_properties(device).total_memory)
        self.loaded = load_model(config, device, dtype, source)
        self.model = self.loaded.model
        self.timings["load_s"] = self.loaded.load_seconds
        self.max_model_len = resolve_max_model_len(config, self.loaded.hf_config)
        self.max_num_batched_tokens = resolve_batched_tokens(config, self.max_model_len)
        # buffers too: packed quantized weights (layers/quant) live there
        self.weights_bytes = sum(t.numel() * t.element_size()
                                 for t in (*self.model.parameters(), *self.model.buffers()))
        self.runner = ModelRunner(self.model, device, dtype, config.block_size, self.max_model_len,
                                  config.max_num_seqs, self.max_num_batched_tokens,
                                  use_cuda_graphs=not config.enforce_eager, kv_cache_dtype=config.kv_cache_dtype)
        # before graph capture, so the graphs hold the counting ops
        self.expert_load = ExpertLoad.attach(self.model, device) if config.expert_load_telemetry else None
        self.runner.expert_load = self.expert_load
        self.profile_peak_bytes: int | None = None

    def available_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold under the configured budget (ranks then agree on the least)."""
        cfg = self.config
        per_block = self.runner.kv_bytes_per_block()
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cpu":
            # What the model and max_model_len need: a few full-length sequences, at most 1 GiB (and never
            # less than one full-length sequence). The pages stay untouched, so free, until written.
            per_token = per_block // cfg.block_size
            budget = max(min(per_token * self.max_model_len * min(cfg.max_num_seqs, 4), CPU_DEFAULT_KV_BYTES),
                         per_token * self.max_model_len)
        else:
            t0 = time.perf_counter()
            peak = self.runner.profile_peak_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            others = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
            budget = int(total * cfg.gpu_memory_utilization) - peak - max(others, 0)
            self.timings["profile_s"] = time.perf_counter() - t0
            self.profile_peak_bytes = peak
            torch.cuda.empty_cache()
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"No memory left for the KV cache: the budget is {budget / 2**30:.2f} GiB after the "
                             f"weights ({self.weights_bytes / 2**30:.2f} GiB) and activations; one block needs "
                             f"{per_block} bytes. Raise gpu_memory_utilization / kv_cache_memory_bytes.")
        return int(blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, then warm up prefill shapes and capture the decode graphs."""
        self.runner.allocate_kv_cache(num_blocks)
        self.timings["prefill_warmup_s"] = self.runner.warm_up_prefill()
        self.timings["cuda_graphs_s"] = self.runner.capture_cuda_graphs()
        if self.expert_load is not None:
            self.expert_load.reset()  # warm-up and capture forwards are not traffic

    def execute(self, step: StepInput, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        return self.runner.execute(step, prev_tokens)


class LeaderSampler:
    """Data parallelism: the leader (TP rank 0) of a DP rank other than 0 samples its own rows, from a mirror of
    each of its requests' sampling state (parameters, prompt, outputs so far) kept from the step messages."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int, eos_ids: set[int], tokenizer=None):
        self.sampler = Sampler(vocab_size, device, seed)
        self.vocab_size, self.eos_ids, self.tokenizer = vocab_size, eos_ids, tokenizer
        self.reqs: dict[str, Request] = {}
        self.grammars = None  # compiled here from the request's spec (plain data in its SamplingParams), as rank 0 does

    def apply(self, step: StepInput) -> None:
        """Forget the freed requests, mirror the new ones."""
        for rid in step.freed:
            self.reqs.pop(rid, None)
        for rid, (parent, index, prompt, outputs, params) in step.sampling.items():
            req = Request(rid, parent, index, prompt, params, max_tokens=1 << 30)
            for t in outputs:
                req.append_token(t)
            if params.structured_outputs is not None:  # its matcher catches up with `outputs` at the first mask
                if self.grammars is None:
                    from moeserve.engine.structured import Grammars
                    self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
                req.grammar = self.grammars.state(params.structured_outputs)
            self.reqs[rid] = req

    def sample(self, step: StepInput, logits: torch.Tensor) -> SampleResult:
        reqs = [self.reqs[step.req_ids[b]] for b in step.sample_rows]
        try:
            result = self.sampler(logits, reqs, self.eos_ids)
        except Exception:  # one request's parameters broke the batched draw: sample each alone
            result = SampleResult([], [], [])
            for j, req in enumerate(reqs):
                try:
                    one = self.sampler(logits[j: j + 1], [req], self.eos_ids)
                    result.token_ids.append(one.token_ids[0])
                    result.logprobs.append(one.logprobs[0])
                    result.token_logprobs.append(one.token_logprobs[0])
                except Exception as e:
                    result.token_ids.append(-1)
                    result.logprobs.append(None)
                    result.token_logprobs.append(None)
                    result.errors[j] = f"sampling failed: {e!r}"
        for j, (req, t) in enumerate(zip(reqs, result.token_ids)):
            if j not in result.errors:
                req.append_token(t)
        return result
