"""run_vllm.py against a stand-in of vLLM's offline API (tests/fake_site/vllm), on the CPU: the same prompts as
moeserve's workloads, the engine arguments, the result schema, and merging into a suite result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PEER = HERE.parent
BENCH = PEER.parents[1]
FAKE_SITE = HERE / "fake_site"
sys.path.insert(0, str(BENCH))

from results_io import validate  # noqa: E402
from workloads import LatencySpec, ThroughputSpec, latency_prompts, throughput_prompts  # noqa: E402

SMALL = ["--num-requests", "6", "--input-len", "16", "--output-len", "5", "--latency-batches", "1,2",
         "--latency-input-len", "8", "--latency-output-len", "4", "--latency-repeats", "2"]


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 500,
           "auto_map": {"AutoConfig": "x.Y"}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _run(args, tmp_path, extra_env=None):
    env = {**os.environ, "FAKE_VLLM_LOG": str(tmp_path / "calls.jsonl"), **(extra_env or {})}
    env.pop("VLLM_SITE", None)
    return subprocess.run([sys.executable, str(PEER / "run_vllm.py"), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _calls(tmp_path):
    return [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_worker_runs_the_same_prompts_as_moeserve_and_writes_the_suite_schema(tmp_path, model_dir):
    out = tmp_path / "vllm.json"
    r = _run(["--model", str(model_dir), "--out", str(out), "--allow-cpu", "--site", str(FAKE_SITE), *SMALL], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["status"] == "done" and res["engine"] == "vllm" and res["version"] == "0.26.0"
    args = res["engine_args"]
    assert args["load_format"] == "dummy" and args["dtype"] == "bfloat16" and args["seed"] == 0
    assert args["max_num_seqs"] == 256 and args["gpu_memory_utilization"] == 0.9
    assert args["max_model_len"] == 16 + 5  # the longest workload, as moeserve's worker sets it
    assert any("dropped auto_map" in n for n in res["notes"])

    calls = _calls(tmp_path)
    tp = ThroughputSpec(num_requests=6, input_len=16, output_len=5)
    lat = LatencySpec(batch_sizes=(1, 2), input_len=8, output_len=4, repeats=2)
    through = [c for c in calls if len(c["prompts"]) == 6]
    assert len(through) == 1 and through[0]["prompts"] == throughput_prompts(tp, 500)
    assert through[0]["max_tokens"] == 5
    for b in (1, 2):
        for rep in (0, 1):
            assert {"prompts": latency_prompts(lat, b, rep, 500), "max_tokens": 4} in calls

    t = res["throughput"]
    assert t["num_requests"] == 6 and t["output_tok_s"] == pytest.approx(6 * 5 / t["wall_s"])
    assert t["total_tok_s"] == pytest.approx(6 * 21 / t["wall_s"])
    assert t["effective_config"]["kv_capacity_tokens"] == 16000
    lt = res["latency"]
    assert set(lt["tpot_ms"]) == {"1", "2"} and set(lt["ttft_ms"]) == {"1", "2"}
    # the stand-in reports TTFT 10 ms (+1 ms per later request) and 2 ms between tokens
    assert lt["ttft_ms"]["1"] == pytest.approx(10.0) and lt["ttft_ms"]["2"] == pytest.approx(10.5)
    assert lt["tpot_ms"]["2"] == pytest.approx(2.0)
    assert lt["repeats_done"] == {"1": 2, "2": 2}


def test_worker_falls_back_to_wall_clock_without_request_metrics(tmp_path, model_dir):
    out = tmp_path / "vllm.json"
    r = _run(["--model", str(model_dir), "--out", str(out), "--allow-cpu", "--site", str(FAKE_SITE),
              "--workloads", "latency", *SMALL], tmp_path, {"FAKE_VLLM_NO_METRICS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    runs = json.loads(out.read_text())["latency"]["per_batch"]["1"]["runs"]
    assert runs[0]["timing"].startswith("wall clock")
    assert any(c["max_tokens"] == 1 for c in _calls(tmp_path))  # the one-token TTFT run


def test_worker_says_why_when_vllm_is_missing(tmp_path, model_dir):
    out = tmp_path / "vllm.json"
    r = _run(["--model", str(model_dir), "--out", str(out), "--allow-cpu", "--site", str(tmp_path / "nothing"),
              *SMALL], tmp_path)
    assert r.returncode == 1
    res = json.loads(out.read_text())
    assert res["status"] == "failed" and "vllm" in res["error"].lower()


def test_standalone_writes_results_and_merge_puts_them_beside_the_suite(tmp_path, model_dir):
    out = tmp_path / "out"
    r = _run(["--model", str(model_dir), "--shape", "tiny", "--out-dir", str(out), "--deadline-s", "100",
              "--bw-TBps", "3.0", "--peak-TFLOPs", "800", "--gpu-name", "NVIDIA H100 80GB HBM3",
              "--num-requests", "6", "--latency-batches", "1,2", "--latency-repeats", "1",
              "--worker-extra", f"--allow-cpu --site {FAKE_SITE} --input-len 16 --output-len 5 "
                                "--latency-input-len 8 --latency-output-len 4"], tmp_path)
    # the driver passes the pinned lengths first; the extra flags above override them for a quick run
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(out.glob("*.json"))
    assert [f.name.split("-h100-80gb-hbm3-")[1] for f in files] == ["tiny-latency.json", "tiny-throughput.json"]
    for f in files:
        res = json.loads(f.read_text())
        validate(res)
        assert set(res["engines"]) == {"vllm"} and "error" not in res["engines"]["vllm"]
        assert res["engines"]["vllm"]["version"] == "0.26.0"
    assert sorted(out.glob("*-vllm.log"))

    # a suite result of the same run: merge puts engines.vllm beside moeserve
    vres = json.loads(files[1].read_text())
    suite = {k: vres[k] for k in ("schema", "date", "gpu", "commit", "shape", "workload", "roofline", "spec")}
    suite["engines"] = {"moeserve": {"output_tok_s": 1.0, "total_tok_s": 2.0}}
    sfile = tmp_path / "suite.json"
    sfile.write_text(json.dumps(suite))
    r = _run(["--merge-from", str(files[1]), "--into", str(sfile)], tmp_path)
    assert r.returncode == 0, r.stderr
    merged = json.loads(sfile.read_text())
    assert set(merged["engines"]) == {"moeserve", "vllm"}
    assert merged["engines"]["vllm"]["measured_in"]["file"] == files[1].name
    suite["gpu"] = "NVIDIA H200"
    sfile.write_text(json.dumps(suite))
    r = _run(["--merge-from", str(files[1]), "--into", str(sfile)], tmp_path)
    assert r.returncode != 0 and "gpu differs" in r.stderr
    r = _run(["--merge-from", str(files[0]), "--into", str(sfile)], tmp_path)
    assert r.returncode != 0 and "workload differs" in r.stderr
