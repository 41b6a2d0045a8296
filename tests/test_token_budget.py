"""The step's token budget chosen by measurement (engine/token_budget.py): the choice as a pure function of the
measurements, the cache entry, and the engine path with the measurements injected (no timing on the CPU)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.config import EngineConfig
from moeserve.engine import token_budget as tb
from moeserve.engine.engine import LLMEngine
from moeserve.engine.worker import Worker
from moeserve.kernels.autotune import reset_tuner
from moeserve.server.metrics import ServerMetrics

FLOOR = 256  # max_num_seqs


# -- candidates --
def test_candidates_are_powers_of_two_within_the_range_and_the_largest_step():
    assert tb.candidates(256, 32768) == [2048, 4096, 8192, 16384]
    assert tb.candidates(3000, 32768) == [4096, 8192, 16384]  # never below max_num_seqs
    assert tb.candidates(4, 1024) == [2048, 4096]  # never above max_num_seqs x max_model_len
    assert tb.candidates(4, 256) == []  # the largest step is below the range: nothing to choose
    assert tb.candidates(20000, 4096) == []  # max_num_seqs above the range


# -- choose: measurements -> budget --
def test_one_candidate_is_the_choice():
    assert tb.choose({4096: 1.0e5}, floor=FLOOR) == 4096


def test_flat_curve_takes_the_smallest():
    assert tb.choose({2048: 1.00e5, 4096: 1.02e5, 8192: 0.99e5, 16384: 1.01e5}, floor=FLOOR) == 2048


def test_rising_curve_takes_the_knee():
    tps = {2048: 50e3, 4096: 80e3, 8192: 95e3, 16384: 100e3}
    assert tb.choose(tps, floor=FLOOR) == 8192  # 95k >= 90% of 100k; 80k is not
    assert tb.choose(tps, floor=FLOOR, tolerance=0.25) == 4096


def test_noisy_non_monotonic_curve_is_held_against_the_best_not_the_largest():
    # 8192 dips below 4096; the best is 16384, and 4096 is within 10% of it
    assert tb.choose({2048: 100e3, 4096: 150e3, 8192: 140e3, 16384: 155e3}, floor=FLOOR) == 4096
    # the best in the middle, the largest budget slower: still the smallest near the best
    assert tb.choose({2048: 100e3, 4096: 120e3, 8192: 150e3, 16384: 110e3}, floor=FLOOR) == 8192
    # a fast outlier at the small end is taken: it is as fast as any
    assert tb.choose({2048: 148e3, 4096: 90e3, 8192: 150e3}, floor=FLOOR) == 2048


def test_floor_and_cap_bound_the_choice():
    tps = {2048: 60e3, 4096: 80e3, 8192: 95e3, 16384: 100e3}
    assert tb.choose(tps, floor=4096, cap=8192) == 8192  # the best within [floor, cap] is 95k
    assert tb.choose(tps, floor=FLOOR, cap=4096) == 4096
    assert tb.choose({2048: 60e3, 4096: 100e3}, floor=3000) == 4096  # a candidate below the floor is ignored


def test_cap_below_max_num_seqs_falls_back_to_max_num_seqs():
    tps = {2048: 60e3, 4096: 80e3, 8192: 95e3}
    assert tb.choose(tps, floor=4096, cap=2048) == 4096
    assert tb.choose(tps, floor=FLOOR, cap=0) == FLOOR  # memory_cap found none that fits
    assert tb.choose({}, floor=FLOOR) == FLOOR


def test_unusable_measurements_are_ignored():
    assert tb.choose({2048: math.nan, 4096: 0.0, 8192: 90e3, 16384: math.inf}, floor=FLOOR) == 8192


def test_memory_cap():
    left = {2048: 10 << 30, 4096: 9 << 30, 8192: 8 << 30}  # 16384 ran out of memory: absent
    assert tb.memory_cap(left, 9 << 30) == 4096
    assert tb.memory_cap(left, 1) == 8192
    assert tb.memory_cap(left, 11 << 30) == 0
    assert tb.memory_cap({}, 1) == 0


# -- the cache entry --
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    reset_tuner()
    yield tmp_path
    monkeypatch.delenv("MOESERVE_CACHE_DIR")
    reset_tuner()


def test_cache_round_trip_in_the_autotune_file(cache_dir):
    cfg = EngineConfig(max_num_seqs=8)
    hf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "_name_or_path": "/a"}
    key = tb.cache_key(hf, cfg, "bfloat16", 4096)
    assert key == tb.cache_key({**hf, "_name_or_path": "/b", "transformers_version": "9"}, cfg, "bfloat16", 4096)
    assert key != tb.cache_key({**hf, "hidden_size": 128}, cfg, "bfloat16", 4096)
    assert key != tb.cache_key(hf, EngineConfig(max_num_seqs=16), "bfloat16", 4096)
    assert key != tb.cache_key(hf, cfg, "bfloat16", 8192)
    assert tb.cached(key, [2048, 4096]) is None
    entry = {"config": {"max_num_batched_tokens": 4096}, "candidates": [2048, 4096], "cap": 4096,
             "tokens_per_s": [[2048, 1.0], [4096, 2.0]]}
    path = tb.save(key, entry)
    assert path.startswith(str(cache_dir / "autotune"))
    assert json.loads(open(path).read())["entries"][key] == entry
    reset_tuner()  # a later process reads it from disk
    assert tb.cached(key, [2048, 4096]) == entry
    assert tb.cached(key, [2048, 4096, 8192]) is None  # measured over other candidates: measure again
    assert "max_num_batched_tokens=4096" in tb.describe(entry, 4096) and "2048=1, 4096=2;" in tb.describe(entry, 4096)


# -- the engine path, measurements injected --
@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.fixture
def measured(cache_dir, monkeypatch):
    """The CPU engine takes the measuring path (as CUDA with one rank does) over candidates 16..128, and its
    measurements are `fake`: tokens/s and KV bytes left per budget; `calls` lists the candidates of each call."""
    m = SimpleNamespace(calls=[], fake={16: (50.0, 10**9), 32: (60.0, 10**9), 64: (70.0, 10**9), 128: (75.0, 10**9)})

    def measure(self, cands):
        m.calls.append(list(cands))
        return {t: m.fake[t] for t in cands}

    monkeypatch.setattr(tb, "wanted", lambda config, device_type: config.max_num_batched_tokens is None)
    monkeypatch.setattr(tb, "CANDIDATES", (16, 128))
    monkeypatch.setattr(Worker, "measure_prefill", measure)
    return m


KW = dict(device="cpu", max_model_len=64, max_num_seqs=4, block_size=8)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_engine_measures_uses_the_choice_and_caches_it(path, measured):
    llm = LLM(model=path, usage="server", **KW)
    eng = llm.llm_engine
    assert measured.calls == [[16, 32, 64, 128]]
    # 75 is the best; 70 >= 67.5 is within 10% of it, 60 is not
    assert eng.max_num_batched_tokens == eng.scheduler.max_num_batched_tokens == eng.runner.max_tokens == 64
    assert eng.batched_tokens_source == "measured"
    info = eng.config_info()["scheduler_config_info"]
    assert (info["max_num_batched_tokens"], info["max_num_batched_tokens_source"]) == ("64", "measured")
    mem = eng.memory_report()  # what the benchmark workers record beside their figures
    assert (mem["max_num_batched_tokens"], mem["max_num_batched_tokens_source"]) == (64, "measured")
    body, _ = ServerMetrics(eng.get_stats, "m", config_info=eng.config_info()).render()  # what /metrics shows
    fam = {f.name: f for f in text_string_to_metric_families(body.decode())}["moeserve:scheduler_config_info"]
    assert fam.samples[0].labels["max_num_batched_tokens"] == "64"
    out = llm.generate({"prompt_token_ids": list(range(5, 55))}, GREEDY)  # 50 prompt tokens: within one step
    assert len(out[0].outputs[0].token_ids) == 4

    reset_tuner()  # a restart: the cache answers, nothing is measured
    again = LLM(model=path, usage="server", **KW).llm_engine
    assert measured.calls == [[16, 32, 64, 128]]
    assert (again.max_num_batched_tokens, again.batched_tokens_source) == (64, "cache")

    flag = LLM(model=path, max_num_batched_tokens=32, **KW).llm_engine  # the user's value: no measuring
    assert measured.calls == [[16, 32, 64, 128]]
    assert (flag.max_num_batched_tokens, flag.batched_tokens_source) == (32, "flag")
    assert flag.config_info()["scheduler_config_info"]["max_num_batched_tokens_source"] == "flag"


def test_offline_takes_the_fastest_budget_a_server_the_knee(path, measured):
    """LLM(...) is a batch job (usage offline, as vLLM's LLM class): the budget within THROUGHPUT_TOLERANCE of the
    best tokens/s, here the best itself (70 is 7% below 75); a server (usage server) the knee (70 is within 10%).
    One measurement in the cache serves both: the second engine measures nothing."""
    offline = LLM(model=path, **KW).llm_engine
    assert offline.config.usage == "offline"
    assert (offline.max_num_batched_tokens, offline.batched_tokens_source) == (128, "measured")
    assert offline.scheduler.max_num_batched_tokens == offline.runner.max_tokens == 128
    server = LLMEngine.from_engine_args(model=path, **KW)  # what `moeserve serve` builds
    assert server.config.usage == "server"
    assert (server.max_num_batched_tokens, server.batched_tokens_source) == (64, "cache")
    assert measured.calls == [[16, 32, 64, 128]]
    with pytest.raises(ValueError, match="usage"):
        EngineConfig(usage="batch")


def test_engine_caps_the_budget_by_kv_memory(path, measured):
    # 128 is by far the fastest, but its activations leave the KV cache half of what 16 leaves (KV_KEEP is 90%)
    measured.fake.update({16: (50.0, 10**9), 32: (60.0, 10**9), 64: (70.0, 95 * 10**7), 128: (200.0, 5 * 10**8)})
    eng = LLM(model=path, **KW).llm_engine
    assert eng.max_num_batched_tokens == 64
    entry = tb.cached(tb.cache_key(eng.hf_config, eng.config, "float32", 64), [16, 32, 64, 128])
    assert entry["cap"] == 64 and entry["config"] == {"max_num_batched_tokens": 64}


def test_cpu_default_is_unchanged(path, cache_dir, monkeypatch):
    monkeypatch.delenv("MOESERVE_AUTOTUNE", raising=False)
    eng = LLM(model=path, **KW).llm_engine  # on the CPU nothing is measured
    assert (eng.max_num_batched_tokens, eng.batched_tokens_source) == (8192, "default")
    assert not tb.wanted(eng.config, "cpu")
    assert tb.wanted(eng.config, "cuda")
    assert not tb.wanted(EngineConfig(max_num_batched_tokens=4096), "cuda")
    assert not tb.wanted(EngineConfig(enable_chunked_prefill=False), "cuda")
    assert not tb.wanted(EngineConfig(tensor_parallel_size=2), "cuda")
