"""engine/host_memory: a CPU engine hands the heap's free pages back after loading, after prefill steps and every 32nd
step, and caps the kernel caches of its bf16 matmuls."""

from __future__ import annotations

import ctypes.util
import json
import os
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


def test_kernel_caches_are_capped_unless_the_user_set_them(monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    host_memory.bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == "32"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "7")  # oneDNN's older name counts as the user's choice
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")
    host_memory.bound_kernel_caches()
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ and os.environ["LRU_CACHE_CAPACITY"] == "5"


def test_a_cpu_engine_caps_the_kernel_caches_before_loading(monkeypatch, tmp_path):
    from tiny_checkpoints import make_tiny_checkpoint

    from moeserve import LLM
    from moeserve.engine import worker

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    load_model = worker.load_model
    monkeypatch.setattr(worker, "load_model", lambda *a: seen.append(os.environ.get("LRU_CACHE_CAPACITY")) or
                        load_model(*a))
    LLM(model=make_tiny_checkpoint(tmp_path, "LlamaForCausalLM"), device="cpu")
    assert seen == ["32"] and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"


# bf16 matmuls of 60 row counts in a fresh process; prints the RSS they left, in MB
KERNELS = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, torch.nn.functional as F
if {bounded}:
    from moeserve.engine import host_memory
    host_memory.bound_kernel_caches(4)
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = [torch.randn(n, k).to(torch.bfloat16) for n, k in ((960, 576), (3072, 576))]
def run(m):
    for x in w:
        F.linear(torch.ones(m, x.shape[1], dtype=torch.bfloat16), x)
for m in range(5, 9):
    run(m)
before = rss()
for m in range(10, 70):
    run(m)
print(rss() - before)
"""


def _kernels_mb(bounded: bool) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", KERNELS.format(repo=str(REPO), bounded=bounded)], capture_output=True,
                         text=True, timeout=300, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux", reason="RSS from /proc")
def test_capped_kernel_caches_stop_growing_with_new_row_counts():
    unbounded = _kernels_mb(bounded=False)
    if unbounded < 10:
        pytest.skip(f"this CPU's bf16 matmuls keep no kernel per shape ({unbounded:.1f} MB for 120 shapes)")
    assert _kernels_mb(bounded=True) < unbounded / 3


def test_reproducible_mkl_is_asked_for_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    host_memory.reproducible_mkl()
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    host_memory.reproducible_mkl()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"


# The default model's first-token logprobs after a history of SDPA calls of seeded random shapes; prints them
HISTORY = """
import json, random, sys
sys.path.insert(0, {repo!r})
import torch
rnd = random.Random({seed})
for _ in range(40):
    q = torch.randn(1, 3, rnd.randint(1, 64), 64)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
from moeserve import LLM, SamplingParams
llm = LLM(max_model_len=128, kv_cache_memory_bytes=16 << 20)
text = llm.get_tokenizer().apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                                               tokenize=False, add_generation_prompt=True)
out = llm.generate([text], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
print(json.dumps({{str(k): v.logprob for k, v in out.logprobs[0].items()}}))
"""


def _logprobs_after_history(seed: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", HISTORY.format(repo=str(REPO), seed=seed)], capture_output=True,
                         text=True, timeout=300, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cpu_engine_answers_the_same_whatever_ran_before_it():
    """Seeds 1 and 2 gave different logprobs (and first tokens) of the default model on the 2-core Xeon this was
    found on, at times: the race in MKL's vector math that host_memory.settle_mkl_vml closes (the first VML call
    was the rotary cos table, made by two threads)."""
    assert _logprobs_after_history(1) == _logprobs_after_history(2)


# A CPU engine of a tiny checkpoint, built in a fresh process: MKL VML's detected CPU type (-1: not yet) at the
# start and when the engine loads its model, before any forward; prints them as JSON, or why they cannot be read.
VML_TYPE = """
import ctypes, json, os, sys
sys.path.insert(0, {repo!r})
import torch
try:
    fn = ctypes.cast(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                     .mkl_vml_serv_cpu_detect, ctypes.c_void_p).value
except (OSError, AttributeError) as e:
    sys.exit(print(json.dumps({{"skip": f"no MKL VML in this torch: {{e}}"}})))
code = ctypes.string_at(fn, 6)
if code[:2] != b"\\x8b\\x05":  # mov disp32(%rip), %eax: the cached type, the function's first load
    sys.exit(print(json.dumps({{"skip": f"mkl_vml_serv_cpu_detect starts {{code.hex()}} in this MKL"}})))
cpu_type = ctypes.c_int.from_address(fn + 6 + int.from_bytes(code[2:], "little", signed=True))
seen = {{"start": cpu_type.value}}
from moeserve import LLM
from moeserve.engine import worker
load_model = worker.load_model
def loading(*a):
    seen["at_load"] = cpu_type.value
    return load_model(*a)
worker.load_model = loading
LLM(model={model!r}, device="cpu")
print(json.dumps(seen))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="MKL's VML on x86-64")
def test_an_engine_lets_mkl_vml_pick_its_kernels_in_one_thread_before_its_model(tmp_path):
    """MKL's VML picks its kernels on its first call from a CPU type it caches, and a second thread racing that
    first call can take the low-accuracy kernel (host_memory.settle_mkl_vml). The default model's rotary cos table
    was that first call, from two threads: ~1 in 5 test-suite runs flipped its first token. An engine makes the
    first call itself, in one thread, before it loads a model."""
    from tiny_checkpoints import make_tiny_checkpoint

    script = VML_TYPE.format(repo=str(REPO), model=make_tiny_checkpoint(tmp_path, "LlamaForCausalLM"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in seen:
        pytest.skip(seen["skip"])
    assert seen["start"] == -1  # nothing had called VML yet: the engine's own call is what settles it
    assert seen["at_load"] != -1, seen
