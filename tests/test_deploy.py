"""deploy/: the YAML parses, the Kubernetes objects pass a structural schema (no cluster), the dashboard JSON
parses, and every moeserve metric an alert, a panel or the HPA names is one that /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from k8s_schema import validate
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"moeserve:[a-z_][a-z0-9_]*")


def exported_sample_names() -> set[str]:
    """Every sample name of the server's /metrics exposition, with every collector filled in."""
    from moeserve.server.metrics import ServerMetrics

    stats = SimpleNamespace(num_running=1, num_waiting=2, kv_cache_usage=0.5, prompt_tokens_total=10,
                            generation_tokens_total=20, num_preemptions_total=0, prefix_cache_queries=4,
                            prefix_cache_hits=2)
    experts = SimpleNamespace(layer_stats=lambda: [(0, 1.5, 0.3)], rank_shares=lambda: [0.6, 0.4])
    info = {"cache_config_info": {"block_size": "16"}, "parallel_config_info": {"tensor_parallel_size": "2"}}
    m = ServerMetrics(lambda: stats, "m", expert_load_source=lambda: experts, config_info=info)
    m.on_abort("r")  # the labelled success counter gets a sample
    body, _ = m.render()
    return {s.name for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_every_referenced_metric_is_exported():
    exported = exported_sample_names()
    referenced = {}
    for path in deploy_files():
        for name in METRIC.findall(path.read_text()):
            referenced.setdefault(name, path.relative_to(DEPLOY))
    assert len(referenced) >= 12, referenced  # alerts + dashboard cover the exposition
    missing = {n: str(p) for n, p in referenced.items() if n not in exported}
    assert not missing, f"not in /metrics: {missing}"


def test_metric_check_catches_a_misspelling():
    assert "moeserve:kv_cache_usage_percent" not in exported_sample_names()
    assert "moeserve:num_preemptions" not in exported_sample_names()  # counters are exported with _total


@pytest.mark.parametrize("path", sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml")))
def test_yaml_parses_and_kubernetes_objects_validate(path):
    docs = [d for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d is not None]
    assert docs
    for doc in docs:
        if "apiVersion" in doc:
            validate(doc)
        else:
            assert path.startswith("prometheus/")
            for group in doc["groups"]:
                for rule in group["rules"]:
                    assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule


def test_schema_rejects_a_malformed_object():
    import jsonschema

    doc = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_deployment_probes_and_drain():
    doc = yaml.safe_load((DEPLOY / "k8s/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    drain = float(c["args"][c["args"].index("--drain-timeout-s") + 1])
    assert pod["terminationGracePeriodSeconds"] > drain + 5  # drain + preStop sleep before SIGKILL
    assert "preStop" in c["lifecycle"]


def test_alert_thresholds_and_dashboard():
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())["groups"]
             for r in g["rules"]}
    assert "> 0.95" in rules["MoeserveKVCacheNearlyFull"] and "> 100" in rules["MoeserveQueueGrowing"]
    assert "0.95" in rules["MoeserveLatencyHigh"] and "> 30" in rules["MoeserveLatencyHigh"]
    for name in ("MoeserveDown", "MoeserveHealthFailing", "MoeservePreemptionStorm", "MoeserveTTFTHigh",
                 "MoeserveExpertImbalance"):
        assert name in rules
    dash = json.loads((DEPLOY / "grafana/moeserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10 and all(METRIC.search(e) for e in exprs)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert "pip install" in text and '"moeserve", "serve"' in text
    assert re.search(r"HEALTHCHECK .*\n.*/health", text)
