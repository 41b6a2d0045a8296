"""Block-size choice per (kernel, shape bucket, GPU), timed once and cached on disk, always reported.

The first call of a kernel on a new shape bucket times a handful of candidate configs on the real inputs
(triton.testing.do_bench, median) and keeps the fastest; the result goes to
`$MOESERVE_CACHE_DIR/autotune/<gpu>.json` (default `~/.cache/moeserve/autotune/<gpu>.json`) and later processes
read it from there. Choices timed on the cards the project measures on (H100, H200) ship with the package in
`moeserve/kernels/tuned/<gpu>.json`, as vLLM ships its fused-MoE configs, below the disk cache: on such a card a
first start times only the shapes they lack (on a fresh 2x H200, DP=2+EP qwen3-30b-a3b timed 51 shapes and was
ready after 142.6 s; all 51 are in the shipped file). Every choice is reported once per process with where it
came from: `tuned` (timed now), `cache`, `shipped`, or `heuristic` (interpreter, MOESERVE_AUTOTUNE=0, or a call
during CUDA graph capture, where nothing can be timed - the runner should warm each shape up eagerly before
capturing it). An entry, cached or shipped, that never timed one of today's candidates (the candidate lists grew
since) is tuned again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from moeserve.kernels import runtime

logger = logging.getLogger("moeserve.kernels.autotune")

Config = dict[str, int]


def bucket(n: int, cap: int | None = None) -> int:
    """Round n up to a power of two (1, 2, 4, ...), at most cap."""
    b = runtime.next_pow2(max(1, n))
    return min(b, cap) if cap else b


# Decode attention is tuned over contexts of this many tokens, not over its first call's lengths: that call is the
# CUDA-graph warm-up, whose 1-token contexts make the smallest tile always win - a tile that then streams real
# contexts at a fraction of the bandwidth the larger ones reach.
DECODE_TUNING_CONTEXT = 4096


def decode_tuning_inputs(seq_lens, block_tables, page: int, num_blocks: int, context: int = DECODE_TUNING_CONTEXT):
    """(seq_lens, block_tables) for timing a decode kernel: every sequence `context` tokens long (at most what its
    table row holds), on distinct pages (wrapping around the pool when it is smaller), so that no two sequences
    share cached lines. Only for timing: the real call runs on the real ones."""
    import torch

    B, width = block_tables.shape
    L = max(1, min(context, width * page))
    n = -(-L // page)
    pages = (torch.arange(B * n, device=block_tables.device, dtype=torch.int64) % max(1, num_blocks))
    tables = torch.zeros_like(block_tables)
    tables[:, :n] = pages.view(B, n).to(block_tables.dtype)
    return torch.full_like(seq_lens, L), tables


class StreamedRun:
    """A weight-streaming kernel's run(cfg) for the tuner: each call passes run the next of a few copies of the
    weight (and whatever travels with it, e.g. its scales), together > 2x an H100's 50 MB L2, so a graph of
    back-to-back calls streams them from HBM as a model's layers do. On one weight alone, a 21 MB projection sat in
    L2 and configs were ranked at 3.8 TB/s, above HBM, which picked at batch 2 a config 15 % slower than cuBLAS once
    streamed. The copies exist only while tuning (made at the first call)."""

    STREAM_BYTES = 128 << 20

    def __init__(self, run, weight, *companions):
        self.run, self.tensors = run, (weight, *companions)
        self.copies: list[tuple] = []
        self.calls = 0

    def __call__(self, cfg: Config):
        if not self.copies:
            w = self.tensors[0]
            n = min(256, -(-self.STREAM_BYTES // max(1, w.numel() * w.element_size())))
            self.copies = [self.tensors] + [tuple(t.clone() for t in self.tensors) for _ in range(n - 1)]
        self.calls += 1
        return self.run(cfg, *self.copies[self.calls % len(self.copies)])


def cache_path(gpu_slug: str | None = None) -> Path:
    root = Path(os.environ.get("MOESERVE_CACHE_DIR") or "~/.cache/moeserve").expanduser()
    return root / "autotune" / f"{gpu_slug or runtime.gpu_slug()}.json"


def shipped_path(gpu_slug: str | None = None) -> Path:
    return Path(__file__).with_name("tuned") / f"{gpu_slug or runtime.gpu_slug()}.json"


def _report(message: str) -> None:
    """Log at INFO; when logging is not configured at all, print to stderr so the choice is never silent."""
    if logging.getLogger().hasHandlers() or logger.hasHandlers():
        logger.info(message)
    else:
        print(f"[moeserve.autotune] {message}", file=sys.stderr, flush=True)


class Autotuner:
    """One per process (see `get_tuner`); thread-safe enough for one engine."""

    def __init__(self, path: Path | None = None, shipped: Path | None = None):
        self._path = path
        self._shipped_path = shipped
        self._disk: dict[str, dict] | None = None
        self._shipped: dict[str, dict] | None = None
        self._chosen: dict[str, dict] = {}  # full key -> {"config", "source", ...}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = cache_path()
        return self._path

    def choose(
        self,
        kernel: str,
        key: str,
        candidates: list[Config],
        run: Callable[[Config], object],
        default: Config,
    ) -> Config:
        """The config for this (kernel, shape key): memo, then disk cache, then timing (or the heuristic default)."""
        full = f"{kernel}|{key}"
        hit = self._chosen.get(full)
        if hit is not None:
            return hit["config"]
        with self._lock:
            if runtime.interpreting() or os.environ.get("MOESERVE_AUTOTUNE", "1") == "0":
                why = "interpreter" if runtime.interpreting() else "MOESERVE_AUTOTUNE=0"
                return self._settle(full, default, "heuristic", f"({why}, not timed)")
            cached = self._load_disk().get(full)
            if cached is not None and _covers(cached, candidates):
                return self._settle(full, cached["config"], "cache", f"from {self.path}")
            shipped = self._load_shipped().get(full)
            if shipped is not None and _covers(shipped, candidates):
                return self._settle(full, shipped["config"], "shipped", f"from {self._shipped_path}")
            if runtime.capturing():
                # Nothing can be timed inside a capture; do not memoise, so an eager call can still tune it.
                if full not in self._warned:
                    self._warned.add(full)
                    _report(f"{full}: NOT TUNED (first call is inside CUDA graph capture), heuristic {default}")
                return default
            return self._tune(full, candidates, run)

    def _tune(self, full: str, candidates: list[Config], run: Callable[[Config], object]) -> Config:
        import torch
        import triton.testing

        # The inputs may still be in flight on the caller's stream; timing runs on a side stream.
        torch.cuda.current_stream().synchronize()
        timings: list[tuple[float, Config]] = []
        failed: list[Config] = []
        for cfg in candidates:
            try:
                # Replayed from a CUDA graph: kernel time without Python launch overhead, as decode graphs run.
                ms = triton.testing.do_bench_cudagraph(lambda: run(cfg), rep=20, return_mode="median")
            except Exception as exc:  # a config the compiler rejects (shared memory, registers) is skipped
                _report(f"{full}: candidate {cfg} failed ({type(exc).__name__}: {str(exc)[:120]}), skipped")
                failed.append(cfg)
                continue
            if math.isfinite(ms):
                timings.append((ms, cfg))
        if not timings:
            raise RuntimeError(f"autotune {full}: every candidate config failed")
        timings.sort(key=lambda t: t[0])
        best_ms, best = timings[0]
        table = ", ".join(f"{_short(c)}={ms * 1e3:.1f}us" for ms, c in timings)
        self._save_disk(full, {"config": best, "ms": best_ms, "timings_ms": [[c, ms] for ms, c in timings],
                               "failed": failed})
        return self._settle(full, best, "tuned",
                            f"{best_ms * 1e3:.1f} us (graph replay median); tried {table}; saved to {self.path}")

    def _settle(self, full: str, config: Config, source: str, detail: str) -> Config:
        self._chosen[full] = {"config": dict(config), "source": source}
        _report(f"{full}: {_short(config)} [{source}] {detail}")
        return config

    def report(self) -> dict[str, dict]:
        """Every choice made in this process: full key -> {"config", "source"}."""
        return {k: dict(v) for k, v in self._chosen.items()}

    def stored(self, key: str) -> dict | None:
        """The entry under a full key, as written by `store` or a tuning, from the cache file or else the shipped
        one (None if absent)."""
        return self._load_disk().get(key) or self._load_shipped().get(key)

    def stored_in(self, key: str) -> Path:
        """The file that `stored(key)` reads."""
        return self.path if key in self._load_disk() else (self._shipped_path or shipped_path())

    def store(self, key: str, entry: dict) -> Path:
        """Write an entry under a full key into the cache file (merged with what other processes wrote); for
        choices measured outside `choose`, such as the engine's step token budget (engine/token_budget.py)."""
        with self._lock:
            self._save_disk(key, entry)
        return self.path

    def _load_disk(self) -> dict[str, dict]:
        if self._disk is None:
            self._disk = {}
            try:
                self._disk = json.loads(self.path.read_text()).get("entries", {})
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                _report(f"autotune cache {self.path} unreadable ({exc}); starting empty")
        return self._disk

    def _load_shipped(self) -> dict[str, dict]:
        if self._shipped is None:
            self._shipped = {}
            if self._shipped_path is None:
                self._shipped_path = shipped_path()
            try:
                self._shipped = json.loads(self._shipped_path.read_text()).get("entries", {})
            except FileNotFoundError:  # a card nobody tuned for
                pass
            except (OSError, ValueError) as exc:
                _report(f"shipped autotune file {self._shipped_path} unreadable ({exc}); ignored")
        return self._shipped

    def _save_disk(self, full: str, entry: dict) -> None:
        self._load_disk()[full] = entry
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            on_disk: dict[str, dict] = {}
            if path.exists():  # merge: another process may have tuned other keys meanwhile
                on_disk = json.loads(path.read_text()).get("entries", {})
            on_disk.update(self._disk)
            payload = {"gpu": runtime.gpu_name(), "entries": dict(sorted(on_disk.items()))}
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump(payload, f, indent=1)
            os.replace(f.name, path)
        except (OSError, ValueError) as exc:
            _report(f"autotune cache {path} not written ({exc}); the choice holds for this process only")


def _covers(entry: dict, candidates: list[Config]) -> bool:
    """Was this cache entry tuned over (at least) today's candidates? A candidate added since then, never timed
    and never seen to fail, makes the entry stale: it is tuned again rather than never tried."""
    seen = [c for c, _ in entry.get("timings_ms", [])] + list(entry.get("failed", []))
    return entry.get("config") in candidates and all(c in seen for c in candidates)


def _short(cfg: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


_TUNER: Autotuner | None = None


def get_tuner() -> Autotuner:
    global _TUNER
    if _TUNER is None:
        _TUNER = Autotuner()
    return _TUNER


def reset_tuner(path: Path | None = None, shipped: Path | None = None) -> Autotuner:
    """A fresh process-wide tuner (tests; or after changing MOESERVE_CACHE_DIR)."""
    global _TUNER
    _TUNER = Autotuner(path, shipped)
    return _TUNER
