"""`moeserve plan MODEL --emit k8s`: the manifests parse and pass the structural schema, the container command is
the planner's printed `moeserve serve` line, and a multi-node layout gets one pod per node with its node rank."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from k8s_schema import validate

from moeserve.cli import main


def emit(capsys, *argv) -> tuple[list[dict], str]:
    """The manifests of `moeserve plan ... --emit k8s` and the moeserve line that the plain report prints."""
    assert main(["plan", *argv]) == 0
    report = capsys.readouterr().out
    launch = report.split("launch (moeserve)\n", 1)[1].split("launch (vLLM", 1)[0]
    printed = [ln.strip() for ln in launch.splitlines() if ln.strip() and not ln.strip().startswith("#")][0]
    assert main(["plan", *argv, "--emit", "k8s"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    for d in docs:
        validate(d)
    return docs, printed


def serve_argv(printed: str) -> list[str]:
    """The printed line as a container command: no env prefix or `&`, $VAR as Kubernetes' $(VAR)."""
    line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", printed).removesuffix("&").strip()
    return [re.sub(r"\$([A-Z_]+)", r"$(\1)", w) for w in shlex.split(line)]


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_single_node_moe_replicas_are_pods_of_their_tp_gpus(capsys):
    docs, printed = emit(capsys, "Qwen/Qwen3-30B-A3B", "--gpus", "8xH100-80GB")
    assert printed.startswith("CUDA_VISIBLE_DEVICES=0 moeserve serve Qwen/Qwen3-30B-A3B")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Deployment", "Service"]
    dep = docs[0]
    assert dep["spec"]["replicas"] == 8  # eight TP=1 servers, one a pod
    c = containers(dep)[0]
    assert c["command"] == serve_argv(printed)
    assert c["args"] == ["--host", "0.0.0.0"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert docs[1]["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_single_node_tp_layout(capsys):
    docs, printed = emit(capsys, "Qwen/Qwen3-235B-A22B", "--gpus", "8xH100-80GB", "--tp", "8")
    c = containers(docs[0])[0]
    assert c["command"] == serve_argv(printed) and "--tensor-parallel-size" in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and docs[0]["spec"]["replicas"] == 1


@pytest.mark.parametrize("extra,gpus_per_node", [((), 8), (("--attention-dp",), 8)])
def test_multi_node_one_pod_per_node_with_its_rank(capsys, extra, gpus_per_node):
    docs, printed = emit(capsys, "deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "2", *extra)
    assert "--nnodes 2" in printed and "--node-rank $NODE_RANK" in printed
    sets = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(sets) == 2 and all(s["spec"]["replicas"] == 1 for s in sets)
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    leader_pod = f"{sets[0]['metadata']['name']}-0.{headless['metadata']['name']}"
    ranks = []
    for s in sets:
        assert s["spec"]["serviceName"] == headless["metadata"]["name"]
        pod = s["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["command"] == serve_argv(printed)
        env = {e["name"]: e["value"] for e in c["env"]}
        ranks.append(int(env["NODE_RANK"]))
        assert env["HEAD_IP"] == leader_pod
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus_per_node
        anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert anti["topologyKey"] == "kubernetes.io/hostname"
        assert anti["labelSelector"]["matchLabels"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
        assert ("readinessProbe" in c) == (env["NODE_RANK"] == "0")  # only node 0 serves HTTP
    assert ranks == [0, 1]
    api = [d for d in docs if d["kind"] == "Service" and d is not headless]
    assert len(api) == 1 and api[0]["spec"]["selector"]["moeserve.io/node-rank"] == "0"


def test_pipeline_over_four_nodes(capsys):
    docs, printed = emit(capsys, "deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "4", "--tp", "8",
                         "--pp", "4")
    sets = [d for d in docs if d["kind"] == "StatefulSet"]
    assert [int(containers(s)[0]["env"][0]["value"]) for s in sets] == [0, 1, 2, 3]
    assert all(containers(s)[0]["resources"]["limits"]["nvidia.com/gpu"] == 8 for s in sets)


def test_out_dir_writes_one_file_per_object(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["plan", "deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "2", "--emit", "k8s",
                 "--out", str(out)]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == len(list(out.iterdir())) == 4  # headless Service, 2 StatefulSets, API Service
    for p in paths:
        (doc,) = [d for d in yaml.safe_load_all(open(p)) if d]
        validate(doc)


def test_emit_imports_no_torch():
    code = ("import sys; from moeserve.plan.cli import main; "
            "main(['Qwen/Qwen3-30B-A3B', '--emit', 'k8s']); sys.exit('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_multi_node_as_a_leader_worker_set(capsys):
    assert main(["plan", "deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "2"]) == 0
    report = capsys.readouterr().out
    printed = [ln.strip() for ln in report.split("launch (moeserve)\n", 1)[1].splitlines()
               if ln.strip().startswith("moeserve serve")][0]
    assert main(["plan", "deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "2", "--emit", "lws"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    for d in docs:
        validate(d)
    lws, svc = docs
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["size"] == 2  # one pod per node: the leader (node rank 0) and one worker
    for role in ("leaderTemplate", "workerTemplate"):
        c = tpl[role]["spec"]["containers"][0]
        assert c["command"] == serve_argv(printed)
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
        assert env["HEAD_IP"]["value"] == "$(LWS_LEADER_ADDRESS)"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "readinessProbe" in tpl["leaderTemplate"]["spec"]["containers"][0]
    assert "readinessProbe" not in tpl["workerTemplate"]["spec"]["containers"][0]
    assert svc["spec"]["selector"] == tpl["leaderTemplate"]["metadata"]["labels"]
    # a one-node layout is the same Deployment either way
    assert main(["plan", "Qwen/Qwen3-30B-A3B", "--emit", "lws"]) == 0
    assert [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out) if d] == ["Deployment", "Service"]
