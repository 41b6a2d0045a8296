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
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 8192 with chunked prefill, else max_model_len
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

        check(self.load_format in ("auto", "safetensors", "gguf", "dummy"),
              f"load_format must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}.")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"),
              f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}.")
        check(self.max_model_len is None or self.max_model_len > 1, "max_model_len must be > 1.")
        check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1.")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens must be >= 1.")
        check(self.block_size in (8, 16, 32, 64, 128), f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}.")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
              "num_gpu_blocks_override must be >= 1.")
        check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes must be > 0.")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1].")

    @property
    def dtype_name(self) -> str:
        return {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
            self.dtype, self.dtype)
