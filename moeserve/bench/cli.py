"""`moeserve bench serve`: a load generator for any OpenAI-compatible server (moeserve, vLLM, SGLang).

Client side only: it imports nothing of the engine. Flags follow `vllm bench serve` where one exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys

import httpx

from moeserve.bench.datasets import jsonl_requests, random_requests, shared_prefix_requests
from moeserve.bench.metrics import format_report, parse_goodput
from moeserve.bench.plot import expert_load_path, have_matplotlib, plot_expert_load, plot_steps
from moeserve.bench.runner import Target, run_ramp


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark a running server",
                                  description="Load generators (client side only).")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    p = sub.add_parser(
        "serve", help="stream requests at a running OpenAI-compatible server and report TTFT, TPOT, goodput",
        description="Send streaming requests at a rate (Poisson or gamma), at a fixed concurrency, or over a "
                    "ramp of rates, and report vLLM's serving metrics: TTFT, TPOT (excluding the first token), "
                    "ITL, E2E latency (mean, median, p90, p99), request and token throughput, goodput and SLO "
                    "attainment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--endpoint", default="chat", choices=["chat", "completions"],
                   help="/v1/chat/completions or /v1/completions")
    g.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY or $MOESERVE_API_KEY)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM/moeserve extension) so every output has --output-len tokens")
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=100, help="requests per step")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second (inf: all at once, limited by --max-concurrency)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 is Poisson, <1 burstier, >1 more even")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    g.add_argument("--ramp", default=None, metavar="R1,R2,...",
                   help="request rates, one step each, stopping after the first step whose SLO attainment "
                        "falls below --ramp-collapse")
    g.add_argument("--ramp-collapse", type=float, default=0.5,
                   help="a ramp step with SLO attainment below this fraction ends the ramp")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms for goodput, any of ttft:MS tpot:MS e2el:MS (e.g. ttft:2000 tpot:50)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random", choices=["random", "shared-prefix", "jsonl"],
                   help="random lengths, prompts sharing prefixes, or a JSONL file of prompts/conversations")
    g.add_argument("--dataset-path", default=None, help="the JSONL file (--dataset jsonl)")
    g.add_argument("--input-len", type=int, default=256, help="prompt length in words (~tokens)")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    g.add_argument("--length-dist", default="uniform", choices=["uniform", "lognormal"],
                   help="random lengths: uniform within --range-ratio, or lognormal with median --input-len / "
                        "--output-len and --lognormal-sigma")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="uniform lengths in [len*(1-r), len*(1+r)]; 0: fixed")
    g.add_argument("--lognormal-sigma", type=float, default=0.5, help="sigma of the lognormal lengths")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: words of the common prefix")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: number of distinct prefixes")
    g = p.add_argument_group("output")
    g.add_argument("--save-result", default=None, metavar="FILE", help="write the JSON result here")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="latency percentiles and throughput against load (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.set_defaults(func=run_bench_serve)


def make_requests(args, step: int):
    seed = args.seed + step
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return jsonl_requests(args.dataset_path, args.num_prompts, args.output_len, seed=seed, shuffle=step > 0)
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(args.num_prompts, args.prefix_len, args.input_len, args.output_len,
                                      num_prefixes=args.num_prefixes, seed=seed)
    return random_requests(args.num_prompts, args.input_len, args.output_len, range_ratio=args.range_ratio,
                           dist=args.length_dist, sigma=args.lognormal_sigma, seed=seed)


def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"no --model given and {base_url}/models did not name one: {e}") from None


def expert_load_table(base_url: str, api_key: str | None) -> dict | None:
    """GET /v1/expert_load (moeserve with --expert-load-telemetry); None where the server has no such endpoint."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/expert_load", headers=headers, timeout=30)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _jsonable(x):
    """Infinite rates as the string "inf" (as vLLM writes them), so the file is strict JSON."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def run_bench_serve(args: argparse.Namespace) -> int:
    slo = parse_goodput(args.goodput)
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    rates = [float(x) for x in args.ramp.split(",") if x.strip()] if args.ramp else [args.request_rate]
    if not rates:
        raise ValueError("--ramp needs at least one rate")
    if args.plot and not have_matplotlib():
        raise ValueError("--plot needs matplotlib: pip install 'moeserve[bench]'")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("MOESERVE_API_KEY")
    model = args.model or first_model(args.base_url, api_key)
    target = Target(base_url=args.base_url, model=model, endpoint=args.endpoint, api_key=api_key,
                    temperature=args.temperature, ignore_eos=args.ignore_eos)

    def on_step(rep):
        load = f"rate {rep['request_rate']:g} req/s"
        if rep["max_concurrency"]:
            load += f", max concurrency {rep['max_concurrency']}"
        print(format_report(rep, load), flush=True)

    result = asyncio.run(run_ramp(
        target, lambda i: make_requests(args, i), rates,
        collapse_below=args.ramp_collapse if args.ramp else -1.0, on_step=on_step,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, slo=slo, seed=args.seed,
        progress=not args.no_progress))
    if args.ramp:
        at = result["stopped_at"]
        print(f"ramp: stopped at {at:g} req/s (SLO attainment below {args.ramp_collapse:.0%})" if at is not None
              else f"ramp: every step kept SLO attainment at or above {args.ramp_collapse:.0%}")
    result.update(base_url=args.base_url, model=model, endpoint=args.endpoint, dataset=args.dataset,
                  num_prompts=args.num_prompts, seed=args.seed)
    if args.save_result:
        with open(args.save_result, "w", encoding="utf-8") as f:
            json.dump(_jsonable(result), f, indent=2)
    if args.plot:
        plot_steps(result["steps"], args.plot, title=f"{model} ({args.endpoint}, {args.dataset})")
        table = expert_load_table(args.base_url, api_key)
        if table is not None and plot_expert_load(table, expert_load_path(args.plot), title=model):
            print(f"expert load heat map: {expert_load_path(args.plot)}")
    return 0 if all(s["completed"] > 0 for s in result["steps"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
