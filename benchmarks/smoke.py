"""A quick end-to-end look at one shape on the GPU: start-up phases, KV capacity, TPOT at a few batch sizes.

Not a pinned benchmark (see bench_suite.py for those); used to catch problems before spending a long run.
    python3 benchmarks/smoke.py --shape Qwen/Qwen3-30B-A3B
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen/Qwen3-30B-A3B")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()

    from moeserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.shape, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              enforce_eager=args.eager)
    print(f"start-up {time.perf_counter() - t0:.1f}s", json.dumps(llm.llm_engine.memory_report()), flush=True)
    vocab = llm.llm_engine.hf_config.vocab_size
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input).tolist()} for _ in range(b)]
        p = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        t = time.perf_counter()
        outs = llm.generate(prompts, p)
        wall = time.perf_counter() - t
        ttft = np.median([o.metrics.first_token_time - o.metrics.arrival_time for o in outs])
        tpot = np.median([(o.metrics.finished_time - o.metrics.first_token_time) / (args.output - 1) for o in outs])
        print(f"batch {b:4d}: wall {wall:.2f}s  TTFT {ttft * 1e3:.1f} ms  TPOT {tpot * 1e3:.2f} ms  "
              f"out tok/s {b * args.output / wall:.0f}", flush=True)


if __name__ == "__main__":
    main()
