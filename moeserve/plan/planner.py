"""`moeserve plan`: size a deployment from the architecture and the fleet, warn, and write the launch commands."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moeserve.plan.arch import ArchSpec, apply_hf_overrides, load_config, read_arch
from moeserve.plan.catalog_index import catalog_entries, resolve_catalog
from moeserve.plan.commands import launch_commands
from moeserve.plan.hardware import Fleet, parse_gpus
from moeserve.plan.layout import (
    BLOCK_SIZE,
    Layout,
    Placement,
    ServeSettings,
    choose,
    dp_attention_layout,
    evaluate,
    suggested_expert_parallel,
    replica_candidates,
    valid_tp,
)
from moeserve.plan.memory import (
    GiB,
    PRECISIONS,
    kv_dtype_bytes,
    native_precision,
    precision,
    weight_bytes,
)

MAX_NODES_SEARCHED = 64
_QUANTIZED = ("fp8", "int8", "int4", "mxfp4")


@dataclass
class PlanRequest:
    model: Any  # checkpoint dir, config.json path, catalog name, or a config dict
    gpus: str = "8xH100-80GB"  # the GPUs of one node
    nodes: int = 1
    dtype: str | None = None  # None: the checkpoint's own precision
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's maximum
    concurrency: int | None = None
    tp: int | None = None
    pp: int | None = None
    attention_dp: bool = False
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    hf_overrides: dict | None = None  # laid over config.json as the engine does (e.g. fewer layers)


@dataclass
class Plan:
    request: PlanRequest
    model_name: str
    spec: ArchSpec
    params: dict[str, int]
    dtype: str
    native_dtype: str
    weight_bytes: dict[str, int]
    kv_cache_dtype: str
    kv_bytes_per_token: int
    fleet: Fleet
    settings: ServeSettings
    placement: Placement
    warnings: list[str] = field(default_factory=list)
    suggestion: str = ""
    commands: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.placement.fits

    def to_dict(self) -> dict:
        p, lay = self.placement, self.placement.layout
        return {
            "model": self.model_name,
            "architecture": self.spec.architecture,
            "params_total": self.params["total"],
            "params_active": self.params["active"],
            "params": {k: v for k, v in self.params.items() if k not in ("total", "active")},
            "dtype": self.dtype,
            "weight_bytes": self.weight_bytes["total"],
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_model_len": self.settings.max_model_len,
            "gpu": self.fleet.gpu.name,
            "gpus_per_node": self.fleet.gpus_per_node,
            "nodes": self.fleet.nodes,
            "gpus": lay.gpus,
            "layout": lay.as_dict(),
            "fits": p.fits,
            "per_gpu": {
                "device": p.device_bytes,
                "capacity": p.budget,
                "weights": p.weights,
                "kv": max(0, p.kv_bytes),
                "overhead": p.overhead.total,
                "overhead_detail": p.overhead.as_dict(),
                "headroom": p.device_bytes - p.budget,
                "kv_bytes_per_token": p.kv_bytes_per_token,
            },
            "kv_capacity_tokens": p.kv_capacity_tokens,
            "max_concurrency": p.max_concurrency,
            "commands": self.commands,
            "warnings": self.warnings,
            "suggestion": self.suggestion,
        }


def _model_name(model: Any, cfg: dict) -> str:
    if isinstance(model, dict):
        return cfg.get("_name_or_path") or "<config>"
    text = str(model)
    if Path(text).expanduser().exists():
        return text
    path = resolve_catalog(text)
    if path is not None:
        for hub_id, p in catalog_entries().items():
            if p == path:
                return hub_id
    return text


def settings_for(spec: ArchSpec, req: PlanRequest, dtype: str) -> ServeSettings:
    max_len = req.max_model_len or spec.max_position_embeddings
    if max_len < 1:
        raise ValueError(f"--max-model-len must be positive, got {max_len}")
    if max_len > spec.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {max_len} exceeds the model's maximum context {spec.max_position_embeddings}"
        )
    if not 0 < req.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {req.gpu_memory_utilization}")
    return ServeSettings(
        precision=precision(dtype),
        kv_dtype_bytes=kv_dtype_bytes(req.kv_cache_dtype),
        max_model_len=max_len,
        memory_utilization=req.gpu_memory_utilization,
        max_num_batched_tokens=req.max_num_batched_tokens,
        max_num_seqs=req.max_num_seqs,
    )


def forced_layout(spec: ArchSpec, fleet: Fleet, req: PlanRequest) -> Layout | None:
    """The layout the user pinned with --tp/--pp/--attention-dp, validated; None when nothing is pinned."""
    if req.attention_dp:
        if req.tp or req.pp:
            raise ValueError("--attention-dp sets tp=1 and pp=1; leave out --tp/--pp")
        lay = dp_attention_layout(spec, fleet)
        if lay is None:
            raise ValueError("--attention-dp needs a MoE model and at least two GPUs")
        return lay
    if not (req.tp or req.pp):
        return None
    tp, pp = req.tp or fleet.tp_limit, req.pp or 1
    if tp > fleet.gpus_per_node:
        raise ValueError(f"--tp {tp} is larger than the {fleet.gpus_per_node} GPUs of one node")
    if not valid_tp(spec, tp):
        raise ValueError(
            f"--tp {tp} does not divide the {spec.num_heads} attention heads / {spec.num_kv_heads} KV heads"
        )
    if pp > fleet.nodes and tp * pp > fleet.total_gpus:
        raise ValueError(f"--tp {tp} --pp {pp} needs {tp * pp} GPUs; the fleet has {fleet.total_gpus}")
    if pp > spec.num_layers:
        raise ValueError(f"--pp {pp} exceeds the {spec.num_layers} layers")
    return Layout(tp, pp, fleet.total_gpus // (tp * pp), suggested_expert_parallel(spec, tp))


def smallest_replica(spec: ArchSpec, fleet: Fleet, s: ServeSettings) -> Placement | None:
    """The smallest replica of this GPU type (same GPUs per node, up to 64 nodes) that fits; None if none does."""
    big = replace(fleet, nodes=MAX_NODES_SEARCHED)
    for lay in replica_candidates(spec, big):
        lay = replace(lay, dp=1)
        p = evaluate(spec, lay, big, s)
        if p.fits:
            return p
    return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _warnings(plan: Plan) -> list[str]:
    spec, p, lay, fleet, s = plan.spec, plan.placement, plan.placement.layout, plan.fleet, plan.settings
    req = plan.request
    out = []
    # 1. BF16 where FP8 would halve the GPUs
    if plan.dtype in ("bf16", "fp16"):
        bf = smallest_replica(spec, fleet, s)
        f8 = smallest_replica(spec, fleet, replace(s, precision=PRECISIONS["fp8"]))
        n_bf = bf.layout.replica_gpus if bf else None
        n_f8 = f8.layout.replica_gpus if f8 else None
        if n_f8 and (n_bf is None or 2 * n_f8 <= n_bf):
            need = f"{n_bf} GPUs" if n_bf else f"more than {MAX_NODES_SEARCHED} nodes"
            out.append(
                f"BF16 weights need {need} per replica; FP8 weights ({_gib(weight_bytes(spec, PRECISIONS['fp8'])['total'])} "
                f"instead of {_gib(plan.weight_bytes['total'])}) need {n_f8}: --dtype fp8 halves the GPUs "
                f"(or doubles the replicas), after an accuracy check against BF16."
            )
    # 2. EP spanning nodes
    if lay.ep > 1:
        ep_gpus = lay.ep if lay.mode == "dp_attention" else lay.tp
        if ep_gpus > fleet.gpus_per_node:
            out.append(
                f"expert parallelism spans {ep_gpus // fleet.gpus_per_node} nodes (EP={lay.ep} over "
                f"{fleet.gpus_per_node}-GPU nodes): every MoE layer's all-to-all crosses the inter-node network, "
                f"an order of magnitude slower than NVLink; keep EP inside a node unless the interconnect "
                f"(InfiniBand with GPUDirect RDMA) and the kernels (DeepEP-style) are made for it."
            )
    # 3. max_model_len at the model maximum with a concurrency that cannot fit
    want = req.concurrency or 1
    if p.fits or p.kv_bytes > 0:
        if p.max_concurrency < want:
            best = p.max_len_for(want)
            at_max = s.max_model_len == spec.max_position_embeddings
            head = (f"max_model_len is the model maximum ({s.max_model_len:,} tokens)" if at_max
                    else f"max_model_len {s.max_model_len:,}")
            fix = (f"--max-model-len {best:,} serves {want} at once" if best >= BLOCK_SIZE
                   else "no max_model_len serves that many: add GPUs or use a smaller KV/weight dtype")
            out.append(
                f"{head}: the KV cache ({p.kv_capacity_tokens:,} tokens) holds {p.max_concurrency} such "
                f"sequence(s) at once, {want} requested; {fix}."
            )
    # 4. MLA latent KV duplicated on every TP rank
    if spec.attention == "mla" and lay.mode == "replicas" and lay.tp > 1:
        alt_text = ""
        alt = dp_attention_layout(spec, fleet)
        if alt is not None:
            ap = evaluate(spec, alt, fleet, s)
            if ap.kv_bytes > 0 and ap.kv_capacity_tokens > p.kv_capacity_tokens:
                spans = alt.dp // fleet.gpus_per_node
                alt_text = (
                    f"; attention data-parallel + EP over the {alt.dp} GPUs (--attention-dp: each GPU keeps its "
                    f"own sequences) holds {ap.kv_capacity_tokens:,} tokens instead of {p.kv_capacity_tokens:,}"
                    + (f", with EP spanning {spans} nodes" if spans > 1 else "")
                    + ("" if ap.fits else ", though one max_model_len sequence would not fit a GPU")
                )
        out.append(
            f"MLA's latent KV ({p.kv_bytes_per_token:,} B/token) is duplicated on each of the {lay.tp} "
            f"TP ranks, so TP adds no KV capacity{alt_text}."
        )
    # 5. Quantized weights with no accuracy gate
    if plan.dtype in _QUANTIZED and plan.dtype != plan.native_dtype:
        out.append(
            f"weights quantized to {plan.dtype} on load from a {plan.native_dtype} checkpoint: no accuracy gate "
            f"has been passed; compare against {plan.native_dtype} on an eval set (e.g. GSM8K, MMLU) before serving."
        )
    # GQA with more TP ranks than KV heads
    if spec.attention == "gqa" and lay.tp > spec.num_kv_heads:
        out.append(
            f"TP={lay.tp} exceeds the {spec.num_kv_heads} KV heads: each KV head is replicated on "
            f"{lay.tp // spec.num_kv_heads} GPUs, so KV capacity grows less than the GPU count."
        )
    return out


def _suggestion(plan: Plan) -> str:
    """What would make a plan that does not fit fit: shorter context, more nodes, fewer bytes per weight."""
    spec, p, fleet, s = plan.spec, plan.placement, plan.fleet, plan.settings
    if p.fits:
        return ""
    ideas = []
    if p.kv_bytes > 0:
        longest = (p.kv_bytes // p.kv_bytes_per_token) // BLOCK_SIZE * BLOCK_SIZE
        if longest >= BLOCK_SIZE:
            ideas.append(f"--max-model-len {longest:,} fits this layout")
    need = smallest_replica(spec, fleet, s)
    if need is not None:
        lay = need.layout
        if lay.pp > 1:
            ideas.append(f"{lay.pp} nodes of {fleet.gpus_per_node}x{fleet.gpu.name} hold it (tp={lay.tp}, pp={lay.pp})")
        else:
            ideas.append(f"{lay.tp}x{fleet.gpu.name} hold it (tp={lay.tp})")
    for d in ("fp8", "int4"):
        if PRECISIONS[d].bytes_per_param >= s.precision.bytes_per_param or d == plan.dtype:
            continue
        if d == "int4" and not spec.is_moe:
            continue
        s2 = replace(s, precision=PRECISIONS[d])
        best, _ = choose(spec, fleet, s2)
        if best.fits:
            ideas.append(f"--dtype {d} fits this fleet (tp={best.layout.tp}, pp={best.layout.pp})")
            break
    if s.memory_utilization < 0.95:
        hi, _ = choose(spec, fleet, replace(s, memory_utilization=0.95))
        if hi.fits:
            ideas.append(f"--gpu-memory-utilization 0.95 fits this fleet (tp={hi.layout.tp}, pp={hi.layout.pp})")
    if not ideas:
        ideas.append(f"it does not fit {MAX_NODES_SEARCHED} nodes of {fleet.gpus_per_node}x{fleet.gpu.name}")
    return "; or ".join(ideas)


def make_plan(req: PlanRequest) -> Plan:
    cfg = apply_hf_overrides(load_config(req.model), req.hf_overrides)
    spec = read_arch(cfg)
    fleet = parse_gpus(req.gpus, req.nodes)
    native = native_precision(cfg)
    dtype = req.dtype or native
    precision(dtype)  # validates the name
    dtype = precision(dtype).name
    s = settings_for(spec, req, dtype)
    lay = forced_layout(spec, fleet, req)
    placement = evaluate(spec, lay, fleet, s) if lay else choose(spec, fleet, s)[0]
    plan = Plan(
        request=req,
        model_name=_model_name(req.model, cfg),
        spec=spec,
        params=spec.param_counts(),
        dtype=dtype,
        native_dtype=native,
        weight_bytes=weight_bytes(spec, s.precision),
        kv_cache_dtype=req.kv_cache_dtype,
        kv_bytes_per_token=spec.kv_bytes_per_token(s.kv_dtype_bytes),
        fleet=fleet,
        settings=s,
        placement=placement,
    )
    plan.warnings = _warnings(plan)
    plan.suggestion = _suggestion(plan)
    plan.commands = launch_commands(plan)
    return plan
