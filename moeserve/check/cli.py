"""`moeserve check`: the pre-promotion checklist against a running server (`--url`) or one it starts
(`moeserve check [CHECK FLAGS] MODEL [SERVE FLAGS]`: check flags first, everything after MODEL goes to
`moeserve serve`). One line per item, PASS / FAIL / SKIP with the measured number and the threshold; exit 1 on
any FAIL, 2 on bad input. Client side only: imports moeserve.bench and moeserve.plan, never the engine."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from moeserve.bench.metrics import parse_goodput
from moeserve.check.runner import CheckConfig, run_checks
from moeserve.check.verdicts import exit_code


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", nargs="?", default=None,
                   help="start `moeserve serve MODEL` for the check (instead of --url)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="flags for `moeserve serve` (after MODEL)")
    g = p.add_argument_group("target")
    g.add_argument("--url", default=None, help="a running server's root URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--api-key", default=None, help="Bearer key (default: $MOESERVE_API_KEY)")
    g.add_argument("--served-model", default=None, help="model name to send (default: the first of /v1/models)")
    g.add_argument("--endpoint", default="completions", choices=["chat", "completions"])
    g = p.add_argument_group("load")
    g.add_argument("--peak-concurrency", type=int, default=None, help="the expected peak of requests in flight")
    g.add_argument("--peak-qps", type=float, default=None, help="the expected peak request rate (Poisson)")
    g.add_argument("--ramp", default="0.5,1,2", metavar="F1,F2,...",
                   help="ramp steps as fractions of the peak (the checklist asks for 2x)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests per step (default 4x the step's concurrency, or 10 s of arrivals)")
    g.add_argument("--workload", default=None, metavar="FILE.jsonl",
                   help="the workload's prompts/conversations (moeserve bench's JSONL); default random lengths")
    g.add_argument("--input-len", type=int, default=128, help="random workload: prompt words")
    g.add_argument("--output-len", type=int, default=64, help="max_tokens per request (ignore_eos is sent)")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:2000 tpot:50")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--probe-interval", type=float, default=0.25,
                   help="seconds between /health and /metrics probes during the ramp")
    g = p.add_argument_group("thresholds")
    g.add_argument("--min-slo-attainment", type=float, default=0.9, help="per ramp step")
    g.add_argument("--max-preemptions-per-request", type=float, default=0.1, help="a higher rate is a storm")
    g.add_argument("--max-kv-usage", type=float, default=0.95, help="peak moeserve:kv_cache_usage_perc")
    g.add_argument("--max-expert-imbalance", type=float, default=4.0, help="max/mean tokens per expert")
    g = p.add_argument_group("plan and layout")
    g.add_argument("--gpus", default=None, help="the fleet for the planner's numbers, e.g. 1xH100-80GB")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--plan-model", default=None, help="model for the planner (default: MODEL when started here)")
    for k in ("tp", "pp", "dp", "ep"):
        g.add_argument(f"--expect-{k}", type=int, default=None, help=f"the {k.upper()} size the server must run")
    g = p.add_argument_group("output")
    g.add_argument("--save-result", default=None, metavar="FILE.json", help="write the JSON report here")
    g.add_argument("--no-progress", action="store_true")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="the pre-promotion checklist against a server",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def config_from(args: argparse.Namespace, url: str) -> CheckConfig:
    if args.peak_concurrency is not None and args.peak_concurrency < 1:
        raise ValueError("--peak-concurrency must be at least 1")
    if args.peak_qps is not None and not args.peak_qps > 0:
        raise ValueError("--peak-qps must be positive")
    factors = tuple(float(x) for x in args.ramp.split(",") if x.strip())
    if not factors or any(not f > 0 or math.isinf(f) for f in factors):
        raise ValueError(f"--ramp takes positive fractions of the peak, got {args.ramp!r}")
    expect = {k: getattr(args, f"expect_{k}") for k in ("tp", "pp", "dp", "ep")
              if getattr(args, f"expect_{k}") is not None}
    return CheckConfig(
        url=url, api_key=args.api_key or os.environ.get("MOESERVE_API_KEY"), model=args.served_model,
        endpoint=args.endpoint, peak_concurrency=args.peak_concurrency, peak_qps=args.peak_qps,
        ramp_factors=factors, num_prompts=args.num_prompts, workload=args.workload, input_len=args.input_len,
        output_len=args.output_len, slo=parse_goodput(args.goodput), min_slo_attainment=args.min_slo_attainment,
        max_preemptions_per_request=args.max_preemptions_per_request, max_kv_usage=args.max_kv_usage,
        max_expert_imbalance=args.max_expert_imbalance, plan_model=args.plan_model or args.model, gpus=args.gpus,
        nodes=args.nodes, expect_layout=expect, seed=args.seed,
        probe_interval_s=args.probe_interval)


def report(results, raw) -> tuple[str, dict]:
    text = "\n".join(r.line() for r in results)
    n_fail = sum(r.status == "FAIL" for r in results)
    text += f"\n{'FAILED' if n_fail else 'PASSED'}: {sum(r.status == 'PASS' for r in results)} pass, " \
            f"{n_fail} fail, {sum(r.status == 'SKIP' for r in results)} skip"
    doc = {"passed": n_fail == 0, "checks": [r.to_dict() for r in results], "measurements": raw}
    return text, doc


def _jsonable(x):
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(val) for k, val in x.items()}
    if isinstance(x, list):
        return [_jsonable(val) for val in x]
    return x


def run(args: argparse.Namespace) -> int:
    if bool(args.url) == bool(args.model):
        raise ValueError("give either --url of a running server or a MODEL to start (not both)")
    if args.url:
        results, raw = run_checks(config_from(args, args.url), progress=not args.no_progress)
    else:
        from moeserve.check.probe import served_for_check

        cfg = config_from(args, "")
        serve_args = [args.model, *[a for a in args.serve_args if a != "--"]]
        own = {o for a in configure_parser(argparse.ArgumentParser())._actions for o in a.option_strings} - \
            {"-h", "--help", "--api-key", "--seed"}
        misplaced = [a for a in serve_args if a.split("=")[0] in own]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: check flags go before MODEL; everything after MODEL is "
                             f"passed to `moeserve serve`")
        if cfg.api_key and "--api-key" not in serve_args:
            serve_args += ["--api-key", cfg.api_key]
        print(f"moeserve check: starting moeserve serve {' '.join(serve_args)}", file=sys.stderr, flush=True)
        try:
            with served_for_check(serve_args) as server:
                cfg.url = server.url
                results, raw = run_checks(cfg, progress=not args.no_progress)
        except (RuntimeError, TimeoutError) as e:  # the server did not come up: say why, exit 2
            print(f"moeserve check: the server did not start: {e}", file=sys.stderr)
            return 2
        raw["serve_args"] = serve_args
    text, doc = report(results, raw)
    print(text, flush=True)
    if args.save_result:
        with open(args.save_result, "w", encoding="utf-8") as f:
            json.dump(_jsonable(doc), f, indent=2)
    return exit_code(results)


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="moeserve check", description=__doc__))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"moeserve check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
