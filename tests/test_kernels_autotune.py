"""The autotuner: times candidates, keeps the fastest, caches it on disk per GPU, and reports every choice."""

from __future__ import annotations

import json
import logging

import pytest
import triton_kernels  # noqa: F401  first: without a GPU it sets up the interpreter before triton is imported

pytest.importorskip("triton")
import triton.testing  # noqa: E402

from moeserve.kernels import autotune, runtime  # noqa: E402

def _take(caplog) -> str:
    text = caplog.text
    caplog.clear()
    return text


CANDIDATES = [{"BLOCK": 16}, {"BLOCK": 32}, {"BLOCK": 64}]
FAKE_MS = {16: 0.30, 32: 0.10, 64: 0.20}


@pytest.fixture
def gpu_like(monkeypatch, tmp_path, caplog):
    """Pretend to be on a GPU outside graph capture, with a fake timer: time depends on the config only."""
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOESERVE_AUTOTUNE", raising=False)
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "capturing", lambda: False)
    monkeypatch.setattr(runtime, "gpu_slug", lambda device=None: "Fake_GPU")
    monkeypatch.setattr(runtime, "gpu_name", lambda device=None: "Fake GPU")
    import torch

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"synchronize": lambda self: None})())
    caplog.set_level(logging.INFO, logger="moeserve.kernels.autotune")

    def fake_bench(fn, rep=20, return_mode="median"):
        return FAKE_MS[fn()]

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_bench)
    return tmp_path


def test_tunes_once_caches_on_disk_and_reports(gpu_like, caplog):
    tmp_path = gpu_like
    runs: list[int] = []

    def run(cfg):
        runs.append(cfg["BLOCK"])
        return cfg["BLOCK"]

    tuner = autotune.Autotuner()
    assert tuner.choose("k", "T=8", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 32}
    assert sorted(runs) == [16, 32, 64]
    err = _take(caplog)
    assert "k|T=8: BLOCK=32 [tuned]" in err and "BLOCK=16=300.0us" in err
    path = tmp_path / "autotune" / "Fake_GPU.json"
    entry = json.loads(path.read_text())["entries"]["k|T=8"]
    assert entry["config"] == {"BLOCK": 32}

    runs.clear()  # same process: memoised, silent
    assert tuner.choose("k", "T=8", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 32}
    assert runs == [] and _take(caplog) == ""

    fresh = autotune.Autotuner()  # a new process: read from disk, reported as such, nothing timed
    assert fresh.choose("k", "T=8", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 32}
    assert runs == [] and "[cache]" in _take(caplog)
    assert fresh.report() == {"k|T=8": {"config": {"BLOCK": 32}, "source": "cache"}}


def test_failing_candidate_is_skipped_and_stale_cache_ignored(gpu_like, caplog):
    tmp_path = gpu_like
    path = tmp_path / "autotune" / "Fake_GPU.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"entries": {"k|T=1": {"config": {"BLOCK": 128}}}}))  # no longer a candidate

    def run(cfg):
        if cfg["BLOCK"] == 32:
            raise RuntimeError("out of shared memory")
        return cfg["BLOCK"]

    assert autotune.Autotuner().choose("k", "T=1", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 64}
    err = _take(caplog)
    assert "failed (RuntimeError" in err and "[tuned]" in err


def test_a_candidate_added_since_tuning_is_tried_a_failed_one_is_not_retried(gpu_like, caplog):
    runs: list[int] = []

    def run(cfg):
        runs.append(cfg["BLOCK"])
        if cfg["BLOCK"] == 128:
            raise RuntimeError("out of shared memory")
        return cfg["BLOCK"]

    autotune.Autotuner().choose("k", "T=8", CANDIDATES[:2], run, CANDIDATES[0])  # tuned over 16 and 32
    runs.clear()
    grown = CANDIDATES + [{"BLOCK": 128}]
    assert autotune.Autotuner().choose("k", "T=8", grown, run, grown[0]) == {"BLOCK": 32}
    assert sorted(runs) == [16, 32, 64, 128] and "[tuned]" in _take(caplog)  # 64 and 128 are new: tuned again
    runs.clear()
    assert autotune.Autotuner().choose("k", "T=8", grown, run, grown[0]) == {"BLOCK": 32}
    assert runs == [] and "[cache]" in _take(caplog)  # 128 failed last time: known, not a reason to retune


def test_shipped_choices_are_used_below_the_users_cache_and_retuned_when_stale(gpu_like, tmp_path_factory, caplog):
    """A card the package ships choices for (moeserve/kernels/tuned/<gpu>.json) times nothing at a first start for
    the shapes it covers; the user's own cache wins over it; a shipped entry that never saw one of today's
    candidates is tuned again, and the new choice goes to the user's cache, never into the package."""
    shipped = tmp_path_factory.mktemp("pkg") / "Fake_GPU.json"
    timed = [[c, FAKE_MS[c["BLOCK"]]] for c in CANDIDATES]
    shipped.write_text(json.dumps({"entries": {
        "k|T=8": {"config": {"BLOCK": 64}, "timings_ms": timed},  # not the fake timer's best: proves it was read
        "k|T=16": {"config": {"BLOCK": 16}, "timings_ms": timed[:2]},  # 64 never timed: stale
        "budget|x": {"config": {"n": 7}}}}))
    runs: list[int] = []

    def run(cfg):
        runs.append(cfg["BLOCK"])
        return cfg["BLOCK"]

    tuner = autotune.Autotuner(shipped=shipped)
    assert tuner.choose("k", "T=8", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 64}
    assert runs == [] and "k|T=8: BLOCK=64 [shipped]" in _take(caplog)
    assert tuner.choose("k", "T=16", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 32}
    assert sorted(runs) == [16, 32, 64] and "[tuned]" in _take(caplog)
    assert tuner.stored("budget|x") == {"config": {"n": 7}} and tuner.stored_in("budget|x") == shipped
    user = gpu_like / "autotune" / "Fake_GPU.json"
    assert tuner.stored_in("k|T=16") == user
    assert "k|T=8" not in json.loads(user.read_text())["entries"]  # shipped choices are not copied over
    assert json.loads(shipped.read_text())["entries"]["k|T=16"]["config"] == {"BLOCK": 16}  # package untouched

    user.write_text(json.dumps({"entries": {"k|T=8": {"config": {"BLOCK": 16}, "timings_ms": timed}}}))
    runs.clear()
    assert autotune.Autotuner(shipped=shipped).choose("k", "T=8", CANDIDATES, run, CANDIDATES[0]) == {"BLOCK": 16}
    assert runs == [] and "[cache]" in _take(caplog)


def test_the_package_ships_choices_for_the_cards_it_is_measured_on():
    for slug in ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3"):
        entries = json.loads(autotune.shipped_path(slug).read_text())["entries"]
        assert any(k.startswith("fused_moe|") for k in entries) and all("config" in e for e in entries.values())


def test_no_timing_inside_graph_capture(gpu_like, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "capturing", lambda: True)
    tuner = autotune.Autotuner()
    got = tuner.choose("k", "T=2", CANDIDATES, lambda c: pytest.fail("timed during capture"), CANDIDATES[2])
    assert got == CANDIDATES[2]
    assert "NOT TUNED" in _take(caplog)
    assert tuner.report() == {}  # not memoised: an eager call later still tunes it


def test_disabled_or_interpreted_uses_reported_heuristic(gpu_like, monkeypatch, caplog):
    monkeypatch.setenv("MOESERVE_AUTOTUNE", "0")
    tuner = autotune.Autotuner()
    assert tuner.choose("k", "T=4", CANDIDATES, lambda c: pytest.fail("timed"), CANDIDATES[1]) == CANDIDATES[1]
    assert "[heuristic] (MOESERVE_AUTOTUNE=0" in _take(caplog)


def test_buckets_and_cache_path(monkeypatch, tmp_path):
    assert [autotune.bucket(n) for n in (1, 2, 3, 5, 8, 9000)] == [1, 2, 4, 8, 8, 16384]
    assert autotune.bucket(50000, cap=16384) == 16384
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    assert autotune.cache_path("NVIDIA_H100") == tmp_path / "autotune" / "NVIDIA_H100.json"
    monkeypatch.delenv("MOESERVE_CACHE_DIR")
    assert str(autotune.cache_path("X")).endswith(".cache/moeserve/autotune/X.json")


def test_decode_kernels_are_timed_on_long_contexts_on_distinct_pages():
    """The decode kernels' tuning inputs: every sequence DECODE_TUNING_CONTEXT tokens (or what its table row
    holds) on pages no other sequence reads, wrapping around a small pool; the real tensors are left alone."""
    import torch

    from moeserve.kernels.autotune import DECODE_TUNING_CONTEXT, decode_tuning_inputs

    lens = torch.ones(3, dtype=torch.int32)
    tables = torch.zeros(3, 1000, dtype=torch.int32)
    t_lens, t_tables = decode_tuning_inputs(lens, tables, page=16, num_blocks=10_000)
    n = DECODE_TUNING_CONTEXT // 16
    assert t_lens.tolist() == [DECODE_TUNING_CONTEXT] * 3 and t_lens.dtype == lens.dtype
    used = t_tables[:, :n]
    assert used.unique().numel() == 3 * n  # no page read twice
    assert lens.tolist() == [1, 1, 1] and int(tables.abs().sum()) == 0
    # a table row too short for the context caps it; a small pool wraps around
    s_lens, s_tables = decode_tuning_inputs(lens, tables[:, :8], page=16, num_blocks=5)
    assert s_lens.tolist() == [128] * 3 and int(s_tables.max()) == 4 and s_tables.shape == (3, 8)
