"""Launch commands for a plan: `moeserve serve ...` and the equivalent `vllm serve ...`.

Flags follow vLLM's meaning in both: inside one engine, DP ranks of a MoE model share one expert group
(EP = TP x DP with --enable-expert-parallel). So independent replicas of a MoE model are separate servers,
one per replica, while a dense model's replicas use --data-parallel-size.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeserve.plan.planner import Plan

RPC_PORT = 13345
BASE_PORT = 8000


def _common_flags(plan: Plan, engine: str) -> list[str]:
    s = plan.settings
    flags = [f"--max-model-len {s.max_model_len}", f"--gpu-memory-utilization {s.memory_utilization:g}"]
    if plan.kv_cache_dtype not in ("auto", "bf16", "fp16"):
        flags.append(f"--kv-cache-dtype {plan.kv_cache_dtype}")
    if plan.dtype != plan.native_dtype and plan.dtype == "fp8":  # both quantize to fp8 on load
        flags.append(f"--quantization {plan.dtype}")
    if plan.request.hf_overrides:
        flags.append(f"--hf-overrides {shlex.quote(json.dumps(plan.request.hf_overrides, separators=(',', ':')))}")
    return flags


def _quant_note(plan: Plan, engine: str) -> list[str]:
    """Neither engine quantizes to int8/int4/mxfp4 on load: the plan then needs a checkpoint already in it
    (moeserve reads int4 as AWQ, GPTQ or compressed-tensors pack-quantized)."""
    if plan.dtype != plan.native_dtype and plan.dtype in ("int8", "int4", "mxfp4"):
        kinds = " (AWQ, GPTQ or compressed-tensors)" if engine == "moeserve" and plan.dtype == "int4" else ""
        name = "vLLM" if engine == "vllm" else "moeserve"
        return [f"# {name} does not quantize to {plan.dtype} on load: point it at a {plan.dtype} checkpoint{kinds}"]
    return []


def _cmd(engine: str, model: str, flags: list[str], prefix: str = "") -> str:
    return f"{prefix}{engine} serve {model} " + " ".join(flags)


def _build(plan: Plan, engine: str) -> str:
    lay, fleet = plan.placement.layout, plan.fleet
    model = plan.model_name
    common = _common_flags(plan, engine)
    lines = _quant_note(plan, engine)
    multi_node_flags = ["--nnodes {n}", "--node-rank $NODE_RANK", "--master-addr $HEAD_IP"]

    if lay.mode == "dp_attention":
        flags = [f"--data-parallel-size {lay.dp}", "--enable-expert-parallel"]
        if fleet.nodes == 1 or lay.dp <= fleet.gpus_per_node:
            lines.append(_cmd(engine, model, flags + common))
            return "\n".join(lines)
        local = fleet.gpus_per_node
        if engine == "vllm":
            dp_flags = flags + [f"--data-parallel-size-local {local}", "--data-parallel-address $HEAD_IP",
                                f"--data-parallel-rpc-port {RPC_PORT}"]
            lines.append("# head node (node 0):")
            lines.append(_cmd(engine, model, dp_flags + common))
            lines.append(f"# node k = 1..{fleet.nodes - 1}:")
            lines.append(_cmd(engine, model, dp_flags + ["--headless", f"--data-parallel-start-rank $(({local}*k))"] + common))
        else:
            lines.append(f"# on node $NODE_RANK = 0..{fleet.nodes - 1} (node 0 serves the API):")
            lines.append(_cmd(engine, model, flags + [f.format(n=fleet.nodes) for f in multi_node_flags] + common))
        return "\n".join(lines)

    layout_flags = [f"--tensor-parallel-size {lay.tp}"]
    if lay.pp > 1:
        layout_flags.append(f"--pipeline-parallel-size {lay.pp}")
    if lay.ep > 1:
        layout_flags.append("--enable-expert-parallel")

    if lay.pp > 1 and lay.replica_gpus > fleet.gpus_per_node:  # one replica spans nodes
        if lay.dp > 1:
            lines.append(f"# {lay.dp} replicas, each on its own group of {lay.pp} nodes; per replica:")
        if engine == "vllm":
            lines.append("# Ray cluster over the replica's nodes: `ray start --head --port 6379` on the head, "
                         "`ray start --address $HEAD_IP:6379` on the others; then on the head:")
            lines.append(_cmd(engine, model, layout_flags + ["--distributed-executor-backend ray"] + common))
        else:
            lines.append(f"# on node $NODE_RANK = 0..{lay.pp - 1} of the replica (node 0 serves the API):")
            lines.append(_cmd(engine, model, layout_flags + [f.format(n=lay.pp) for f in multi_node_flags] + common))
        return "\n".join(lines)

    per_node = fleet.gpus_per_node // lay.tp
    if lay.dp == 1 or (not plan.spec.is_moe):
        flags = layout_flags + ([f"--data-parallel-size {min(lay.dp, per_node)}"] if lay.dp > 1 else [])
        if fleet.nodes > 1 and lay.dp > 1:
            lines.append(f"# on each of the {fleet.nodes} nodes (a load balancer in front):")
        lines.append(_cmd(engine, model, flags + common))
        return "\n".join(lines)

    # independent replicas of a MoE model: one server per replica
    if fleet.nodes > 1:
        lines.append(f"# on each of the {fleet.nodes} nodes (a load balancer in front):")
    for r in range(per_node):
        devices = ",".join(str(r * lay.tp + i) for i in range(lay.tp))
        lines.append(_cmd(engine, model, layout_flags + [f"--port {BASE_PORT + r}"] + common,
                          prefix=f"CUDA_VISIBLE_DEVICES={devices} ") + " &")
    return "\n".join(lines)


NOT_YET_NOTE = ("# moeserve does not run {what} yet; this plan needs the vLLM command until it lands")


def launch_commands(plan: Plan) -> dict[str, str]:
    """moeserve's command runs as printed where the engine supports the layout and precision (TP, EP, DP
    attention, PP, PP x DP, several nodes); otherwise it is printed behind a note naming what is missing."""
    moeserve = _build(plan, "moeserve")
    # fp8 (checkpoint or on load) and int4 checkpoints run, int8/mxfp4 not yet; the fp8 KV cache runs as e4m3
    # (fp8, fp8_e4m3), e5m2 not yet
    missing = [what for what, needed in ((f"{plan.dtype} weights", plan.dtype in ("int8", "mxfp4")),
                                         ("an fp8_e5m2 KV cache", plan.kv_cache_dtype == "fp8_e5m2")) if needed]
    if missing:
        moeserve = NOT_YET_NOTE.format(what=" or ".join(missing)) + "\n" + moeserve
    return {"moeserve": moeserve, "vllm": _build(plan, "vllm")}
