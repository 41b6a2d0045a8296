"""`moeserve check`: every verdict on synthetic numbers (failing cases included), and the whole checklist against
the real `moeserve serve` (tiny random checkpoints, CPU): it passes on a healthy MoE server and fails, naming the
item, on one started with a KV pool too small for the stated concurrency."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.check import verdicts as v
from moeserve.check.probe import metric_by_label, metric_sum, parse_metrics
from moeserve.check.runner import CheckConfig, count_5xx, ramp_loads, reported_layout
from moeserve.cli import main

# -- verdicts on synthetic inputs --


def test_percentile_is_nearest_rank():
    assert v.percentile(list(range(1, 101)), 99) == 99
    assert v.percentile([5], 99) == 5 and v.percentile([], 99) == 0.0
    assert v.percentile([1, 2, 3, 1000], 99) == 1000


def test_ready_and_metrics_present():
    assert v.ready_verdict(200).status == v.PASS
    assert v.ready_verdict(503).status == v.FAIL and v.ready_verdict(None).status == v.FAIL
    assert v.metrics_present_verdict(set(v.REQUIRED_METRICS)).status == v.PASS
    r = v.metrics_present_verdict(set(v.REQUIRED_METRICS) - {"moeserve:num_preemptions_total"})
    assert r.status == v.FAIL and "moeserve:num_preemptions_total" in r.detail


def test_max_model_len():
    lens = [100] * 98 + [3000, 5000]
    assert v.max_model_len_verdict(8192, lens).status == v.PASS
    r = v.max_model_len_verdict(2048, lens)
    assert r.status == v.FAIL and "3000" in r.threshold
    assert v.max_model_len_verdict(None, lens).status == v.SKIP
    assert v.max_model_len_verdict(2048, []).status == v.SKIP


def test_plan_fit_and_plan_vs_metrics():
    assert v.plan_fit_verdict({"fits": True, "kv_capacity_tokens": 10_000}, 8, 1000).status == v.PASS
    r = v.plan_fit_verdict({"fits": True, "kv_capacity_tokens": 7_999}, 8, 1000)
    assert r.status == v.FAIL and "8000" in r.threshold
    assert v.plan_fit_verdict({"fits": False, "kv_capacity_tokens": 0}, 1, 10).status == v.FAIL
    assert v.plan_fit_verdict(None, 8, 1000, "no --gpus").status == v.SKIP
    assert v.plan_vs_server_verdict(0.30, 0.40).status == v.PASS
    assert v.plan_vs_server_verdict(0.05, 1.0).status == v.FAIL
    assert v.plan_vs_server_verdict(None, 0.5).status == v.SKIP


def test_kv_usage():
    assert v.kv_usage_verdict(0.5).status == v.PASS
    assert v.kv_usage_verdict(0.99).status == v.FAIL
    assert v.kv_usage_verdict(0.99, limit=1.0).status == v.PASS
    assert v.kv_usage_verdict(None).status == v.SKIP


def _step(load, att, n=10, failed=0, errors=(), slo=None):
    return {"load": load, "slo_attainment": att, "num_requests": n, "failed": failed, "errors": list(errors),
            "slo_ms": slo or {}}


def test_5xx_counting_and_verdict():
    s = _step("c1", 1.0, failed=3, errors=["HTTP 503: busy"])
    assert count_5xx(s) == 3  # every failure is a 5xx: all of them count
    assert count_5xx(_step("c1", 1.0, failed=3, errors=["HTTP 500: x", "ReadTimeout: y"])) == 1
    assert count_5xx(_step("c1", 1.0, failed=2, errors=["HTTP 400: bad"])) == 0
    ok = dict(_step("c1", 1.0), num_5xx=0)
    bad = dict(_step("c2", 0.7, failed=3), num_5xx=3)
    assert v.no_5xx_verdict([ok]).status == v.PASS
    r = v.no_5xx_verdict([ok, bad])
    assert r.status == v.FAIL and r.measured.startswith("3 5xx of 20")
    assert v.no_5xx_verdict([]).status == v.SKIP


def test_preemption_storm():
    assert v.preemption_verdict(0, 40).status == v.PASS
    assert v.preemption_verdict(4, 40).status == v.PASS  # 0.1 per request: at the bar
    r = v.preemption_verdict(30, 40)
    assert r.status == v.FAIL and "0.75" in r.measured
    assert v.preemption_verdict(None, 40).status == v.SKIP


def test_latency_collapse_per_step():
    steps = [_step("concurrency 1", 1.0), _step("concurrency 2", 0.95), _step("concurrency 4", 0.4)]
    r = v.slo_verdict(steps, 0.9)
    assert r.status == v.FAIL and "40.0%" in r.measured and "concurrency 4: 40%" in r.detail
    assert v.slo_verdict(steps[:2], 0.9).status == v.PASS
    assert v.slo_verdict([], 0.9).status == v.SKIP


def test_health_layout_expert_imbalance():
    assert v.health_verdict([200] * 5).status == v.PASS
    r = v.health_verdict([200, 503, None])
    assert r.status == v.FAIL and "503" in r.detail and r.measured == "1/3 probes 200"
    assert v.health_verdict([]).status == v.SKIP
    assert v.layout_verdict({"tp": 2, "ep": 8}, {"tp": 2, "ep": 8, "dp": 1}).status == v.PASS
    assert v.layout_verdict({"tp": 2}, {"tp": 4}).status == v.FAIL
    assert v.layout_verdict({"tp": 2}, None).status == v.SKIP
    assert v.layout_verdict({}, {"tp": 2}).status == v.SKIP
    assert reported_layout({"data": [{"id": "m", "tensor_parallel_size": 4}]}) == {"tp": 4}
    assert reported_layout({"data": [{"id": "m"}]}) is None
    assert v.expert_imbalance_verdict({"0": 1.5, "2": 2.0}, 4.0).status == v.PASS
    r = v.expert_imbalance_verdict({"0": 1.5, "2": 6.0}, 4.0)
    assert r.status == v.FAIL and "layer 2" in r.measured
    assert v.expert_imbalance_verdict({}, 4.0).status == v.SKIP


def test_exit_code_and_lines():
    res = [v.CheckResult("a", v.PASS, "1", "2"), v.CheckResult("b", v.SKIP)]
    assert v.exit_code(res) == 0
    assert v.exit_code(res + [v.CheckResult("c", v.FAIL, "9", "<= 1")]) == 1
    assert res[0].line().startswith("PASS  a") and "(threshold 2)" in res[0].line()


def test_metrics_parsing_and_ramp_loads():
    text = ('# HELP x\nmoeserve:kv_cache_usage_perc{model_name="m"} 0.25\n'
            'moeserve:expert_load_imbalance{layer="0",model_name="m"} 1.5\n'
            'moeserve:expert_load_imbalance{layer="2",model_name="m"} 3.0\n'
            'moeserve:num_preemptions_total{model_name="m"} 7.0\n')
    s = parse_metrics(text)
    assert metric_sum(s, "moeserve:kv_cache_usage_perc") == 0.25
    assert metric_sum(s, "moeserve:num_preemptions_total") == 7.0 and metric_sum(s, "nope") is None
    assert metric_by_label(s, "moeserve:expert_load_imbalance", "layer") == {"0": 1.5, "2": 3.0}
    loads = ramp_loads(CheckConfig(url="", peak_concurrency=4))
    assert [x["concurrency"] for x in loads] == [2, 4, 8]  # up to 2x the peak
    loads = ramp_loads(CheckConfig(url="", peak_qps=3.0))
    assert [x["rate"] for x in loads] == [1.5, 3.0, 6.0] and loads[0]["concurrency"] is None
    assert ramp_loads(CheckConfig(url="")) == []


def test_check_imports_no_engine_code():
    code = ("import sys, moeserve.check.cli, moeserve.check.runner; "
            "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('moeserve.') and not "
            "m.startswith(('moeserve.check', 'moeserve.bench', 'moeserve.plan')))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the real server --

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("check-moe"), "Qwen3MoeForCausalLM",
                                max_position_embeddings=MAX_MODEL_LEN)


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("PASS", "FAIL", "SKIP")}


def test_check_passes_on_a_healthy_server(moe_ckpt, tmp_path, capsys):
    from moeserve.server.process import ServerProcess

    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps({"prompt": "hello " * n, "max_tokens": 4}) for n in (3, 5, 8)))
    out = tmp_path / "check.json"
    args = [moe_ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
            "--expert-load-telemetry"]
    with ServerProcess(args) as s:
        rc = main(["check", "--url", s.url, "--peak-concurrency", "2", "--num-prompts", "4", "--workload",
                   str(workload), "--goodput", "ttft:60000", "--gpus", "1xH100-80GB", "--plan-model", moe_ckpt,
                   "--max-expert-imbalance", "8", "--save-result", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    verdicts = _lines(text)
    for name in ("ready", "metrics-present", "max-model-len", "ramp-no-5xx", "no-preemption-storm",
                 "no-latency-collapse", "health-under-load", "kv-usage-under-load", "plan-fit", "expert-imbalance"):
        assert verdicts[name] == "PASS", text
    assert verdicts["layout"] == "SKIP"
    doc = json.loads(out.read_text())
    assert doc["passed"] and len(doc["measurements"]["steps"]) == 3
    assert [st["max_concurrency"] for st in doc["measurements"]["steps"]] == [1, 2, 4]


def test_check_fails_on_a_kv_pool_too_small(moe_ckpt, tmp_path, capsys):
    """It starts the server itself (MODEL + serve flags), with 6 KV blocks of 16 tokens for 8 requests of ~60."""
    out = tmp_path / "check.json"
    rc = main(["check", "--peak-concurrency", "4", "--num-prompts", "8", "--input-len", "12", "--output-len", "24",
               "--save-result", str(out), "--no-progress", "--probe-interval", "0.05",
               moe_ckpt, "--device", "cpu", "--max-model-len", "96", "--num-gpu-blocks-override", "6",
               "--block-size", "16"])
    text = capsys.readouterr().out
    assert rc == 1, text
    verdicts = _lines(text)
    assert verdicts["ready"] == "PASS"
    assert "FAIL" in (verdicts["kv-usage-under-load"], verdicts["no-preemption-storm"]), text
    assert not json.loads(out.read_text())["passed"]


def test_cli_input_errors(capsys):
    assert main(["check"]) == 2  # neither --url nor MODEL
    assert main(["check", "--url", "http://127.0.0.1:9", "some-model"]) == 2  # both
    assert main(["check", "model-dir", "--peak-concurrency", "4"]) == 2  # a check flag after MODEL
    err = capsys.readouterr().err
    assert "either --url" in err and "check flags go before MODEL" in err
    assert main(["check", "--url", "http://127.0.0.1:9", "--ramp", "0,1"]) == 2


def test_no_server_at_the_url_fails_ready_and_metrics(capsys):
    from moeserve.server.process import free_port

    rc = main(["check", "--url", f"http://127.0.0.1:{free_port()}", "--peak-concurrency", "1", "--no-progress"])
    verdicts = _lines(capsys.readouterr().out)
    assert rc == 1 and verdicts["ready"] == "FAIL" and verdicts["metrics-present"] == "FAIL"


def test_kv_capacity_and_layout_from_the_info_gauges():
    from moeserve.check.probe import metric_info, parse_metrics
    from moeserve.check.runner import server_kv_capacity

    text = ('moeserve:cache_config_info{model_name="m",block_size="16",kv_capacity_tokens="1000"} 1.0\n'
            'moeserve:parallel_config_info{model_name="m",tensor_parallel_size="2",pipeline_parallel_size="1",'
            'data_parallel_size="2",expert_parallel_size="4"} 1.0\n')
    samples = parse_metrics(text)
    layout = reported_layout(None, metric_info(samples, "moeserve:parallel_config_info"))
    assert layout == {"tp": 2, "pp": 1, "dp": 2, "ep": 4}
    served = server_kv_capacity(metric_info(samples, "moeserve:cache_config_info"), layout)
    assert served == 2000  # one DP rank's pool times two ranks
    assert v.kv_capacity_verdict(2050, served).status == v.PASS  # within 5% below the plan
    bad = v.kv_capacity_verdict(2200, served)
    assert bad.status == v.FAIL and "promises more" in bad.detail
    assert v.kv_capacity_verdict(None, served).status == v.SKIP
    assert v.kv_capacity_verdict(2000, None).status == v.SKIP
