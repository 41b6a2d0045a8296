"""The pinned workloads of ../shared/BENCHMARKS.md: seeded random token ids, ignore_eos, fixed lengths."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ThroughputSpec:
    num_requests: int = 1000
    input_len: int = 1024
    output_len: int = 256
    seed: int = 0


@dataclass(frozen=True)
class LatencySpec:
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    input_len: int = 128
    output_len: int = 256
    repeats: int = 5  # median of this many runs per batch size (BENCHMARKS.md: 5)
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


WORKLOADS = ("throughput", "latency")


def spec_dict(spec) -> dict:
    d = asdict(spec)
    if "batch_sizes" in d:
        d["batch_sizes"] = list(d["batch_sizes"])
    return d


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `length` token ids drawn uniformly from [0, vocab_size), reproducibly."""
    if num < 1 or length < 1:
        raise ValueError(f"need num >= 1 and length >= 1, got {num}, {length}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


def throughput_prompts(spec: ThroughputSpec, vocab_size: int) -> list[list[int]]:
    return random_prompts(spec.num_requests, spec.input_len, vocab_size, spec.seed)


def latency_prompts(spec: LatencySpec, batch: int, repeat: int, vocab_size: int) -> list[list[int]]:
    """Fresh prompts per (batch, repeat), so that no run can reuse an earlier run's prefix cache."""
    return random_prompts(batch, spec.input_len, vocab_size, spec.seed * 1_000_003 + batch * 1009 + repeat)


def median(xs: list[float]) -> float:
    if not xs:
        raise ValueError("median of nothing")
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
