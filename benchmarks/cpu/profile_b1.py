"""Profile batch-1 decode of the default model on CPU: aten ops per decode step and where the step's time goes.

    python benchmarks/cpu/profile_b1.py [--threads 2] [--steps 20] [--rows 30] [--stacks]

One 30-token prompt (the bench's), greedy. Prints the unprofiled decode rate (tok/s over --steps + 1 tokens
minus the first), then torch.profiler's op table over --steps decode steps: ops per step (views included) and
self CPU time per op kind. --stacks groups the ops by the moeserve source line that issued them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_default_model import PROMPT_LEN, TEXT, prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--stacks", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from moeserve import LLM, SamplingParams
    from moeserve.loader.gguf import default_model_path

    llm = LLM(model=default_model_path(), max_model_len=PROMPT_LEN + 160, max_num_seqs=16,
              kv_cache_memory_bytes=128 << 20)
    ids = prompts(llm.get_tokenizer()(TEXT)["input_ids"])[:1]
    batch = [{"prompt_token_ids": p} for p in ids]

    def gen(n: int) -> float:
        t = time.perf_counter()
        llm.generate(batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    gen(8)  # warm-up
    rates = []
    for _ in range(3):
        t1, tn = gen(1), gen(128)
        rates.append(127 / (tn - t1))
    print("unprofiled b1 decode tok/s:", " ".join(f"{r:.1f}" for r in rates))
    from torch.profiler import ProfilerActivity, profile

    t1 = gen(1)
    with profile(activities=[ProfilerActivity.CPU], with_stack=args.stacks) as prof:
        tn = gen(args.steps + 1)
    print(f"profiled: {(tn - t1) / args.steps * 1e3:.1f} ms a decode step (prefill step subtracted)")
    events = prof.events()
    # top-level ops only (those not called from inside another aten op), per step
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    n_all = sum(1 for e in events if e.name.startswith("aten::"))
    n_top = sum(1 for e in top if e.name.startswith("aten::"))
    print(f"aten ops per step (prefill step included in the total / (steps + 1)): all {n_all / (args.steps + 1):.0f}, "
          f"top-level {n_top / (args.steps + 1):.0f}")
    counts = Counter(e.name for e in top if e.name.startswith("aten::"))
    print("top-level ops per step by kind:")
    for name, c in counts.most_common(args.rows):
        print(f"  {c / (args.steps + 1):8.1f}  {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.stacks:
        lines = Counter()
        for e in top:
            if not e.name.startswith("aten::"):
                continue
            parent = e.cpu_parent
            while parent is not None and "moeserve/" not in parent.name:
                parent = parent.cpu_parent
            lines[parent.name.split("moeserve/", 1)[1] if parent is not None else "?"] += 1
        print("top-level ops per step by issuing line:")
        for frame, c in lines.most_common(40):
            print(f"  {c / (args.steps + 1):8.1f}  {frame}")


if __name__ == "__main__":
    main()
