"""Profile a batch-16 decode run of the default model on CPU (30-token prompts, 128 new tokens, greedy).

    python benchmarks/cpu/profile_b16.py [--threads 1] [--tokens 128] [--torch-profiler]

Prints the wall time, then either cProfile's top functions (cumulative and self) or torch.profiler's op table.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_default_model import BATCH, PROMPT_LEN, TEXT, prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--torch-profiler", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="only the unprofiled timing")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from moeserve import LLM, SamplingParams
    from moeserve.loader.gguf import default_model_path

    kw = {"dtype": args.dtype} if args.dtype else {}
    llm = LLM(model=default_model_path(), max_model_len=PROMPT_LEN + args.tokens + 16, max_num_seqs=BATCH,
              kv_cache_memory_bytes=128 << 20, **kw)
    ids = prompts(llm.get_tokenizer()(TEXT)["input_ids"])
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in ids]
    llm.generate(batch[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    llm.generate(batch, sp)
    wall = time.perf_counter() - t
    print(f"unprofiled: {wall:.2f} s, {BATCH * args.tokens / wall:.1f} tok/s")
    if args.no_profile:
        return
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(batch, sp)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        pr = cProfile.Profile()
        pr.enable()
        llm.generate(batch, sp)
        pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("cumulative").print_stats(45)
        st.sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
