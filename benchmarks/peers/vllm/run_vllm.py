"""vLLM 0.26.0 on the pinned workloads, the same prompts, lengths, seeds and limits as moeserve's worker.

Three ways to run it:

  worker (what bench_suite.py runs per engine; same flags as benchmarks/moeserve_worker.py):
      python benchmarks/peers/vllm/run_vllm.py --shape qwen3-30b-a3b --out /tmp/vllm.json [--deadline UNIX_T]
  standalone, one device call (measures the roofline too when no suite result is beside it, then writes
  engines.vllm into <out-dir>/<date>-<gpu>-<shape>-<workload>.json, creating or merging):
      python benchmarks/peers/vllm/run_vllm.py --shape qwen3-30b-a3b --out-dir $OUT --deadline-s 480
  merge, on this machine, a standalone result's engines.vllm into the suite's result of the same run:
      python benchmarks/peers/vllm/run_vllm.py --merge-from VLLM.json --into benchmarks/results/SUITE.json

vLLM is imported from --site (default $VLLM_SITE or /tmp/vllm_site, where device_install.sh put it), in this
process only: moeserve's and transformers' workers never see it. The model is the shape's config.json from
moeserve's catalog in a temporary folder, weights `load_format="dummy"` (or, with --model and --load-format auto,
a checkpoint's own weights, e.g. benchmarks/random_checkpoint.py's), prompts as token ids
(skip_tokenizer_init), greedy, ignore_eos. TTFT and TPOT come from vLLM's own per-request timestamps
(first_token_latency; last - first token time over output - 1), the definitions of ../shared/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent.parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import traffic  # noqa: E402
from worker_common import (Partial, base_parser, fit_throughput, latency_table,  # noqa: E402
                           require_device, summarize_latency_runs, worker_plan)
from workloads import LatencySpec, latency_prompts, median, spec_dict, throughput_prompts  # noqa: E402

DEFAULT_SITE = "/tmp/vllm_site"
VLLM_VERSION = "0.26.0"
# The device has no network: nothing may try the hub, and vLLM must not phone home.
# VLLM_USE_FLASHINFER_SAMPLER=0: vLLM's sampler imports FlashInfer's attention backend (left behind) when it is
# built, unless told not to; every request here is greedy, which never reaches the top-k/top-p sampler anyway.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0",
             # the worker has touched CUDA (device check) before vLLM starts its engine-core process: fork fails
             "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


# ---------------------------------------------------------------- environment and model folder

def use_site(site: str | None) -> str | None:
    """Put the carried vLLM install first on sys.path and PYTHONPATH (for vLLM's own child processes)."""
    site = site or os.environ.get("VLLM_SITE") or DEFAULT_SITE
    if not Path(site).is_dir():
        return None
    if site not in sys.path:
        sys.path.insert(0, site)
    pp = os.environ.get("PYTHONPATH", "")
    if site not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = site + (os.pathsep + pp if pp else "")
    return site


def model_config(a) -> dict:
    if a.model:
        return json.loads((Path(a.model) / "config.json").read_text())
    from shapes import get_shape, load_config

    return load_config(get_shape(a.shape))


def model_dir_for(config: dict, root: str | None = None) -> tuple[str, list[str]]:
    """A folder holding only config.json, as vLLM wants for load_format="dummy". Returns it and what was changed.

    `auto_map` is dropped (no remote code travels: the architecture is one transformers and vLLM know natively).
    A `quantization_config` stays (fp8 block-scaled R1, int4 Kimi K2.5): vLLM's dummy weights then have the
    checkpoint's precision, as moeserve's do.
    """
    cfg = dict(config)
    changed = [k for k in ("auto_map",) if cfg.pop(k, None) is not None]
    d = Path(tempfile.mkdtemp(prefix="vllm_model_", dir=root))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(d), changed


def engine_kwargs(a, model_dir: str) -> dict:
    kw = dict(model=model_dir, load_format=a.load_format, dtype=a.dtype, max_model_len=a.max_model_len,
              max_num_seqs=a.max_num_seqs, gpu_memory_utilization=a.gpu_memory_utilization, seed=0,
              skip_tokenizer_init=True, disable_log_stats=False, trust_remote_code=False)
    for kv in a.engine_arg:
        if "=" not in kv or kv.startswith("="):
            raise SystemExit(f"--engine-arg wants key=value, got {kv!r}")
    kw.update(traffic.engine_kwargs(a.engine_arg))
    return kw


# ---------------------------------------------------------------- runs

def sampling(max_tokens: int | list[int]):
    from vllm import SamplingParams

    if isinstance(max_tokens, list):  # one per prompt (varlen), as moeserve's worker does
        cache: dict = {}
        return [cache.setdefault(n, sampling(n)) for n in max_tokens]
    # no per-request seed: greedy needs none, and a seeded request takes vLLM's slower per-request sampler path
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def times_of(out) -> tuple[float, float] | None:
    """(TTFT s, e2e s) of one request from vLLM's RequestStateStats: first_token_latency (arrival to first token)
    and, for the last token, that plus last_token_ts - first_token_ts (both engine-core monotonic clocks)."""
    m = getattr(out, "metrics", None)
    if m is None:
        return None
    ttft = getattr(m, "first_token_latency", 0.0)
    first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
    if not ttft or not first or not last:
        return None
    return ttft, ttft + (last - first)


def generate(llm, prompts: list[list[int]], max_tokens: int):
    """One offline generate of all prompts at once; checks every completion has exactly max_tokens tokens.

    No torch.cuda.synchronize here: generate() returns only when the engine process has finished, and a CUDA
    context in this front-end process would take GPU memory vLLM's budget does not know about.
    """
    reqs = [{"prompt_token_ids": ids} for ids in prompts]
    t = time.perf_counter()
    outs = llm.generate(reqs, sampling(max_tokens), use_tqdm=False)
    wall = time.perf_counter() - t
    traffic.check_lengths(outs, prompts, max_tokens)
    return outs, wall


def request_times(metrics, output_len: int) -> tuple[float, float] | None:
    """(TTFT ms, TPOT ms) of one request from vLLM's RequestStateStats, or None when it kept none."""
    if metrics is None:
        return None
    ttft = getattr(metrics, "first_token_latency", 0.0)
    first, last = getattr(metrics, "first_token_ts", 0.0), getattr(metrics, "last_token_ts", 0.0)
    if not ttft or not first or not last or output_len < 2:
        return None
    return 1e3 * ttft, 1e3 * (last - first) / (output_len - 1)


def latency_run(llm, spec: LatencySpec, batch: int, repeat: int, vocab: int) -> dict:
    prompts = latency_prompts(spec, batch, repeat, vocab)
    outs, e2e = generate(llm, prompts, spec.output_len)
    run = {"repeat": repeat, "e2e_ms": 1e3 * e2e}
    times = [request_times(o.metrics, spec.output_len) for o in outs]
    if all(t is not None for t in times):
        run["ttft_ms"] = median([t[0] for t in times])
        run["tpot_ms"] = median([t[1] for t in times])
        run["timing"] = "request metrics"
    else:  # same fallback as moeserve's worker: a one-token run of fresh prompts for TTFT, TPOT from the rest
        _, ttft = generate(llm, latency_prompts(spec, batch, repeat + 10_000, vocab), 1)
        run["ttft_ms"] = 1e3 * ttft
        run["tpot_ms"] = 1e3 * (e2e - ttft) / (spec.output_len - 1)
        run["timing"] = "wall clock: e2e of the batch and a max_tokens=1 run"
    run["decode_step_ms"] = run["tpot_ms"]  # the batch decodes together: one step per output token
    return run


def run_latency_round(llm, lat: LatencySpec, vocab: int, p: Partial, per_batch: dict, repeat: int) -> bool:
    for b in lat.batch_sizes:
        last = per_batch.get(b, {}).get("runs", [])
        need = 1.3 * (last[-1]["e2e_ms"] / 1e3 if last else 0.0)
        if p.time_left() < need + 5:
            p.note(f"latency batch {b} repeat {repeat} skipped: {p.time_left():.0f} s left before the deadline")
            return False
        t = time.perf_counter()
        run = latency_run(llm, lat, b, repeat, vocab)
        per_batch[b] = summarize_latency_runs(last + [run])
        p.data["latency"] = {**latency_table(per_batch), **_keep(p.data["latency"]),
                             "per_batch": {str(k): v for k, v in per_batch.items()}}
        p.phase(f"latency_b{b}_r{repeat}", time.perf_counter() - t)
    return True


def _keep(section: dict) -> dict:
    return {k: section[k] for k in ("spec", "timing", "version", "engine_args", "effective_config", "install")
            if k in section}


def run_throughput(llm, tp, lat, vocab: int, p: Partial, per_batch: dict, conc: int) -> None:
    tp = fit_throughput(tp, lat, per_batch, conc, p)
    n = tp.num_requests
    prompts = throughput_prompts(tp, vocab)
    outs, wall = generate(llm, prompts, tp.output_len)
    res = {"num_requests": n, "input_len": tp.input_len, "output_len": tp.output_len, "wall_s": wall,
           "output_tok_s": n * tp.output_len / wall, "total_tok_s": n * (tp.input_len + tp.output_len) / wall,
           "concurrency_limit": conc}
    times = [request_times(o.metrics, tp.output_len) for o in outs]
    if all(t is not None for t in times):
        res["ttft_ms_p50"] = median([t[0] for t in times])
    p.data["throughput"] = {**p.data["throughput"], **res}
    p.phase("throughput", wall)


def effective_config(llm) -> dict:
    """What vLLM chose on its own (KV blocks, batched-token budget, compilation): read back, never assumed."""
    out: dict = {}
    try:
        cfg = llm.llm_engine.vllm_config
    except AttributeError:
        return out
    cache, sched, comp = cfg.cache_config, cfg.scheduler_config, cfg.compilation_config
    out["block_size"] = getattr(cache, "block_size", None)
    out["num_gpu_blocks"] = getattr(cache, "num_gpu_blocks", None)
    if out["block_size"] and out["num_gpu_blocks"]:
        out["kv_capacity_tokens"] = out["block_size"] * out["num_gpu_blocks"]
    out["enable_prefix_caching"] = getattr(cache, "enable_prefix_caching", None)
    out["max_num_batched_tokens"] = getattr(sched, "max_num_batched_tokens", None)
    out["max_num_seqs"] = getattr(sched, "max_num_seqs", None)
    out["enable_chunked_prefill"] = getattr(sched, "enable_chunked_prefill", None)
    out["enforce_eager"] = getattr(cfg.model_config, "enforce_eager", None)
    for k in ("mode", "level", "cudagraph_mode"):
        v = getattr(comp, k, None)
        if v is not None:
            out[f"compilation_{k}"] = str(v)
    return out


def install_notes(parts_dir: str = "/root/vllm_parts") -> dict:
    """What fetch.py left behind or trimmed, when its summary travelled with the parts."""
    f = Path(os.environ.get("VLLM_PARTS", parts_dir)) / "carry_summary.json"
    if not f.is_file():
        return {}
    s = json.loads(f.read_text())
    return {"left_behind": sorted(s.get("left_behind", {})), "trimmed_from_vllm_wheel": s.get("trimmed_from_vllm_wheel", {}),
            "kept_image_version": s.get("kept_image_version", {})}


# ---------------------------------------------------------------- worker main

def worker_parser():
    ap = base_parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=0, help="0: the longest workload's input + output")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--engine-arg", action="append", default=[], help="extra LLM(...) keyword, key=value (JSON value)")
    ap.add_argument("--vocab-size", type=int, default=0, help="0: from the shape's config")
    ap.add_argument("--site", help=f"folder vLLM was installed into (default $VLLM_SITE or {DEFAULT_SITE})")
    traffic.add_args(ap)
    return ap


def worker_main(argv=None) -> int:
    ap = worker_parser()
    a = ap.parse_args(argv)
    wl, tp, lat = worker_plan(ap, a)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    site = use_site(a.site)
    p = Partial(a.out, "vllm", a.deadline)
    try:
        require_device(a.allow_cpu)
        cfg = model_config(a)
        vocab = a.vocab = a.vocab_size or int(cfg["vocab_size"])
        # dummy: a folder with config.json alone; a checkpoint's own weights (--load-format auto): the folder itself
        model_dir, changed = model_dir_for(cfg) if a.load_format == "dummy" else (a.model, [])
        kwargs = engine_kwargs(a, model_dir)
        p.data.update(device="cuda", workloads=wl, vocab_size=vocab, site=site, model=a.model or a.shape,
                      install={**install_notes(), "env": {k: os.environ[k] for k in QUIET_ENV}})
        if changed:
            p.note(f"config.json: dropped {', '.join(changed)}")
        t = time.perf_counter()
        import vllm
        from vllm import LLM

        p.phase("import", time.perf_counter() - t)
        version = getattr(vllm, "__version__", "?")
        if version.split("+")[0] != VLLM_VERSION:
            p.note(f"vLLM is {version}, not the pinned {VLLM_VERSION}")
        args = {k: v for k, v in kwargs.items() if k != "model"}
        p.data.update(version=version, engine_args=args)
        if "throughput" in wl:
            p.data["throughput"] = {"spec": spec_dict(tp), "version": version, "engine_args": args}
        if "latency" in wl:
            p.data["latency"] = {"spec": spec_dict(lat), "timing": "median over requests per run, median over runs",
                                 "version": version, "engine_args": args}
        traffic.start_sections(p, wl, a, {"version": version, "engine_args": args})
        t = time.perf_counter()
        llm = LLM(**kwargs)
        p.phase("startup", time.perf_counter() - t)
        eff = effective_config(llm)
        p.data["effective_config"] = eff
        for w in wl:
            p.data[w].update(effective_config=eff, install=p.data["install"])
        p.save()
        t = time.perf_counter()  # warm-up outside the timed runs, the same two runs as moeserve's worker
        warm_in = tp.input_len if "throughput" in wl else lat.input_len
        generate(llm, latency_prompts(lat, 2, -1, vocab), 4)
        generate(llm, latency_prompts(LatencySpec(input_len=warm_in, output_len=4), min(16, a.max_num_seqs), -2, vocab), 4)
        p.phase("warmup", time.perf_counter() - t)
        per_batch: dict = {}
        if "latency" in wl:
            run_latency_round(llm, lat, vocab, p, per_batch, 0)
        if "throughput" in wl:
            kv = eff.get("kv_capacity_tokens")
            conc = a.max_num_seqs if not kv else max(1, min(a.max_num_seqs, int(kv) // (tp.input_len + tp.output_len)))
            run_throughput(llm, tp, lat, vocab, p, per_batch, conc)
        if "latency" in wl:
            for r in range(1, lat.repeats):
                if not run_latency_round(llm, lat, vocab, p, per_batch, r):
                    break
        traffic.run_traffic(wl, lambda prompts, n: generate(llm, prompts, n), times_of, a, p)
    except BaseException as e:  # noqa: BLE001 - the partial file must say why, whatever stopped the worker
        import traceback

        traceback.print_exc()
        p.data["error"] = f"{type(e).__name__}: {e}"
        p.data["status"] = "failed"
        p.save()
        return 1
    p.done()
    return 0


if __name__ == "__main__":
    if any(x in sys.argv[1:] for x in ("--out-dir", "--merge-from")):
        from peer_driver import main as driver_main

        raise SystemExit(driver_main())
    raise SystemExit(worker_main())
