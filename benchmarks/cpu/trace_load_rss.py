"""Where the default model's load peaks: current RSS and the running peak (ru_maxrss) at each step of an LLM(...)
load on CPU, as bench_default_model.py builds it (128 MB KV pool, 16 sequences).

    python benchmarks/cpu/trace_load_rss.py [--src DIR] [--fine]

Steps are marked by wrapping the loader's functions (read_gguf, decode_int4_terms, stack_rows,
Int4CPUMethod.pack's pack_term / dense_bf16, _lm_head_terms, to_empty, WeightLoader.load, trim, the KV pool);
a step's "peak+" is how much the process's peak grew during it. --src imports moeserve from another tree.
--batch then runs the bench's generations and reports RSS and peak after each (the KV pool's pages become
resident as they are first written, so they show up here, not at load). Peak = VmHWM (ru_maxrss would carry a
parent's peak over fork and exec).
"""

from __future__ import annotations

import argparse
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--src", default=None)
ap.add_argument("--fine", action="store_true", help="one line per call, not per kind of step")
ap.add_argument("--batch", action="store_true", help="then generate as the bench does (1, then 16 sequences)")
args = ap.parse_args()
if args.src:
    sys.path.insert(0, args.src)

_PAGE = 4096


def rss() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


def peak() -> float:
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    return int(status["VmHWM"].split()[0]) / 1024


rows: dict[str, list] = {}  # step -> [calls, total peak growth, max rss after, max transient over entry]
order: list[str] = []
t0 = time.perf_counter()


def mark(label: str, before: tuple[float, float]) -> None:
    r, p = rss(), peak()
    if args.fine:
        print(f"{time.perf_counter() - t0:7.2f}s {label:<40} rss {r:7.1f}  peak {p:7.1f}  peak+ {p - before[1]:6.1f}")
    row = rows.setdefault(label, [0, 0.0, 0.0, 0.0])
    if label not in order:
        order.append(label)
    row[0] += 1
    row[1] += p - before[1]
    row[2] = max(row[2], r)
    row[3] = max(row[3], p - before[0])


def wrap(owner, attr, label):
    fn = getattr(owner, attr)

    def wrapped(*a, **k):
        before = (rss(), peak())
        out = fn(*a, **k)
        mark(label, before)
        return out

    setattr(owner, attr, wrapped)
    return fn


import torch  # noqa: E402

print(f"after import torch: rss {rss():.1f} peak {peak():.1f}")
from moeserve import LLM, SamplingParams  # noqa: E402,F401
import moeserve.loader.gguf as G  # noqa: E402
import moeserve.layers.quant.gguf_blocks as B  # noqa: E402
import moeserve.layers.quant.int4_cpu as Q  # noqa: E402
import moeserve.loader.weights as W  # noqa: E402
import moeserve.engine.host_memory as H  # noqa: E402

print(f"after import moeserve: rss {rss():.1f} peak {peak():.1f}")
wrap(G, "read_gguf", "read_gguf (header, map, tokenizer)")
wrap(B, "decode_int4_terms", "decode_int4_terms")
wrap(B, "stack_rows", "stack_rows")
wrap(Q, "pack_term", "pack_term")
wrap(Q, "dense_bf16", "dense_bf16")
wrap(G, "_lm_head_terms", "_lm_head_terms (whole head)")
wrap(G.GGUFFile, "release_pages", "release_pages")
wrap(torch.nn.Module, "to_empty", "model.to_empty")
wrap(W.WeightLoader, "load", "WeightLoader.load (norms, dense rest)")
wrap(G, "_return_freed_heap", "malloc_trim in loader")
wrap(G, "load_gguf_model", "load_gguf_model (all)")
wrap(H, "trim", "engine host_memory.trim")
import moeserve.engine.engine as E  # noqa: E402
if hasattr(E, "host_memory"):
    E.host_memory = H
try:
    import moeserve.engine.kv_cache as KVC  # noqa: E402,F401
except ImportError:
    pass

t = time.perf_counter()
llm = LLM(model=G.default_model_path(), max_model_len=30 + 128 + 16, max_num_seqs=16,
          kv_cache_memory_bytes=128 << 20)
print(f"LLM(...) {time.perf_counter() - t:.2f} s; after: rss {rss():.1f} peak {peak():.1f}")
print(f"{'step':<40} {'calls':>5} {'peak+ MB':>9} {'max rss after':>14} {'max transient over entry':>25}")
for label in order:
    n, grow, r, tr = rows[label]
    print(f"{label:<40} {n:5d} {grow:9.1f} {r:14.1f} {tr:25.1f}")

if args.batch:
    text = ("The history of the city begins with a small fishing village on the banks of a wide river, where traders "
            "from the north and the south met every spring to exchange salt, wool, iron tools and stories about the "
            "lands beyond the mountains.")
    ids = llm.get_tokenizer()(text)["input_ids"]
    prompts = [{"prompt_token_ids": ids[i: i + 30]} for i in range(16)]
    for label, batch, n in (("b1, 8 tokens", prompts[:1], 8), ("b1, 128 tokens", prompts[:1], 128),
                            ("b16, 128 tokens", prompts, 128)):
        llm.generate(batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        print(f"after {label:<16} rss {rss():7.1f}  peak {peak():7.1f}")
