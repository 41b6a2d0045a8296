"""Where a traffic workload's time goes, step by step (issue 16.2): what each engine step carried (decode rows,
prefill tokens, requests waiting), the host's time to launch it, the GPU's time from its first to its last kernel,
and the wall time of the whole engine step; summed by kind of step. Optionally a kernel profile of a window of
steps.

    python3 benchmarks/kernels/step_trace.py --shape qwen3-30b-a3b --workload varlen [--engine-arg k=v ...]
        [--jsonl trace.jsonl]      # --workload varlen@300:310 also profiles steps 300..310 of a rerun

The workload's prompts and lengths are benchmarks/workloads.py's (the same the suite gives moeserve and vLLM).
The GPU time of a step is the gap between two CUDA events recorded around its launch: a step the host launches
slower than the GPU runs it shows the host's pace there too, and its host launch time says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from traffic import engine_kwargs  # noqa: E402
from workloads import (  # noqa: E402
    LongctxSpec, PrefixSpec, ThroughputSpec, VarlenSpec, longctx_prompts, prefix_prompts, throughput_prompts,
    varlen_prompts,
)


def shifted(prompts: list[list[int]], k: int, vocab: int) -> list[list[int]]:
    """The same lengths and the same sharing between prompts, other tokens: no prefix-cache hit on an earlier run."""
    return [[(t + k) % vocab for t in p] for p in prompts]


def workload(name: str, vocab: int, n: int | None):
    if name == "throughput":  # the suite's fixed lengths; 512 requests, as the suite's fp8 runs give it
        spec = ThroughputSpec(num_requests=n or 512)
        return throughput_prompts(spec, vocab), [spec.output_len] * spec.num_requests
    if name == "varlen":
        spec = VarlenSpec(num_requests=n or VarlenSpec.num_requests)
        return varlen_prompts(spec, vocab)
    if name == "prefix":
        spec = PrefixSpec()
        prompts = prefix_prompts(spec, vocab)
        return prompts, [spec.output_len] * len(prompts)
    if name.startswith("longctx"):  # longctx:LEN:BATCH
        _, L, B = name.split(":")
        spec = LongctxSpec()
        return longctx_prompts(spec, int(L), int(B), 0, vocab), [spec.output_len] * int(B)
    raise SystemExit(f"unknown workload {name}")


class Tracer:
    """Wraps one in-process engine's step and launch; keeps one record per step. With DP attention it wraps the
    launch of every DP rank's step at once: tokens and rows are summed over the ranks, per-rank counts kept, and the
    GPU time is DP rank 0's (its rank is in this process; the experts' collectives hold it to the slowest rank)."""

    def __init__(self, eng, sync: bool = False):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.sync = sync and self.cuda
        self.eng = eng
        self.rows: list[dict] = []
        self._cur: dict | None = None
        self.data_parallel = len(eng.schedulers) > 1
        self._name = "_launch_data_parallel" if self.data_parallel else "_launch"
        launch, step = getattr(eng, self._name), eng.step

        def timed(batches, call):
            ev0, ev1 = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if self.cuda else (None, None)
            counts = []
            for batch in batches:
                n = batch.num_tokens
                counts.append((len(n), sum(n), sum(1 for r, k in zip(batch.requests, n)
                                                   if k == 1 and r.num_computed_tokens >= r.num_prompt_tokens)))
            if self.cuda:
                ev0.record()
            t = time.perf_counter()
            out = call()
            host = time.perf_counter() - t
            if self.cuda:
                ev1.record()
            reqs, tokens, decode = (sum(c[i] for c in counts) for i in range(3))
            self._cur.update(reqs=reqs, tokens=tokens, decode_rows=decode, prefill_tokens=tokens - decode,
                             host_launch_s=host, ev=(ev0, ev1), preempted=sum(b.num_preempted for b in batches))
            if self.data_parallel:
                self._cur["per_rank_tokens"] = [c[1] for c in counts]
            return out

        def traced_launch(batch):
            return timed([batch], lambda: launch(batch))

        def traced_launch_dp(batches, asynchronous):
            return timed(batches, lambda: launch(batches, asynchronous))

        def traced_step():
            if self.sync:  # the GPU idle at each step's start: host_launch_s is the host's own cost
                torch.cuda.synchronize()
            scheds = eng.schedulers
            self._cur = {"waiting": sum(len(s.waiting) for s in scheds), "running": sum(len(s.running) for s in scheds),
                         "t": time.time()}
            t = time.perf_counter()
            out = step()
            self._cur["wall_s"] = time.perf_counter() - t
            self.rows.append(self._cur)
            return out

        setattr(eng, self._name, traced_launch_dp if self.data_parallel else traced_launch)
        eng.step = traced_step

    def restore(self) -> None:
        eng = self.eng
        eng.step = type(eng).step.__get__(eng)
        setattr(eng, self._name, getattr(type(eng), self._name).__get__(eng))

    def finish(self) -> list[dict]:
        if self.cuda:
            self.torch.cuda.synchronize()
        for r in self.rows:
            ev = r.pop("ev", None)
            r["gpu_s"] = ev[0].elapsed_time(ev[1]) / 1e3 if ev and ev[0] is not None else r.get("host_launch_s", 0.0)
            r["kind"] = ("idle" if "tokens" not in r else "decode" if r["prefill_tokens"] == 0
                         else "prefill" if r["decode_rows"] == 0 else "mixed")
        return self.rows


def summarize(rows: list[dict], wall: float, out_tokens: int) -> str:
    lines = [f"wall {wall:.2f} s, {len(rows)} steps, {out_tokens / wall:.0f} output tok/s; "
             f"sum of step walls {sum(r['wall_s'] for r in rows):.2f} s, GPU {sum(r['gpu_s'] for r in rows):.2f} s, "
             f"host launch {sum(r.get('host_launch_s', 0) for r in rows):.2f} s, "
             f"preempted {sum(r.get('preempted', 0) for r in rows)}"]
    lines.append(f"  {'kind':8s} {'steps':>6s} {'wall s':>8s} {'GPU s':>8s} {'host s':>8s} {'tok/step':>9s} "
                 f"{'dec rows':>9s} {'pf tok':>8s} {'ms/step':>8s} {'GPU ms':>8s}")
    for kind in ("decode", "mixed", "prefill", "idle"):
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        n = len(rs)
        w, g, h = (sum(r.get(k, 0.0) for r in rs) for k in ("wall_s", "gpu_s", "host_launch_s"))
        lines.append(f"  {kind:8s} {n:6d} {w:8.2f} {g:8.2f} {h:8.2f} {sum(r.get('tokens', 0) for r in rs) / n:9.1f} "
                     f"{sum(r.get('decode_rows', 0) for r in rs) / n:9.1f} "
                     f"{sum(r.get('prefill_tokens', 0) for r in rs) / n:8.1f} {1e3 * w / n:8.2f} {1e3 * g / n:8.2f}")
    # decode steps by batch size: the tail of a run (few rows left) costs as much per step as a full batch
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        buckets: dict[int, list[dict]] = {}
        for r in dec:
            b = 1 << max(0, (r["reqs"] - 1).bit_length())
            buckets.setdefault(b, []).append(r)
        lines.append("  decode steps by rows (<=): " + ", ".join(
            f"{b}: {len(rs)} steps {1e3 * sum(r['gpu_s'] for r in rs) / len(rs):.2f} ms GPU"
            for b, rs in sorted(buckets.items())))
    slow = sorted(range(len(rows)), key=lambda i: -rows[i]["wall_s"])[:5]
    lines.append("  slowest steps: " + ", ".join(
        f"#{i} {rows[i]['kind']} {rows[i].get('tokens', 0)} tok {1e3 * rows[i]['wall_s']:.0f} ms" for i in slow))
    dp = [r for r in rows if r.get("per_rank_tokens")]
    if dp:  # DP: a step is as long as its busiest rank; the others wait in the experts' collectives
        uneven = [r for r in dp if max(r["per_rank_tokens"]) > 2 * max(1, min(r["per_rank_tokens"]))]
        lines.append(f"  DP steps with one rank at > 2x another's tokens: {len(uneven)} of {len(dp)}, "
                     f"{sum(r['gpu_s'] for r in uneven):.2f} s GPU; tokens per rank summed: "
                     f"{[sum(r['per_rank_tokens'][d] for r in dp) for d in range(len(dp[0]['per_rank_tokens']))]}")
    mix = [r for r in rows if r["kind"] in ("mixed", "prefill")]
    if mix:
        buckets = {}
        for r in mix:
            b = 1 << max(0, (r["tokens"] - 1).bit_length())
            buckets.setdefault(b, []).append(r)
        lines.append("  prefill/mixed steps by tokens (<=): " + ", ".join(
            f"{b}: {len(rs)} steps {1e3 * sum(r['gpu_s'] for r in rs) / len(rs):.1f} ms GPU "
            f"{1e3 * sum(r['host_launch_s'] for r in rs) / len(rs):.1f} ms host"
            for b, rs in sorted(buckets.items())))
    return "\n".join(lines)


def profile_window(eng, steps: int, top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    ev = prof.key_averages()
    rows = sorted((e for e in ev if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows)
    host = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    print("  host, self CPU ms/step: " + ", ".join(f"{e.key[:40]}={e.self_cpu_time_total / steps / 1e3:.2f}"
                                                  f" ({e.count / steps:.0f}x)" for e in host))
    print(f"  profile of {steps} steps: GPU {total / 1e3 / steps:.2f} ms/step")
    for e in rows[:top]:
        print(f"    {e.key[:72]:72s} {e.count / steps:7.1f}/step {e.self_device_time_total / steps / 1e3:8.3f} ms/step "
              f"{100 * e.self_device_time_total / total:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--model", default="", help="a local checkpoint or config.json instead of the shape's (testing)")
    ap.add_argument("--workload", action="append", required=True,
                    help="throughput | varlen | prefix | longctx:LEN:BATCH, each optionally @A:B to profile steps "
                         "A..B of a rerun (repeatable: run in order on one engine)")
    ap.add_argument("--num-requests", type=int, default=0, help="varlen: fewer requests than the suite's")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--engine-arg", action="append", default=[])
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--sync", action="store_true",
                    help="synchronize before every step (no overlap): a step's host launch time is then its own")
    ap.add_argument("--jsonl", default="")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no warm-up run before each workload: its first run pays what a fresh engine pays (Triton "
                         "compiles and tunes of shapes start-up did not see), as the suite's single run does")
    ap.add_argument("--ab-shared-prefix", action="store_true",
                    help="run each workload twice on the one engine: decode rows alone, then grouped by shared "
                         "prefix (engine/shared_prefix), the second one's figures beside the first's")
    a = ap.parse_args()

    from shapes import get_shape

    from moeserve import LLM, SamplingParams

    kwargs = dict(model=a.model or get_shape(a.shape).hub_id, load_format="dummy", dtype="bfloat16",
                  max_model_len=a.max_model_len, max_num_seqs=256, gpu_memory_utilization=0.90, seed=0)
    kwargs.update(engine_kwargs(a.engine_arg))
    t = time.perf_counter()
    llm = LLM(**kwargs)
    eng = llm.llm_engine
    print(f"== {a.shape} {kwargs}: start-up {time.perf_counter() - t:.1f} s "
          f"{json.dumps({k: round(v, 1) for k, v in eng.timings.items()})}", flush=True)
    vocab = eng.hf_config.vocab_size

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    def submit(prompts, out_lens, tag):
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            eng.add_request(f"{tag}-{i}", p, params(n))

    runs = a.workload
    if a.ab_shared_prefix:
        runs = [f"{w}#{mode}" for w in a.workload for mode in ("alone", "grouped")]
    for run_index, arg in enumerate(runs):
        arg, _, mode = arg.partition("#")
        if mode:
            eng.runner.plan_shared = mode == "grouped"
            print(f"== decode rows {mode} (shared-prefix planning {'on' if eng.runner.plan_shared else 'off'})")
        steps_before = eng.runner.num_shared_steps
        wl, _, window = arg.partition("@")
        prompts, out_lens = workload(wl, vocab, a.num_requests or None)
        # each run on tokens of its own (a workload given twice would hit the first run's prefix cache)
        base = 10 * run_index
        prompts = shifted(prompts, base, vocab)
        # warm-up: the same lengths' kernels compiled and tuned, outside the figures, on other tokens (with the
        # workload's own, its first prompts would hit the prefix cache in the traced run)
        w = max(1, len(prompts) // 8)
        if not a.no_warmup:
            llm.generate([{"prompt_token_ids": p} for p in shifted(prompts[:w], 3, vocab)],
                         [params(min(n, 16)) for n in out_lens[:w]])
        tr = Tracer(eng, a.sync)
        submit(prompts, out_lens, wl)
        t = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        wall = time.perf_counter() - t
        rows = tr.finish()
        tr.restore()
        print(f"-- {wl}: {len(prompts)} requests, {sum(map(len, prompts))} input + {sum(out_lens)} output tokens")
        print(summarize(rows, wall, sum(out_lens)), flush=True)
        print(f"  decode steps with shared-prefix groups: {eng.runner.num_shared_steps - steps_before}", flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                for i, r in enumerate(rows):
                    f.write(json.dumps({"workload": wl, "step": i, **r}) + "\n")
        if window:
            lo, hi = (int(x) for x in window.split(":"))
            submit(shifted(prompts, 5, vocab), out_lens, wl + "-p")  # the traced run's work, no cache hit on it
            for _ in range(lo):
                eng.step()
            profile_window(eng, hi - lo, a.top)
            eng.abort_request([rid for rid in list(eng.parents)])
            while eng.has_unfinished_requests():
                eng.step()


if __name__ == "__main__":
    main()
