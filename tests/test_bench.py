"""`moeserve bench serve`: its metrics against a stub server with known timings, goodput, the ramp's stop,
the CLI's JSON and plot, and one run against the real `moeserve serve`."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from bench_stub import StubServer

from moeserve.bench.client import RequestResult
from moeserve.bench.datasets import random_requests, shared_prefix_requests
from moeserve.bench.metrics import parse_goodput, summarize
from moeserve.bench.runner import Target, arrival_gaps, run_ramp, run_step
from moeserve.cli import main

TOL_MS = 30.0   # a shared 2-core CI box: event-loop and scheduling jitter, not the stub's


def test_metrics_definitions_on_known_results():
    # TTFT 100 ms, then 4 more tokens over 200 ms: TPOT 50 ms (the first token is excluded); one token: no TPOT.
    a = RequestResult(success=True, ttft=0.1, latency=0.3, itl=[0.05] * 4, output_tokens=5, prompt_tokens=7)
    b = RequestResult(success=True, ttft=0.5, latency=0.5, itl=[], output_tokens=1, prompt_tokens=3)
    c = RequestResult(success=False, error="HTTP 500")
    rep = summarize([a, b, c], duration_s=2.0, slo={"ttft": 200, "tpot": 60})
    assert rep["completed"] == 2 and rep["failed"] == 1 and rep["errors"] == ["HTTP 500"]
    assert rep["mean_tpot_ms"] == pytest.approx(50.0) and rep["median_ttft_ms"] == pytest.approx(300.0)
    assert rep["p99_e2el_ms"] == pytest.approx(float(np.percentile([300, 500], 99)))
    assert rep["median_itl_ms"] == pytest.approx(50.0)
    assert rep["request_throughput"] == pytest.approx(1.0)
    assert rep["output_throughput"] == pytest.approx(3.0) and rep["total_token_throughput"] == pytest.approx(8.0)
    assert rep["good_requests"] == 1 and rep["request_goodput"] == pytest.approx(0.5)   # b misses TTFT
    assert rep["slo_attainment"] == pytest.approx(1 / 3)                               # the failure counts


def test_goodput_flag_parsing():
    assert parse_goodput(["ttft:2000", "tpot:50"]) == {"ttft": 2000.0, "tpot": 50.0}
    for bad in (["ttft"], ["foo:1"], ["tpot:-3"], ["e2el:x"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_arrivals_and_datasets():
    gaps = np.array(arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=1))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)           # Poisson: CV 1
    even = np.array(arrival_gaps(20000, rate=4.0, burstiness=4.0, seed=1))
    assert even.std() / even.mean() == pytest.approx(0.5, rel=0.05)           # gamma shape 4: CV 1/2
    assert arrival_gaps(3, float("inf")) == [0.0, 0.0, 0.0]
    reqs = random_requests(200, 100, 20, range_ratio=0.5, seed=3)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert all(len(r.prompt.split()) == r.prompt_len for r in reqs)
    assert len({r.prompt_len for r in random_requests(50, 100, 20, seed=3)}) == 1
    shared = shared_prefix_requests(6, 40, 10, 8, num_prefixes=2)
    assert shared[0].prompt.split()[:40] == shared[2].prompt.split()[:40] != shared[1].prompt.split()[:40]


def test_timings_equal_the_stubs():
    with StubServer(ttft_s=0.1, itl_s=0.02) as stub:
        target = Target(base_url=stub.base_url, model="stub")
        rep = asyncio.run(run_step(target, random_requests(8, 20, 10), max_concurrency=4, progress=False))
        assert stub.requests[0]["stream"] and stub.requests[0]["stream_options"] == {"include_usage": True}
        assert stub.requests[0]["max_tokens"] == 10
    assert rep["completed"] == 8 and rep["failed"] == 0
    assert rep["usage_from_server"] and rep["total_output_tokens"] == 80
    assert rep["mean_ttft_ms"] == pytest.approx(100, abs=TOL_MS)
    assert rep["median_tpot_ms"] == pytest.approx(20, abs=5)
    assert rep["median_itl_ms"] == pytest.approx(20, abs=5)
    assert rep["mean_e2el_ms"] == pytest.approx(100 + 9 * 20, abs=TOL_MS + 10)
    # 8 requests, 4 at a time, 0.28 s each: two waves
    assert rep["request_throughput"] == pytest.approx(8 / 0.56, rel=0.25)


def test_goodput_counts_exactly_the_requests_under_the_slo(tmp_path):
    rows = ([{"prompt": "fast"}] * 3 + [{"prompt": "slow first token ttft=0.4"}] * 2
            + [{"prompt": "slow tokens itl=0.09"}] * 2 + [{"prompt": "one token ttft=0.4", "max_tokens": 1}])
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "result.json"
    with StubServer(ttft_s=0.05, itl_s=0.01) as stub:
        rc = main(["bench", "serve", "--base-url", stub.base_url, "--endpoint", "completions", "--dataset", "jsonl",
                   "--dataset-path", str(path), "--num-prompts", "8", "--output-len", "5",
                   "--goodput", "ttft:250", "tpot:50", "--save-result", str(out), "--no-progress"])
        assert stub.requests[0]["model"] == "stub"           # from GET /v1/models
        assert "prompt" in stub.requests[0]
    assert rc == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["completed"] == 8 and step["good_requests"] == 3
    assert step["slo_attainment"] == pytest.approx(3 / 8)
    assert step["request_goodput"] == pytest.approx(3 / step["duration_s"])
    assert step["request_rate"] == "inf"


def test_ramp_stops_where_the_latency_collapses():
    # One request at a time, 0.06 s each: about 16 req/s at most. At 5 req/s TTFT stays near 30 ms; at 200 req/s
    # the queue makes most TTFTs pass 150 ms, and the ramp never reaches 400.
    with StubServer(ttft_s=0.03, itl_s=0.01, capacity=1) as stub:
        target = Target(base_url=stub.base_url, model="stub")
        out = asyncio.run(run_ramp(target, lambda i: random_requests(12, 10, 4, seed=i), [5, 200, 400],
                                   slo={"ttft": 150}, progress=False, seed=7))
        sent = len(stub.requests)
    assert [s["request_rate"] for s in out["steps"]] == [5, 200]
    assert out["stopped_at"] == 200 and sent == 24
    assert out["steps"][0]["slo_attainment"] >= 0.75 > 0.5 > out["steps"][1]["slo_attainment"]


def test_cli_ramp_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "ramp.json", tmp_path / "ramp.png"
    with StubServer(ttft_s=0.02, itl_s=0.005) as stub:
        rc = main(["bench", "serve", "--base-url", stub.base_url, "--model", "stub", "--ramp", "20,40",
                   "--num-prompts", "6", "--input-len", "8", "--output-len", "4", "--goodput", "ttft:1000",
                   "--save-result", str(out), "--plot", str(png), "--no-progress", "--seed", "1"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [s["request_rate"] for s in result["steps"]] == [20, 40] and result["stopped_at"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "Median TTFT (ms):" in text and "P99 TPOT (ms):" in text and "every step kept" in text


def test_against_the_real_server(tmp_path):
    from tiny_checkpoints import make_tiny_checkpoint

    from moeserve.server.process import ServerProcess

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM", max_position_embeddings=512)
    out = tmp_path / "real.json"
    with ServerProcess([ckpt, "--device", "cpu", "--served-model-name", "tiny", "--api-key", "k"]) as s:
        rc = main(["bench", "serve", "--base-url", s.base_url, "--api-key", "k", "--num-prompts", "6",
                   "--max-concurrency", "3", "--input-len", "16", "--output-len", "8", "--ignore-eos",
                   "--goodput", "ttft:60000", "--save-result", str(out), "--no-progress"])
    assert rc == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["completed"] == 6 and step["failed"] == 0, step["errors"]
    assert step["usage_from_server"] and step["total_output_tokens"] == 6 * 8
    assert step["total_input_tokens"] > 0 and step["mean_ttft_ms"] > 0 and step["mean_tpot_ms"] > 0


def test_bench_imports_no_engine_code():
    import subprocess
    import sys

    code = ("import sys, moeserve.bench.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('moeserve.') "
            "and not m.startswith('moeserve.bench'))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
