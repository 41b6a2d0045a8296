"""One rank's share of the engine: its model shard, its runner and its KV cache.

The engine's own process holds rank 0's Worker; with several ranks, every other rank runs the same Worker in a
process of its own (distributed/worker_main.py), fed the same step messages. Every rank takes the same start-up
path in the same order (load, size the KV cache, warm up, capture graphs), so the collectives inside the
forward passes line up.
"""

from __future__ import annotations

import logging
import time

import torch

from moeserve.config import EngineConfig
from moeserve.engine import host_memory, token_budget
from moeserve.engine.request import Request
from moeserve.engine.runner import ModelRunner
from moeserve.layers.expert_load import ExpertLoad
from moeserve.engine.sampler import PendingSample, SampleResult, Sampler
from moeserve.engine.step import StepInput
from moeserve.loader.model_loader import ModelSource, load_model

CPU_DEFAULT_KV_BYTES = 1 << 30
TRIM_EVERY_STEPS = 32  # CPU: malloc_trim after prefill steps and every this many steps (Worker._after_cpu_step)

logger = logging.getLogger("moeserve")


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
    return n or max(token_budget.DEFAULT_BATCHED_TOKENS, config.max_num_seqs)


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
        self.cpu_steps = 0  # steps run on the CPU (when to trim the heap)
        if device.type == "cpu":  # before any matmul of this process's model (read at the first one)
            host_memory.bound_kernel_caches()
            host_memory.reproducible_mkl()
        host_memory.settle_mkl_vml()  # before the rotary tables (CPU-made on every device) are the first VML call
        if device.type == "cuda" and source.config:  # every rank, on its own GPU, before a weight is loaded
            check_fits_before_loading(config, source, dtype, torch.cuda.get_device_properties(device).total_memory)
        self.loaded = load_model(config, device, dtype, source)
        self.model = self.loaded.model
        self.timings["load_s"] = self.loaded.load_seconds
        self.max_model_len = resolve_max_model_len(config, self.loaded.hf_config)
        self.max_num_batched_tokens = resolve_batched_tokens(config, self.max_model_len)
        # where the budget came from: flag (the user's), default, measured (now) or cache (measured before)
        self.batched_tokens_source = "flag" if config.max_num_batched_tokens else "default"
        # buffers too: packed quantized weights (layers/quant) live there
        self.weights_bytes = sum(t.numel() * t.element_size()
                                 for t in (*self.model.parameters(), *self.model.buffers()))
        if token_budget.wanted(config, device.type):
            self.settle_batched_tokens()  # builds self.runner at the budget it settles on
        else:
            self.runner = self._make_runner(self.max_num_batched_tokens)
        # before graph capture, so the graphs hold the counting ops
        self.expert_load = ExpertLoad.attach(self.model, device) if config.expert_load_telemetry else None
        self.runner.expert_load = self.expert_load
        self.profile_peak_bytes: int | None = None

    def _make_runner(self, max_num_batched_tokens: int) -> ModelRunner:
        cfg = self.config
        return ModelRunner(self.model, self.device, self.dtype, cfg.block_size, self.max_model_len,
                           cfg.max_num_seqs, max_num_batched_tokens,
                           use_cuda_graphs=not cfg.enforce_eager, kv_cache_dtype=cfg.kv_cache_dtype)

    def settle_batched_tokens(self) -> None:
        """No --max-num-batched-tokens on CUDA: take the budget from the autotune cache, or measure it now (see
        engine/token_budget.py). Runs before the KV cache is sized, so that the memory profile and the KV pool are
        those of the chosen budget, exactly as if the user had passed it; and a cached start is that same start."""
        cfg = self.config
        cands = token_budget.candidates(cfg.max_num_seqs, self.max_model_len)
        if len(cands) < 2:  # nothing to choose between: the default, as without measuring
            self.runner = self._make_runner(self.max_num_batched_tokens)
            return
        key = token_budget.cache_key(self.loaded.hf_config, cfg, str(self.dtype).removeprefix("torch."),
                                     self.max_model_len)
        entry = token_budget.cached(key, cands)
        if entry is not None:
            source, where = "cache", f"from {token_budget.cache_path(key)}"
        else:
            t0 = time.perf_counter()
            self.runner = self._make_runner(max(cands))  # buffers for the largest candidate, while measuring
            measured = self.measure_prefill(cands)
            tps = {t: v for t, (v, _) in measured.items()}
            left = {t: b for t, (_, b) in measured.items()}
            cap = token_budget.memory_cap(left, self._kv_bytes_needed(left))
            chosen = token_budget.choose(tps, floor=cfg.max_num_seqs, cap=cap,
                                         tolerance=token_budget.tolerance(cfg.usage))
            entry = {"config": {"max_num_batched_tokens": chosen}, "candidates": list(cands), "cap": cap,
                     "tokens_per_s": [[t, tps[t]] for t in sorted(tps)],
                     "kv_bytes_left": [[t, left[t]] for t in sorted(left)]}
            source, where = "measured", f"saved to {token_budget.save(key, entry)}"
            self.timings["batched_tokens_s"] = time.perf_counter() - t0
        self.max_num_batched_tokens = token_budget.choice(entry, cfg.max_num_seqs, cfg.usage)
        self.batched_tokens_source = source
        self.runner = self._make_runner(self.max_num_batched_tokens)  # buffers and graph sizes of the choice
        logger.info("moeserve: step token budget [%s] %s, %s", source,
                    token_budget.describe(entry, self.max_num_batched_tokens, cfg.usage), where)

    def _kv_bytes_needed(self, kv_bytes_left: dict[int, int]) -> int:
        """What a budget's activations must leave for the KV cache: an explicit KV size (blocks or bytes) in full;
        else KV_KEEP of what the smallest measured budget leaves, and at least one max_model_len sequence."""
        cfg = self.config
        per_block = self.runner.kv_bytes_per_block()
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override * per_block
        if cfg.kv_cache_memory_bytes is not None:
            return cfg.kv_cache_memory_bytes
        one_seq = per_block * -(-self.max_model_len // cfg.block_size)
        smallest = kv_bytes_left[min(kv_bytes_left)] if kv_bytes_left else 0
        return max(one_seq, int(token_budget.KV_KEEP * smallest))

    def measure_prefill(self, cands: list[int]) -> dict[int, tuple[float, int]]:
        """{budget: (prefill tokens/s, bytes the KV cache would have left)} per candidate, smallest first, on a
        one-block KV cache attached only meanwhile; stops at the first that runs out of memory (a larger one would
        too). The KV budget is available_kv_blocks' arithmetic with this forward's peak in the profile's place."""
        cfg, runner = self.config, self.runner
        seq_len = min(self.max_model_len, token_budget.MEASURE_SEQ_LEN)
        vocab = int(self.loaded.hf_config.vocab_size)
        out: dict[int, tuple[float, int]] = {}
        runner.allocate_kv_cache(1)
        try:
            for T in sorted(cands):
                try:
                    seconds, peak = runner.time_prefill(T, seq_len, vocab)
                except torch.OutOfMemoryError:
                    logger.info("moeserve: a step of %d tokens ran out of memory; larger budgets not measured", T)
                    break
                except Exception as e:  # a shape no step of the default budget reached: say so, measure no larger
                    logger.warning("moeserve: a step of %d tokens failed while measuring the token budget (%r); "
                                   "larger budgets not measured", T, e)
                    break
                finally:
                    torch.cuda.empty_cache()
                free, total = torch.cuda.mem_get_info(self.device)
                others = total - free - torch.cuda.memory_reserved(self.device)
                out[T] = (T / max(seconds, 1e-9), int(total * cfg.gpu_memory_utilization) - peak - max(others, 0))
        finally:
            runner.kv_caches = None
            torch.cuda.empty_cache()
        return out

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
        out = self.runner.execute(step, prev_tokens)
        if self.device.type == "cpu":  # the step is done (no stream)
            self._after_cpu_step(step)
        return out

    def _after_cpu_step(self, step: StepInput) -> None:
        """Hand the heap's free pages back (host_memory.trim) after a step that prefilled (its activations leave the
        largest holes) and after every TRIM_EVERY_STEPS-th step (decodes of growing contexts leave holes too). On
        the default model that gives the peak of trimming after every step (~-15 MB) at no measurable cost, where
        every step cost 4-7% of batch-16 speed (the next step faults the trimmed pages back) and trimming only
        when the batch's shape changed saved 3 MB (benchmarks/cpu/NOTES.md)."""
        self.cpu_steps += 1
        if sum(step.num_tokens) > len(step.num_tokens) or self.cpu_steps % TRIM_EVERY_STEPS == 0:
            host_memory.trim()


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
        return self.settle(self.draw(step, logits))

    def draw(self, step: StepInput, logits: torch.Tensor) -> "LeaderDraw":
        """The step's draws, their tokens left on the device (one per sample row: the next step's pending inputs
        under async scheduling); settle() gives them to the mirror."""
        reqs = [self.reqs[step.req_ids[b]] for b in step.sample_rows]
        try:
            return LeaderDraw(reqs, self.sampler.sample(logits, reqs, self.eos_ids))
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
            tokens = torch.tensor([max(t, 0) for t in result.token_ids], dtype=torch.int64, device=logits.device)
            return LeaderDraw(reqs, None, result, tokens)

    @staticmethod
    def settle(drawn: "LeaderDraw") -> SampleResult:
        result = drawn.pending.result() if drawn.pending is not None else drawn.ready
        for j, (req, t) in enumerate(zip(drawn.reqs, result.token_ids)):
            if j not in result.errors:
                req.append_token(t)
        return result


class LeaderDraw:
    """A leader's draws for one step: pending on the device, or (after a row failed) already on the host."""

    def __init__(self, reqs: list[Request], pending: PendingSample | None, ready: SampleResult | None = None,
                 tokens: torch.Tensor | None = None):
        self.reqs, self.pending, self.ready = reqs, pending, ready
        self.tokens = pending.tokens if pending is not None else tokens
