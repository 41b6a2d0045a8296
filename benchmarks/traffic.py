"""The traffic-like workloads of issue 16 (varlen, longctx, prefix), run the same way by every engine's worker.

A worker hands in two functions and nothing else differs between engines:
  gen(prompts, max_tokens) -> (outputs, wall_s): one offline generate of all prompts at once (max_tokens an int or
      one per prompt), greedy, ignore_eos, every completion checked to have exactly its max_tokens tokens;
  times_of(output) -> (ttft_s, e2e_s) | None: the request's time to first token and to its last token, from the
      engine's own per-request timestamps (moeserve: RequestOutput.metrics; vLLM: RequestStateStats), measured
      from the request's arrival, so in an all-at-once run they include queueing, as a user would see it.

Per-request TPOT = (e2e - ttft) / (output_len - 1). Where an engine keeps no per-request times, varlen/prefix
report throughput only and say so. longctx does not rely on them: its TTFT is the wall clock of a max_tokens=1
run of fresh prompts and its TPOT (e2e of a full run of other fresh prompts - that TTFT) / (output_len - 1),
identically for every engine (engine timestamps are recorded beside it).
"""

from __future__ import annotations

import json
import time

from workloads import (LongctxSpec, PrefixSpec, VarlenSpec, longctx_prompts, median, percentile, prefix_prompts,
                       spec_dict, varlen_prompts)

TRAFFIC = ("varlen", "longctx", "prefix")
ALL_WORKLOADS = ("throughput", "latency", *TRAFFIC)


def add_args(ap) -> None:
    """The traffic workloads' flags, shared by bench_suite.py and both workers."""
    v, lc, pf = VarlenSpec(), LongctxSpec(), PrefixSpec()
    ap.add_argument("--varlen-requests", type=int, default=v.num_requests)
    ap.add_argument("--varlen-input-median", type=float, default=v.input_median)
    ap.add_argument("--varlen-output-median", type=float, default=v.output_median)
    ap.add_argument("--varlen-sigma", type=float, default=v.input_sigma, help="lognormal shape, inputs and outputs")
    ap.add_argument("--varlen-input-max", type=int, default=v.input_max)
    ap.add_argument("--varlen-output-max", type=int, default=v.output_max)
    ap.add_argument("--longctx-lens", default=",".join(map(str, lc.input_lens)))
    ap.add_argument("--longctx-batches", default=",".join(map(str, lc.batch_sizes)))
    ap.add_argument("--longctx-output-len", type=int, default=lc.output_len)
    ap.add_argument("--prefix-groups", type=int, default=pf.num_groups)
    ap.add_argument("--prefix-group-size", type=int, default=pf.group_size)
    ap.add_argument("--prefix-len", type=int, default=pf.prefix_len)
    ap.add_argument("--prefix-suffix-len", type=int, default=pf.suffix_len)
    ap.add_argument("--prefix-output-len", type=int, default=pf.output_len)


FLAGS = ("varlen_requests", "varlen_input_median", "varlen_output_median", "varlen_sigma", "varlen_input_max",
         "varlen_output_max", "longctx_lens", "longctx_batches", "longctx_output_len", "prefix_groups",
         "prefix_group_size", "prefix_len", "prefix_suffix_len", "prefix_output_len")


def forward_args(a) -> list[str]:
    """The parsed traffic flags as argv, to hand them on to a worker."""
    out = []
    for k in FLAGS:
        out += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    return out


def engine_kwargs(pairs: list[str]) -> dict:
    """--engine-arg key=value pairs as keyword arguments: a value that reads as JSON is taken as JSON (numbers,
    booleans, lists), any other as the string it is (dtype=float32)."""
    out = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(s).split(",") if x)


def traffic_specs(a) -> tuple[VarlenSpec, LongctxSpec, PrefixSpec]:
    v = VarlenSpec(num_requests=a.varlen_requests, input_median=a.varlen_input_median, input_sigma=a.varlen_sigma,
                   input_max=a.varlen_input_max, output_median=a.varlen_output_median, output_sigma=a.varlen_sigma,
                   output_max=a.varlen_output_max)
    lc = LongctxSpec(input_lens=_ints(a.longctx_lens), batch_sizes=_ints(a.longctx_batches),
                     output_len=a.longctx_output_len)
    pf = PrefixSpec(num_groups=a.prefix_groups, group_size=a.prefix_group_size, prefix_len=a.prefix_len,
                    suffix_len=a.prefix_suffix_len, output_len=a.prefix_output_len)
    return v, lc, pf


def workloads_of(a) -> list[str]:
    wl = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in wl if w not in ALL_WORKLOADS]
    if bad or not wl:
        raise SystemExit(f"--workloads must name some of {', '.join(ALL_WORKLOADS)}, got {a.workloads!r}")
    return wl


def max_len_needed(wl: list[str], a) -> int:
    """The longest prompt + output of the traffic workloads named in wl (0 if none)."""
    v, lc, pf = traffic_specs(a)
    n = 0
    if "varlen" in wl:
        n = max(n, v.input_max + v.output_max)
    if "longctx" in wl:
        n = max(n, max(lc.input_lens) + lc.output_len)
    if "prefix" in wl:
        n = max(n, pf.prefix_len + pf.suffix_len + pf.output_len)
    return n


def fit_warmup(spec, max_model_len: int):
    """A throughput/latency spec used only for the warm-up runs, its prompts shortened to fit max_model_len."""
    from dataclasses import replace

    return replace(spec, input_len=max(1, min(spec.input_len, max_model_len - 8)))


def start_sections(p, wl: list[str], a, extra: dict | None = None) -> None:
    v, lc, pf = traffic_specs(a)
    for name, spec in (("varlen", v), ("longctx", lc), ("prefix", pf)):
        if name in wl:
            p.data[name] = {"spec": spec_dict(spec), **(extra or {})}


# ---------------------------------------------------------------------------------------------- runs
def request_stats(outs, out_lens: list[int], times_of) -> dict:
    """TTFT / TPOT / e2e percentiles (ms) over the requests, or a note where the engine kept no times."""
    times = [times_of(o) for o in outs]
    if not all(t is not None for t in times):
        return {"timing": f"no per-request times from the engine ({sum(t is None for t in times)} of "
                          f"{len(times)} missing): throughput only"}
    ttft = [1e3 * t[0] for t in times]
    e2e = [1e3 * t[1] for t in times]
    tpot = [(e - f) / (n - 1) for (f, e, n) in zip(ttft, e2e, out_lens) if n >= 2]
    res = {"timing": "engine per-request timestamps, from arrival (all requests submitted at once)"}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("e2e_ms", e2e)):
        if xs:
            res[f"{name}_p50"] = percentile(xs, 50)
            res[f"{name}_p99"] = percentile(xs, 99)
            res[f"{name}_mean"] = sum(xs) / len(xs)
    return res


def run_varlen(gen, times_of, a, p) -> None:
    spec = traffic_specs(a)[0]
    prompts, out_lens = varlen_prompts(spec, a.vocab)
    in_tok, out_tok = sum(map(len, prompts)), sum(out_lens)
    p.note(f"varlen: {len(prompts)} requests, {in_tok} input + {out_tok} output tokens (longest prompt "
           f"{max(map(len, prompts))}, longest output {max(out_lens)})")
    outs, wall = gen(prompts, out_lens)
    res = {"num_requests": len(prompts), "input_tokens": in_tok, "output_tokens": out_tok, "wall_s": wall,
           "output_tok_s": out_tok / wall, "total_tok_s": (in_tok + out_tok) / wall,
           **request_stats(outs, out_lens, times_of)}
    p.data["varlen"] = {**p.data["varlen"], **res}
    p.phase("varlen", wall)


def run_prefix(gen, times_of, a, p) -> None:
    spec = traffic_specs(a)[2]
    prompts = prefix_prompts(spec, a.vocab)
    n = len(prompts)
    outs, wall = gen(prompts, spec.output_len)
    in_tok, out_tok = sum(map(len, prompts)), n * spec.output_len
    res = {"num_requests": n, "input_tokens": in_tok, "output_tokens": out_tok, "wall_s": wall,
           "output_tok_s": out_tok / wall, "total_tok_s": (in_tok + out_tok) / wall,
           "unique_input_tokens": spec.num_groups * spec.prefix_len + n * spec.suffix_len,
           **request_stats(outs, [spec.output_len] * n, times_of)}
    p.data["prefix"] = {**p.data["prefix"], **res}
    p.phase("prefix", wall)


def run_longctx(gen, times_of, a, p) -> None:
    """Per (prompt length, batch): a max_tokens=1 run (TTFT, wall clock), then a full run of other fresh prompts
    (TPOT from its wall clock minus that TTFT). Skips what the deadline leaves no room for, and says so."""
    spec = traffic_specs(a)[1]
    sec = p.data["longctx"]
    sec.setdefault("timing", "wall clock: TTFT = a max_tokens=1 run of fresh prompts; TPOT = (e2e of a "
                             "max_tokens=output_len run of other fresh prompts - TTFT) / (output_len - 1)")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "engine_ttft_ms_p50", "engine_tpot_ms_p50"):
        sec.setdefault(key, {})
    last = 0.0
    for L in spec.input_lens:
        if p.time_left() < 2.5 * last + 10:
            continue
        t = time.perf_counter()  # untimed: compile / autotune for this length stays out of the figures
        gen(longctx_prompts(spec, L, 1, -1, a.vocab), 2)
        p.phase(f"longctx_warmup_{L}", time.perf_counter() - t)
        for B in spec.batch_sizes:
            key = f"{L}x{B}"
            if p.time_left() < 2.5 * last + 10:
                p.note(f"longctx {key} skipped: {p.time_left():.0f} s left before the deadline")
                continue
            t = time.perf_counter()
            _, ttft = gen(longctx_prompts(spec, L, B, 0, a.vocab), 1)
            outs, e2e = gen(longctx_prompts(spec, L, B, 1, a.vocab), spec.output_len)
            sec["ttft_ms"][key] = 1e3 * ttft
            sec["tpot_ms"][key] = 1e3 * (e2e - ttft) / (spec.output_len - 1)
            sec["e2e_ms"][key] = 1e3 * e2e
            st = request_stats(outs, [spec.output_len] * B, times_of)
            if "ttft_ms_p50" in st:
                sec["engine_ttft_ms_p50"][key] = st["ttft_ms_p50"]
                sec["engine_tpot_ms_p50"][key] = st["tpot_ms_p50"]
            last = time.perf_counter() - t
            p.phase(f"longctx_{key}", last)


def run_traffic(wl: list[str], gen, times_of, a, p) -> None:
    """The traffic workloads named in wl, in a fixed order (the cheapest first)."""
    for name, fn in (("prefix", run_prefix), ("varlen", run_varlen), ("longctx", run_longctx)):
        if name not in wl:
            continue
        if p.time_left() < 15:
            p.note(f"{name} skipped: {p.time_left():.0f} s left before the deadline")
            continue
        fn(gen, times_of, a, p)


def check_lengths(outs, prompts, max_tokens) -> None:
    """Every completion must have exactly its max_tokens tokens (ignore_eos)."""
    want = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    if len(outs) != len(prompts):
        raise RuntimeError(f"asked for {len(prompts)} completions, got {len(outs)}")
    bad = [(len(o.outputs[0].token_ids), w) for o, w in zip(outs, want) if len(o.outputs[0].token_ids) != w]
    if bad:
        raise RuntimeError(f"ignore_eos run produced {len(bad)} completions of the wrong length (got, want: {bad[:3]})")


def speed_line(wl: list[str], data: dict) -> str:
    parts = []
    for w in wl:
        d = data.get(w) or {}
        if "output_tok_s" in d:
            parts.append(f"{w}: {d['output_tok_s']:.0f} out tok/s, TTFT p50 {d.get('ttft_ms_p50', float('nan')):.1f} ms")
    return "; ".join(parts)


__all__ = ["TRAFFIC", "ALL_WORKLOADS", "add_args", "forward_args", "traffic_specs", "workloads_of", "max_len_needed",
           "start_sections", "run_traffic", "check_lengths", "median"]
