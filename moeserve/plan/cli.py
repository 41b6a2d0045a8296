"""`moeserve plan MODEL [--gpus 8xH100-80GB] [--nodes N] [--dtype ...] [--json]` (no torch imported)."""

from __future__ import annotations

import argparse
import json
import sys

from moeserve.cli import json_object_arg
from moeserve.plan.catalog_index import catalog_entries
from moeserve.plan.memory import KV_DTYPE_BYTES, PRECISIONS
from moeserve.plan.planner import PlanRequest, make_plan
from moeserve.plan.render import render_text


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", nargs="?", help="checkpoint directory, config.json path, or catalog hub id "
                   "(e.g. deepseek-ai/DeepSeek-V3); --list shows the catalog")
    p.add_argument("--gpus", default="8xH100-80GB", help="GPUs of one node, COUNTxTYPE (default 8xH100-80GB); "
                   "TYPE may also be a memory size such as 80GB")
    p.add_argument("--nodes", type=int, default=1, help="number of such nodes (default 1)")
    p.add_argument("--dtype", choices=sorted(PRECISIONS), default=None,
                   help="weight precision (default: the checkpoint's own)")
    p.add_argument("--kv-cache-dtype", choices=sorted(KV_DTYPE_BYTES), default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's maximum context")
    p.add_argument("--concurrency", type=int, default=None,
                   help="max_model_len sequences that should fit at once (default 1)")
    p.add_argument("--tp", type=int, default=None, help="pin the tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="pin the pipeline-parallel size")
    p.add_argument("--attention-dp", action="store_true",
                   help="attention data-parallel + expert parallel over all GPUs (MoE models)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-overrides", type=json_object_arg, default=None, metavar="JSON",
                   help="laid over config.json as vLLM's flag does, e.g. '{\"num_hidden_layers\": 12}'")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in moeserve/plan/README.md)")
    p.add_argument("--list", action="store_true", help="list the built-in catalog and exit")
    p.add_argument("--emit", choices=["k8s", "lws"], default=None,
                   help="k8s: Kubernetes manifests of the planned layout instead of the report (several nodes: "
                        "a StatefulSet per node rank); lws: the same with a LeaderWorkerSet for several nodes")
    p.add_argument("--out", default=None, metavar="DIR", help="--emit k8s: write one file per object here")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the `moeserve` sub-command parser; the handler is `run`."""
    p = subparsers.add_parser("plan", help="size a deployment from the architecture (no GPU needed)",
                              description=__doc__)
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(
        model=args.model, gpus=args.gpus, nodes=args.nodes, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len, concurrency=args.concurrency, tp=args.tp, pp=args.pp,
        attention_dp=args.attention_dp, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        hf_overrides=args.hf_overrides,
    )


def run(args: argparse.Namespace) -> int:
    """0 when the plan fits, 1 when it does not, 2 for bad input."""
    if args.list:
        for hub_id in catalog_entries():
            print(hub_id)
        return 0
    if not args.model:
        print("moeserve plan: a MODEL is required (or --list)", file=sys.stderr)
        return 2
    try:
        plan = make_plan(request_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"moeserve plan: {e}", file=sys.stderr)
        return 2
    if args.emit:
        from moeserve.plan.k8s import render_k8s, write_k8s

        if args.out:
            for path in write_k8s(plan, args.out, lws=args.emit == "lws"):
                print(path)
        else:
            print(render_k8s(plan, lws=args.emit == "lws"), end="")
    elif args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render_text(plan))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="moeserve plan", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
