"""The engine's configuration, with vLLM's engine-argument names, validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    model: str | None = None  # HF checkpoint dir, a .gguf file, a catalog hub id (dummy only), or None = default
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    # Laid over config.json before anything reads it (vLLM's hf_overrides): {"num_hidden_layers": 12} serves a
    # layer-truncated model with the same per-layer shapes, as benchmarks of flagships on fewer GPUs do.
    hf_overrides: dict | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    # default with chunked prefill: measured on CUDA with one rank (engine/token_budget.py), else 8192;
    # without chunked prefill: max_model_len
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # CPU default 1 GiB; on CUDA overrides gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    # Schedule and launch step n+1 before the host has seen step n's tokens, so the GPU never waits for the
    # host's bookkeeping. None: on for CUDA, off on the CPU (where nothing runs behind the host's back).
    async_scheduling: bool | None = None
    served_model_name: str | None = None
    # Who drives the engine, as vLLM's usage context: "server" (moeserve serve) or "offline" (LLM(...), which sets
    # it). It moves one default: the measured step token budget favours the decodes' wait per step in a server and
    # prefill throughput offline (engine/token_budget.py), as vLLM's defaults differ (8192 vs 16384 on an H100).
    usage: str = "server"
    # Weight precision: None = the checkpoint's (an fp8 quantization_config is read from config.json); "fp8" also
    # quantizes a bf16/fp32 checkpoint on load (per-channel weights, dynamic per-token activations); "awq", "gptq",
    # "compressed-tensors" name an int4 checkpoint's method (read from config.json anyway; must match it).
    quantization: str | None = None
    # KV-cache precision: auto = the model dtype; fp8 (= fp8_e4m3) stores K/V (or MLA's latents) as float8_e4m3fn
    # with per-tensor scales (1.0, vLLM's default, or a checkpoint's k_scale / v_scale, which the loader hands to
    # layers.attention.load_kv_scale): twice the tokens of a bf16 cache.
    kv_cache_dtype: str = "auto"
    # Count the tokens routed to each expert on the device (GET /v1/expert_load, the expert gauges of /metrics).
    expert_load_telemetry: bool = False
    # The layout (vLLM's names and meanings): ranks = TP x PP x DP, one process per GPU, over `nnodes` nodes.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    # TP/EP all-reduces through symmetric memory (distributed/symmetric_all_reduce.py) instead of NCCL: by default
    # in groups of 4+ ranks, where decode measured faster; enable_custom_all_reduce also at 2 ranks (measured
    # slower at batch 1 there); disable_custom_all_reduce (vLLM's flag) never.
    enable_custom_all_reduce: bool = False
    disable_custom_all_reduce: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown engine argument(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(not (self.enable_custom_all_reduce and self.disable_custom_all_reduce),
              "enable_custom_all_reduce and disable_custom_all_reduce contradict each other: give one.")
        check(self.load_format in ("auto", "safetensors", "gguf", "dummy"),
              f"load_format must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}.")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"),
              f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}.")
        check(self.quantization in (None, "fp8", "awq", "gptq", "compressed-tensors"),
              f"quantization must be None, 'fp8', or the int4 checkpoint's method ('awq', 'gptq', "
              f"'compressed-tensors'); got {self.quantization!r}.")
        check(self.kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"),
              f"kv_cache_dtype must be one of auto, fp8, fp8_e4m3 (fp8 means e4m3; fp8_e5m2 is not implemented); "
              f"got {self.kv_cache_dtype!r}.")
        check(self.usage in ("server", "offline"), f"usage must be 'server' or 'offline'; got {self.usage!r}.")
        check(self.hf_overrides is None or isinstance(self.hf_overrides, dict),
              f"hf_overrides must be a dict (a JSON object), got {type(self.hf_overrides).__name__}.")
        check(self.max_model_len is None or self.max_model_len > 1, "max_model_len must be > 1.")
        check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1.")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens must be >= 1.")
        check(self.block_size in (8, 16, 32, 64, 128), f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}.")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
              "num_gpu_blocks_override must be >= 1.")
        check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes must be > 0.")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1].")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "nnodes"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1.")
        check(0 <= self.node_rank < self.nnodes, f"node_rank must be in [0, nnodes); got {self.node_rank}.")
        check(self.world_size % self.nnodes == 0,
              f"tp x pp x dp = {self.world_size} ranks do not split evenly over {self.nnodes} nodes.")
        check(self.data_parallel_size == 1 or self.enable_expert_parallel,
              "data_parallel_size > 1 runs DP attention with expert parallelism: add enable_expert_parallel "
              "(a dense model needs no DP inside one server; run one server per replica).")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def parallel_layout(self):
        from moeserve.distributed.parallel_state import ParallelLayout

        return ParallelLayout(tp=self.tensor_parallel_size, pp=self.pipeline_parallel_size,
                              dp=self.data_parallel_size, enable_expert_parallel=self.enable_expert_parallel,
                              custom_all_reduce=self.custom_all_reduce_min_ranks)

    @property
    def custom_all_reduce_min_ranks(self) -> int:
        """The fewest ranks a group needs for the symmetric-memory all-reduce (0: never)."""
        from moeserve.distributed.symmetric_all_reduce import DEFAULT_MIN_RANKS

        return 0 if self.disable_custom_all_reduce else 2 if self.enable_custom_all_reduce else DEFAULT_MIN_RANKS

    @property
    def kv_fp8(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    @property
    def dtype_name(self) -> str:
        return {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
            self.dtype, self.dtype)
