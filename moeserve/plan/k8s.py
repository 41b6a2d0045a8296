"""`moeserve plan MODEL --emit k8s`: Kubernetes manifests for the planned layout (no torch, no cluster).

The container command is the planner's own `moeserve serve ...` line from commands.py (one source: the launch
text is parsed, never rebuilt), with `--host 0.0.0.0` appended as args so the pod listens on its IP.

  one node per server   a Deployment (replicas = servers of the plan: MoE replicas as separate pods with their
                        TP GPUs each, a dense model's DP inside one pod) and a Service
  several nodes         a LeaderWorkerSet-style set per server: the leader (node rank 0, serves the API, probes on
                        /ready and /health) and one single-pod StatefulSet per worker rank, each pod with
                        NODE_RANK set, HEAD_IP the leader's stable DNS name from a headless Service, and
                        anti-affinity so each pod lands on its own node; a Service on the leader for the API
  --emit lws            several nodes as one LeaderWorkerSet (the sigs.k8s.io/lws CRD) instead
"""

from __future__ import annotations

import json
import re
import shlex
from typing import TYPE_CHECKING

from moeserve.plan.commands import BASE_PORT

if TYPE_CHECKING:
    from moeserve.plan.planner import Plan

IMAGE = "moeserve/moeserve:0.1.0"
DRAIN_TIMEOUT_S = 30
_PREFIX = re.compile(r"^(?:[A-Z_]+=\S+\s+)+")


def serve_lines(plan: Plan) -> list[str]:
    """The plan's `moeserve serve` lines as printed, without comments, env prefixes or a trailing `&`."""
    out = []
    for line in plan.commands["moeserve"].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(_PREFIX.sub("", line).removesuffix("&").strip())
    return out


def _flag(argv: list[str], name: str, default: int) -> int:
    return int(argv[argv.index(name) + 1]) if name in argv else default


def gpus_per_pod(argv: list[str]) -> int:
    tp = _flag(argv, "--tensor-parallel-size", 1)
    pp = _flag(argv, "--pipeline-parallel-size", 1)
    dp = _flag(argv, "--data-parallel-size", 1)
    return max(1, tp * pp * dp // _flag(argv, "--nnodes", 1))


def k8s_argv(line: str) -> list[str]:
    """shlex words of a serve line, with $VAR written as Kubernetes' $(VAR) (expanded from the container env)."""
    return [re.sub(r"\$([A-Z_][A-Z0-9_]*)", r"$(\1)", w) for w in shlex.split(line)]


def base_name(plan: Plan) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", plan.model_name.split("/")[-1].lower()).strip("-")
    return ("moeserve-" + name)[:40].rstrip("-")


def _probe(path: str, **kw) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, **kw}


def _container(argv: list[str], gpus: int, port: int, *, serves_api: bool, env: list[dict]) -> dict:
    c = {"name": "moeserve", "image": IMAGE, "command": argv, "args": ["--host", "0.0.0.0"],
         "env": env,
         "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
         "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"},
                          {"name": "hf-cache", "mountPath": "/root/.cache/huggingface"}]}
    if serves_api:
        c["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        c["startupProbe"] = _probe("/health", periodSeconds=10, failureThreshold=180)
        c["livenessProbe"] = _probe("/health", periodSeconds=10, timeoutSeconds=5, failureThreshold=3)
        c["readinessProbe"] = _probe("/ready", periodSeconds=5, timeoutSeconds=3, failureThreshold=2)
        c["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    if not env:
        del c["env"]
    return c


def _pod_spec(container: dict, extra: dict | None = None) -> dict:
    return {"terminationGracePeriodSeconds": DRAIN_TIMEOUT_S + 30, "containers": [container],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
                        {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
            **(extra or {})}


def _service(name: str, selector: dict, port: int, headless: bool = False) -> dict:
    spec = {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": port}]}
    if headless:  # pod DNS names for the rendezvous, published before the pods are ready (loading needs them)
        spec["clusterIP"] = "None"
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}},
            "spec": spec}


def _single_node(plan: Plan, lines: list[str], name: str) -> list[dict]:
    argv = k8s_argv(lines[0])
    port = _flag(argv, "--port", BASE_PORT)
    lay, fleet = plan.placement.layout, plan.fleet
    replicas = len(lines) * (fleet.nodes if fleet.nodes > 1 and lay.dp > 1 else 1)
    labels = {"app": name}
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
           "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels},
                                 "spec": _pod_spec(_container(argv, gpus_per_pod(argv), port, serves_api=True,
                                                              env=[]))}}}
    return [dep, _service(name, labels, port)]


def _multi_node(plan: Plan, line: str, name: str, replica: int | None) -> list[dict]:
    argv = k8s_argv(line)
    nnodes = _flag(argv, "--nnodes", 1)
    port = _flag(argv, "--port", BASE_PORT)
    group = name if replica is None else f"{name}-r{replica}"
    nodes_svc = f"{group}-nodes"
    leader = f"{group}-node0"
    head = f"{leader}-0.{nodes_svc}"
    group_labels = {"app": name, "moeserve.io/group": group}
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": group_labels}, "topologyKey": "kubernetes.io/hostname"}]}}
    docs = [_service(nodes_svc, group_labels, port, headless=True)]
    for rank in range(nnodes):
        sts = f"{group}-node{rank}"
        labels = {**group_labels, "moeserve.io/node-rank": str(rank)}
        env = [{"name": "NODE_RANK", "value": str(rank)}, {"name": "HEAD_IP", "value": head}]
        container = _container(argv, gpus_per_pod(argv), port, serves_api=rank == 0, env=env)
        docs.append({"apiVersion": "apps/v1", "kind": "StatefulSet",
                     "metadata": {"name": sts, "labels": labels},
                     "spec": {"replicas": 1, "serviceName": nodes_svc, "podManagementPolicy": "Parallel",
                              "selector": {"matchLabels": labels},
                              "template": {"metadata": {"labels": labels},
                                           "spec": _pod_spec(container, {"affinity": anti})}}})
    docs.append(_service(group, {**group_labels, "moeserve.io/node-rank": "0"}, port))
    return docs


LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def _leader_worker_set(plan: Plan, line: str, name: str, replicas: int) -> list[dict]:
    """The same pods as one LeaderWorkerSet (sigs.k8s.io/lws, a CRD): a group of --nnodes pods per server,
    NODE_RANK from the pod's worker index (0 = the leader), HEAD_IP from LWS_LEADER_ADDRESS (set by LWS)."""
    argv = k8s_argv(line)
    port = _flag(argv, "--port", BASE_PORT)
    env = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LWS_INDEX_LABEL}']"}}},
           {"name": "HEAD_IP", "value": "$(LWS_LEADER_ADDRESS)"}]

    def template(role: str) -> dict:
        c = _container(argv, gpus_per_pod(argv), port, serves_api=role == "leader", env=env)
        return {"metadata": {"labels": {"app": name, "role": role}}, "spec": _pod_spec(c)}

    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
           "metadata": {"name": name, "labels": {"app": name}},
           "spec": {"replicas": replicas, "startupPolicy": "LeaderCreated",
                    "leaderWorkerTemplate": {"size": _flag(argv, "--nnodes", 1), "restartPolicy": "RecreateGroupOnPodRestart",
                                             "leaderTemplate": template("leader"),
                                             "workerTemplate": template("worker")}}}
    return [lws, _service(name, {"app": name, "role": "leader"}, port)]


def k8s_manifests(plan: Plan, lws: bool = False) -> list[dict]:
    """lws: a several-node layout as one LeaderWorkerSet instead of StatefulSets (one-node layouts: unchanged)."""
    lines = serve_lines(plan)
    if not lines:
        raise ValueError("the plan has no moeserve launch command")
    name = base_name(plan)
    if "--nnodes" not in shlex.split(lines[0]):
        return _single_node(plan, lines, name)
    lay = plan.placement.layout
    replicas = lay.dp if lay.mode == "replicas" and lay.dp > 1 else 1   # each PP replica spans its own nodes
    if lws:
        return _leader_worker_set(plan, lines[0], name, replicas)
    docs = []
    for r in range(replicas):
        docs += _multi_node(plan, lines[0], name, r if replicas > 1 else None)
    return docs


def header(plan: Plan) -> str:
    notes = [ln for ln in plan.commands["moeserve"].splitlines() if ln.startswith("#")]
    lay = plan.placement.layout
    out = [f"# moeserve plan: {plan.model_name} on {plan.fleet.describe()}, TP={lay.tp} PP={lay.pp} EP={lay.ep} "
           f"DP={lay.dp}{'' if plan.fits else ' (DOES NOT FIT)'}", *notes]
    return "\n".join(out)


def dump_yaml(docs: list[dict]) -> str:
    """YAML documents; JSON (which YAML reads) when PyYAML is not installed."""
    try:
        import yaml
    except ImportError:
        return "\n---\n".join(json.dumps(d, indent=2) for d in docs) + "\n"
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # no &id001 anchors: each object reads on its own
            return True

    return "---\n".join(yaml.dump(d, Dumper=Dumper, sort_keys=False, width=1000, default_flow_style=None)
                         for d in docs)


def render_k8s(plan: Plan, lws: bool = False) -> str:
    return header(plan) + "\n" + dump_yaml(k8s_manifests(plan, lws))


def write_k8s(plan: Plan, out_dir: str, lws: bool = False) -> list[str]:
    """One file per object, named kind-name.yaml; returns the paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for doc in k8s_manifests(plan, lws):
        path = os.path.join(out_dir, f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(header(plan) + "\n" + dump_yaml([doc]))
        paths.append(path)
    return paths
