"""engine/host_memory: a CPU engine hands the heap's free pages back after loading, after prefill steps and every 32nd step."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeserve.engine import host_memory

REPO = Path(__file__).resolve().parents[1]
# Blocks of a few MB, each with a small survivor after it, then all the blocks freed (a GGUF load's decode
# temporaries); the first large free has already raised glibc's dynamic threshold. Prints the RSS left, in MB.
PROBE = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from moeserve.engine import host_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
warm = np.ones(8 << 20, dtype=np.uint8); del warm
before = rss()
blocks, survivors = [], []
for _ in range(40):
    blocks.append(np.ones(3 << 20, dtype=np.uint8))
    survivors.append(np.ones(64, dtype=np.uint8).copy())
del blocks
if {trimmed}:
    host_memory.trim()
print(rss() - before)
"""


def _left_mb(trimmed: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), trimmed=trimmed)], capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_between_survivors_leave_the_process_after_trim():
    trimmed, kept = _left_mb(trimmed=True), _left_mb(trimmed=False)
    assert trimmed < 2  # 120 MB were allocated and freed
    assert kept > trimmed + 5  # what glibc keeps on its own (12 MB here): why the engine trims



class _Runner:
    def execute(self, step, prev_tokens):
        return "logits"


def _worker(device: str):
    from moeserve.engine.worker import Worker

    w = object.__new__(Worker)  # only what execute reads: no model is loaded
    w.device, w.runner, w.cpu_steps = torch.device(device), _Runner(), 0
    return w


def _steps(w, steps) -> list[int]:
    """The 1-based indices of the steps after which the heap was trimmed."""
    from moeserve.engine.step import StepInput

    trimmed = []
    for i, num_tokens in enumerate(steps, 1):
        before = len(_TRIMS)
        assert w.execute(StepInput(req_ids=[str(j) for j in range(len(num_tokens))], num_tokens=num_tokens),
                         None) == "logits"
        if len(_TRIMS) > before:
            trimmed.append(i)
    return trimmed


_TRIMS: list[int] = []


@pytest.fixture
def counted(monkeypatch):
    _TRIMS.clear()
    monkeypatch.setattr(host_memory, "trim", lambda: _TRIMS.append(1))


def test_cpu_steps_trim_after_prefills_and_every_32nd_step(counted):
    from moeserve.engine.worker import TRIM_EVERY_STEPS

    assert TRIM_EVERY_STEPS == 32
    # a prefill of 30 tokens, 70 decode steps of 16 rows, a mixed step (one prefill chunk among decodes), 30 more
    steps = [[30]] + [[1] * 16] * 70 + [[1, 1, 7]] + [[1] * 3] * 30
    assert _steps(_worker("cpu"), steps) == [1, 32, 64, 72, 96]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_steps_never_trim(counted, device):
    w = _worker(device)
    assert _steps(w, [[30]] + [[1] * 16] * 70 + [[1, 1, 7]]) == []
    assert w.cpu_steps == 0


def test_a_cpu_engine_trims_after_its_prefill_steps(monkeypatch, tmp_path):
    from tiny_checkpoints import make_tiny_checkpoint

    from moeserve import LLM, SamplingParams
    from moeserve.engine import worker

    llm = LLM(model=make_tiny_checkpoint(tmp_path, "LlamaForCausalLM"), device="cpu")
    prefills, trims = [], []
    execute = worker.Worker.execute

    def counting(self, step, *a):
        prefills.append(sum(step.num_tokens) > len(step.num_tokens))
        return execute(self, step, *a)

    monkeypatch.setattr(worker.Worker, "execute", counting)
    monkeypatch.setattr(host_memory, "trim", lambda: trims.append(1))
    llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}],
                 SamplingParams(temperature=0, max_tokens=5))
    assert len(prefills) >= 5 and any(prefills) and len(trims) == sum(prefills)


def test_the_c_library_is_looked_up_once(monkeypatch):
    host_memory.trim()

    def no_subprocess(*a, **k):
        raise AssertionError("trim spawned a process")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(ctypes.util, "find_library", no_subprocess)
    for _ in range(3):
        host_memory.trim()
    assert host_memory._malloc_trim.cache_info().misses <= 1
