"""The engine's start-up check: before one weight is loaded, do weights + one max_model_len sequence of KV +
the overhead fit the memory budget? Same arithmetic as `moeserve plan`, answered in microseconds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeserve.plan.arch import ArchSpec
from moeserve.plan.hardware import GPU, Fleet
from moeserve.plan.layout import BLOCK_SIZE, Layout, ServeSettings, choose, evaluate, expert_parallel_size
from moeserve.plan.memory import GiB, PRECISIONS, Precision, precision


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    weights: int  # bytes on the fullest GPU
    kv_one_seq: int  # one max_model_len sequence on one GPU
    overhead: int
    budget: int  # device memory x memory_utilization
    message: str
    suggestion: str
    kv_bytes_per_token: int = 0  # per GPU
    kv_capacity_tokens: int = 0  # what the budget leaves for KV, in tokens, per replica


def _precision_from(weight_dtype_bytes: float | None, weight_dtype: str | None) -> Precision:
    if weight_dtype is not None:
        return precision(weight_dtype)
    b = 2.0 if weight_dtype_bytes is None else float(weight_dtype_bytes)
    if b >= 4:
        return PRECISIONS["fp32"]
    if b >= 2:
        return PRECISIONS["bf16"]
    if b >= 1:
        return PRECISIONS["fp8"]
    return PRECISIONS["int4"]


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_startup_fit(
    spec: ArchSpec,
    *,
    weight_dtype_bytes: float | None = 2,
    kv_dtype_bytes: int = 2,
    max_model_len: int,
    device_memory_bytes: int,
    memory_utilization: float,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    enable_expert_parallel: bool = False,
    weight_dtype: str | None = None,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    gpus_per_node: int = 8,
) -> FitVerdict:
    """Check one engine's GPUs (tp x pp x dp of the same memory) before loading; message and suggestion say why
    not. With dp > 1 (DP attention, which runs with EP) the routed experts are spread over the tp x dp GPUs of a
    stage, as the engine places them, and every DP rank holds the whole attention of its tp share.

    weight_dtype_bytes picks the precision policy (2 bf16, 1 fp8, 0.5 int4; see plan/memory.py) unless
    weight_dtype names it ("bf16", "fp8", "int8", "int4", "mxfp4")."""
    prec = _precision_from(weight_dtype_bytes, weight_dtype)
    if weight_dtype is None and spec.native_precision in ("fp8", "int4") and prec.name in ("bf16", "fp32"):
        # an fp8 / int4 (awq, gptq, compressed-tensors) checkpoint is loaded as such (layers/quant/), whatever the
        # model dtype
        prec = precision(spec.native_precision)
    gpu = GPU("this GPU", int(device_memory_bytes))
    fleet = Fleet(gpu, gpus_per_node=max(tp * dp, gpus_per_node), nodes=pp)
    settings = ServeSettings(
        precision=prec, kv_dtype_bytes=kv_dtype_bytes, max_model_len=max_model_len,
        memory_utilization=memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
    )
    ep = expert_parallel_size(spec, tp * dp) if enable_expert_parallel else 1
    p = evaluate(spec, Layout(tp, pp, dp, ep, mode="dp_attention" if dp > 1 else "replicas"), fleet, settings)
    numbers = (
        f"weights {_gib(p.weights)} + overhead {_gib(p.overhead.total)} + KV for one {max_model_len:,}-token "
        f"sequence {_gib(p.kv_one_seq)} = {_gib(p.weights + p.overhead.total + p.kv_one_seq)} per GPU; "
        f"budget {_gib(p.budget)} ({memory_utilization:g} x {_gib(device_memory_bytes)})"
    )
    where = f"{spec.architecture} ({prec.name} weights, tp={tp}, pp={pp}" + (f", dp={dp}" if dp > 1 else "") + ")"
    if p.fits:
        return FitVerdict(True, p.weights, p.kv_one_seq, p.overhead.total, p.budget,
                          f"{where} fits: {numbers}", "", p.kv_bytes_per_token, p.tokens_per_kv_group)
    return FitVerdict(
        False, p.weights, p.kv_one_seq, p.overhead.total, p.budget,
        f"{where} does not fit: {numbers}", _suggest(spec, p, fleet, settings, tp, pp),
        p.kv_bytes_per_token, p.tokens_per_kv_group,
    )


def _suggest(spec: ArchSpec, p, fleet: Fleet, s: ServeSettings, tp: int, pp: int) -> str:
    ideas = []
    if p.kv_bytes > 0:
        longest = (p.kv_bytes // p.kv_bytes_per_token) // BLOCK_SIZE * BLOCK_SIZE
        if longest >= BLOCK_SIZE:
            ideas.append(f"--max-model-len {longest}")
    best, _ = choose(spec, replace(fleet, nodes=max(pp, 1)), s)
    if best.fits and best.layout.replica_gpus > tp * pp:
        lay = best.layout
        ideas.append(f"--tensor-parallel-size {lay.tp}" + (f" --pipeline-parallel-size {lay.pp}" if lay.pp > 1 else ""))
    if s.precision.bytes_per_param > 1.01:
        fp8 = evaluate(spec, p.layout, fleet, replace(s, precision=PRECISIONS["fp8"]))
        if fp8.fits:
            ideas.append("--quantization fp8 (after an accuracy check)")
    if s.kv_dtype_bytes > 1:
        kv8 = evaluate(spec, p.layout, fleet, replace(s, kv_dtype_bytes=1))
        if kv8.fits:
            ideas.append("--kv-cache-dtype fp8")
    if s.memory_utilization < 0.95:
        hi = evaluate(spec, p.layout, fleet, replace(s, memory_utilization=0.95))
        if hi.fits:
            ideas.append("--gpu-memory-utilization 0.95")
    if not ideas:
        return "more GPUs (see `moeserve plan`)"
    return "try " + ", or ".join(ideas) + " (`moeserve plan` shows the whole picture)"
