"""Two OpenAI servers, one after the other, under the same load: `moeserve serve` and `vllm serve` with the same
flags, each measured by `moeserve bench serve` (client side only; vLLM's `bench serve` metric definitions), the
results side by side. Server-level numbers (TTFT/TPOT/ITL under arrivals, goodput) and the layouts vLLM's offline
API refuses (data parallelism) are compared here.

    python benchmarks/serve_pair.py --model Qwen/Qwen3-30B-A3B --serve-args "-dp 2 --enable-expert-parallel" \\
        --bench-args "--dataset random --length-dist lognormal --input-len 512 --output-len 256 --num-prompts 400 \\
        --request-rate 20" --out-dir $OUT/serve

Weights are dummy (`--load-format dummy`) and no tokenizer is downloaded: both servers get the tests' small
byte-level BPE tokenizer (tests/tiny_checkpoints.make_tokenizer), so both see the same token ids for the same
prompts, and the model's vocabulary is cut to the tokenizer's (`--hf-overrides {"vocab_size": N}`, both servers)
so that every sampled token has text to stream. `--random-weights DIR` instead writes one random checkpoint of the
model's config (benchmarks/random_checkpoint.py: transformers' init scale, so routers spread tokens as trained ones
do; the vocabulary cut and `--config-overrides`, e.g. fewer layers, are in its config) and both servers load it:
the same weights route the same tokens in both engines, which dummy weights do not promise. On the device vLLM comes from the carried install
($VLLM_SITE, default /tmp/vllm_site; benchmarks/peers/vllm/README.md), which also carries fastapi/uvicorn/pydantic
for moeserve's server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks" / "peers" / "vllm"))

SUMMARY = ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "total_token_throughput",
           "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "median_itl_ms", "p99_itl_ms", "goodput")


def model_dir(model: str, root: Path) -> str:
    """vLLM wants a folder with config.json for dummy weights; moeserve takes the catalog id or the folder."""
    from run_vllm import model_dir_for

    p = Path(model)
    if p.is_dir():
        return str(p)
    from moeserve.plan.catalog_index import resolve_catalog

    found = resolve_catalog(model)
    if found is None:
        raise SystemExit(f"{model}: neither a folder nor a catalog id")
    return model_dir_for(json.loads(Path(found).read_text()), root=str(root))[0]


def random_checkpoint(model: str, overrides: dict, out: Path) -> str:
    """The model's config (a folder's config.json or the catalog's) with `overrides`, written as a random checkpoint
    into `out` by benchmarks/random_checkpoint.py (reused when the same config and seed are there)."""
    from moeserve.plan.arch import apply_hf_overrides

    p = Path(model)
    if p.is_dir():
        cfg = json.loads((p / "config.json").read_text())
    else:
        from moeserve.plan.catalog_index import resolve_catalog

        found = resolve_catalog(model)
        if found is None:
            raise SystemExit(f"{model}: neither a folder nor a catalog id")
        cfg = json.loads(Path(found).read_text())
    from random_checkpoint import build_in_subprocess

    if build_in_subprocess(apply_hf_overrides(cfg, overrides), out):
        raise SystemExit("random_checkpoint.py failed (see above)")
    return str(out)


def engine_command(engine: str, trace_steps: bool = False) -> list[str] | None:
    if engine == "moeserve":  # None: ServerProcess's default, python -m moeserve.cli serve
        return [sys.executable, str(REPO / "benchmarks" / "serve_step_trace.py"), "serve"] if trace_steps else None
    return [sys.executable, "-c", "import sys; from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; "
                                  "sys.exit(main())", "serve"]


def run_engine(engine: str, model: str, tokenizer: str, serve_args: list[str], bench_args: list[str],
               out_dir: Path, startup_timeout_s: float, site: str | None, trace_steps: bool = False,
               load_format: str = "dummy") -> dict:
    from run_vllm import QUIET_ENV

    from moeserve.server.process import ServerProcess

    env = dict(QUIET_ENV)  # offline, no telemetry; vLLM's own settings are ignored by moeserve
    paths = [str(REPO)] + ([site] if site else []) + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MOESERVE_STEP_TRACE_OUT"] = str(out_dir / f"{engine}-steps")  # read by serve_step_trace.py only
    args = [model, "--load-format", load_format, "--tokenizer", tokenizer, *serve_args]
    args += ["--served-model-name", "model"]
    result = {"engine": engine, "serve_args": args}
    t = time.monotonic()
    try:
        with ServerProcess(args, startup_timeout_s=startup_timeout_s, env=env, wait_path="/health",
                           stop_timeout_s=60.0, command=engine_command(engine, trace_steps), name=f"{engine} serve",
                           keep_log=str(out_dir / f"{engine}-server.log"), own_group=True) as s:
            result["startup_s"] = round(time.monotonic() - t, 1)
            print(f"--- {engine}: ready in {result['startup_s']} s at {s.base_url}", flush=True)
            save = out_dir / f"{engine}-bench.json"
            cmd = [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", s.base_url, "--model",
                   "model", "--no-progress", "--save-result", str(save), *bench_args]
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            subprocess.run(cmd, check=False, env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]})
            if save.exists():
                result["bench"] = json.loads(save.read_text())
            else:
                result["error"] = "bench serve wrote no result"
    except Exception as e:  # a server that fails to start is a result too
        result["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        print(f"!!! {engine}: {result['error']}", flush=True)
    return result


def summary(bench: dict) -> dict:
    """The headline figures of one bench result (the last step of a ramp)."""
    step = bench["steps"][-1] if isinstance(bench.get("steps"), list) and bench["steps"] else bench
    return {k: step.get(k) for k in SUMMARY if step.get(k) is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a catalog id (dummy weights) or a checkpoint folder")
    ap.add_argument("--engines", default="moeserve,vllm")
    ap.add_argument("--serve-args", default="", help="flags given to both servers (vLLM's names)")
    ap.add_argument("--vllm-serve-args", default="", help="flags for vLLM only")
    ap.add_argument("--moeserve-serve-args", default="", help="flags for moeserve only")
    ap.add_argument("--bench-args", default="--num-prompts 100", help="flags of `moeserve bench serve`")
    ap.add_argument("--out-dir", default="benchmarks/results/serve")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--tokenizer", default=None, help="default: the tests' small BPE tokenizer, built here")
    ap.add_argument("--trace-steps", action="store_true",
                    help="moeserve's server under serve_step_trace.py: its engine steps into OUT/moeserve-steps/")
    ap.add_argument("--random-weights", metavar="DIR", default=None,
                    help="write a random checkpoint of the model's config here (reused when it matches) and serve "
                         "it from both engines instead of dummy weights")
    ap.add_argument("--config-overrides", default="{}",
                    help="with --random-weights: JSON laid over the config the checkpoint is built from, e.g. "
                         "'{\"num_hidden_layers\": 24}'")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="serve_pair_"))
    tokenizer = a.tokenizer
    if tokenizer is None:
        from tiny_checkpoints import make_tokenizer

        tokenizer = str(root / "tokenizer")
        vocab = len(make_tokenizer(tokenizer))
        # Every id the model can sample must be one the tokenizer can write: with the model's own 150k-id vocabulary
        # a dummy model samples ids the small tokenizer does not have, whose text is empty, so streams carried
        # (almost) no text and text-based TTFT/ITL measured nothing (seen on an H100). Both servers get the
        # tokenizer's vocabulary size (the LM head shrinks alike for both); a random checkpoint is built with it.
        if a.random_weights:
            a.config_overrides = json.dumps({"vocab_size": vocab, **json.loads(a.config_overrides)})
        else:
            a.serve_args += " --hf-overrides " + shlex.quote(json.dumps({"vocab_size": vocab}))
    load_format = "dummy"
    if a.random_weights:
        a.model, load_format = random_checkpoint(a.model, json.loads(a.config_overrides), Path(a.random_weights)), "auto"
    site = os.environ.get("VLLM_SITE", "/tmp/vllm_site")
    site = site if Path(site).is_dir() else None
    results = {}
    for engine in [e for e in a.engines.split(",") if e]:
        model = a.model if engine == "moeserve" or a.random_weights else model_dir(a.model, root)
        extra = a.vllm_serve_args if engine == "vllm" else a.moeserve_serve_args
        results[engine] = run_engine(engine, model, tokenizer, shlex.split(a.serve_args) + shlex.split(extra),
                                     shlex.split(a.bench_args), out_dir, a.startup_timeout_s, site, a.trace_steps,
                                     load_format)
    table = {e: summary(r["bench"]) if "bench" in r else {"error": r.get("error")} for e, r in results.items()}
    report = {"model": a.model, "serve_args": a.serve_args, "bench_args": a.bench_args, "engines": results,
              "summary": table, "commit": os.environ.get("MOESERVE_COMMIT")}
    (out_dir / "serve_pair.json").write_text(json.dumps(report, indent=1))
    keys = [k for k in SUMMARY if any(k in t for t in table.values())]
    print("\n| metric | " + " | ".join(table) + (" | moeserve / vllm |" if len(table) == 2 else " |"))
    print("|---|" + "---|" * (len(table) + (len(table) == 2)))
    for k in keys:
        vals = [t.get(k) for t in table.values()]
        ratio = ""
        if len(vals) == 2 and all(isinstance(v, (int, float)) and v for v in vals):
            ratio = f" {vals[0] / vals[1]:.2f}x |"
        print(f"| {k} | " + " | ".join("—" if v is None else f"{v:,.2f}" for v in vals) + (" |" + ratio if ratio
                                                                                           else " |"))
    for e, t in table.items():
        if "error" in t:
            print(f"{e}: {t['error']}")
    return 0 if all("error" not in t for t in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
