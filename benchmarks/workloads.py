"""The pinned workloads of ../shared/BENCHMARKS.md: seeded random token ids, ignore_eos, fixed lengths; and the
traffic-like workloads of issue 16 (varlen: heavy-tailed lengths, longctx: 8k/32k prompts, prefix: shared
prefixes), whose lengths are exact too (ignore_eos), so both engines do the same work."""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class VarlenSpec:
    """Requests with lognormal input and output lengths (median exp(mu), shape sigma), rounded and clipped, all
    submitted at once. Medians 600 in / 150 out with sigma 1.0 give means ~990 / ~245 and a p99 near 6000 / 1500:
    a few long prompts and long answers among many short ones, as chat traffic has."""
    num_requests: int = 512
    input_median: float = 600.0
    input_sigma: float = 1.0
    input_min: int = 16
    input_max: int = 8192
    output_median: float = 150.0
    output_sigma: float = 1.0
    output_min: int = 8
    output_max: int = 2048
    seed: int = 2

    def __post_init__(self) -> None:
        if self.num_requests < 1 or not (1 <= self.input_min <= self.input_max) or not (
                1 <= self.output_min <= self.output_max):
            raise ValueError(f"bad varlen spec {self}")


@dataclass(frozen=True)
class LongctxSpec:
    """Fixed-batch decode after a long prompt: TTFT and TPOT per (prompt length, batch)."""
    input_lens: tuple[int, ...] = (8192, 32768)
    batch_sizes: tuple[int, ...] = (1, 16)
    output_len: int = 64
    seed: int = 3

    def __post_init__(self) -> None:
        if not self.input_lens or not self.batch_sizes or min(self.input_lens + self.batch_sizes) < 1:
            raise ValueError(f"bad longctx spec {self}")
        if self.output_len < 2:
            raise ValueError("longctx needs output_len >= 2 (TPOT)")


@dataclass(frozen=True)
class PrefixSpec:
    """num_groups groups of group_size requests; the requests of a group share a prefix_len-token prefix and each
    has its own suffix_len tokens. All submitted at once, groups interleaved (request i is in group i % groups)."""
    num_groups: int = 8
    group_size: int = 32
    prefix_len: int = 2048
    suffix_len: int = 128
    output_len: int = 128
    seed: int = 4

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.group_size


WORKLOADS = ("throughput", "latency", "varlen", "longctx", "prefix")


def spec_dict(spec) -> dict:
    d = asdict(spec)
    for k in ("batch_sizes", "input_lens"):
        if k in d:
            d[k] = list(d[k])
    if isinstance(spec, VarlenSpec):
        d["distribution"] = ("lognormal: length = clip(round(exp(N(ln median, sigma^2))), min, max), input and "
                             "output drawn independently per request")
    if isinstance(spec, PrefixSpec):
        d["num_requests"] = spec.num_requests
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


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def varlen_lengths(spec: VarlenSpec) -> list[tuple[int, int]]:
    """(input_len, output_len) per request, reproducibly from spec.seed."""
    rng = random.Random(spec.seed)
    return [(_lognormal_int(rng, spec.input_median, spec.input_sigma, spec.input_min, spec.input_max),
             _lognormal_int(rng, spec.output_median, spec.output_sigma, spec.output_min, spec.output_max))
            for _ in range(spec.num_requests)]


def varlen_prompts(spec: VarlenSpec, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The prompts (random token ids of the drawn lengths) and each request's exact output length."""
    lens = varlen_lengths(spec)
    rng = random.Random(spec.seed * 7919 + 1)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    return [[rng.randrange(vocab_size) for _ in range(n_in)] for n_in, _ in lens], [n_out for _, n_out in lens]


def longctx_prompts(spec: LongctxSpec, input_len: int, batch: int, run: int, vocab_size: int) -> list[list[int]]:
    """Fresh prompts per (length, batch, run): no run can reuse another's prefix cache."""
    return random_prompts(batch, input_len, vocab_size, spec.seed * 1_000_003 + input_len * 131 + batch * 7 + run)


def prefix_prompts(spec: PrefixSpec, vocab_size: int) -> list[list[int]]:
    prefixes = random_prompts(spec.num_groups, spec.prefix_len, vocab_size, spec.seed * 1_000_003 + 17)
    suffixes = random_prompts(spec.num_requests, spec.suffix_len, vocab_size, spec.seed * 1_000_003 + 29)
    return [prefixes[i % spec.num_groups] + suffixes[i] for i in range(spec.num_requests)]


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (q in [0, 100]), numpy's default method."""
    if not xs:
        raise ValueError("percentile of nothing")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)
