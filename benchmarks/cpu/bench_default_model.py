"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF) on CPU: moeserve vs transformers vs llama.cpp, side by side.

    python benchmarks/cpu/bench_default_model.py --reps 3 --threads 2 | tee benchmarks/cpu/results/DATE.txt

Every measurement runs in a fresh subprocess (so load time and peak RSS belong to one engine), engines
interleaved within each repeat; the table shows medians. Greedy, a 30-token prompt, 128 new tokens (EOS
ignored, so every engine produces exactly 128):
  load       building the model from the .gguf, libraries already imported (import time shown beside)
  b1 decode  (128 - 1) / (time for 128 tokens - time for 1 token), one sequence
  b16 output 16 * 128 / wall time of 16 different prompts at once (prefill included)
  peak RSS   the subprocess's maximum resident memory (ru_maxrss) over load, batch 1 and batch 16
llama-cpp-python has no batched generate: its b16 is not measured. An engine that is not installed is skipped.
--baseline-src DIR adds an engine "moeserve-base": moeserve imported from DIR (e.g. an older commit unpacked with
`git archive COMMIT moeserve | tar -x -C DIR`), interleaved with the others: before/after in one session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROMPT_LEN, NEW_TOKENS, BATCH = 30, 128, 16
ENGINES = ("moeserve", "transformers", "llama.cpp")


def prompts(tokenizer_ids: list[int]) -> list[list[int]]:
    """BATCH different 30-token prompts cut from one tokenized text (no two share a prefix)."""
    return [tokenizer_ids[i: i + PROMPT_LEN] for i in range(BATCH)]


TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river, where traders "
        "from the north and the south met every spring to exchange salt, wool, iron tools and stories about the "
        "lands beyond the mountains.")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_moeserve(path: str, threads: int) -> dict:
    t = time.perf_counter()
    from moeserve import LLM, SamplingParams
    imported = time.perf_counter() - t
    t = time.perf_counter()
    llm = LLM(model=path, max_model_len=PROMPT_LEN + NEW_TOKENS + 16, max_num_seqs=BATCH,
              kv_cache_memory_bytes=128 << 20)
    load = time.perf_counter() - t
    rss_load = rss_mb()
    ids = prompts(llm.get_tokenizer()(TEXT)["input_ids"])

    def gen(batch: list[list[int]], n: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return time.perf_counter() - t

    gen(ids[:1], 8)  # warm-up
    t1, t128 = gen(ids[:1], 1), gen(ids[:1], NEW_TOKENS)
    t16 = gen(ids, NEW_TOKENS)
    return {"import_s": imported, "load_s": load, "b1_decode_tok_s": (NEW_TOKENS - 1) / (t128 - t1),
            "b16_output_tok_s": BATCH * NEW_TOKENS / t16, "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb(),
            "kv_pool_mb": 128}


def run_transformers(path: str, threads: int) -> dict:
    t = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    imported = time.perf_counter() - t
    folder, name = os.path.split(path)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    load = time.perf_counter() - t
    rss_load = rss_mb()
    ids = prompts(tok(TEXT)["input_ids"])

    def gen(batch: list[list[int]], n: int) -> float:
        x = torch.tensor(batch)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t

    gen(ids[:1], 8)
    t1, t128 = gen(ids[:1], 1), gen(ids[:1], NEW_TOKENS)
    t16 = gen(ids, NEW_TOKENS)
    return {"import_s": imported, "load_s": load, "b1_decode_tok_s": (NEW_TOKENS - 1) / (t128 - t1),
            "b16_output_tok_s": BATCH * NEW_TOKENS / t16, "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb()}


def run_llama_cpp(path: str, threads: int) -> dict:
    t = time.perf_counter()
    from llama_cpp import Llama
    imported = time.perf_counter() - t
    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PROMPT_LEN + NEW_TOKENS + 16, n_threads=threads, n_batch=64, verbose=False)
    load = time.perf_counter() - t
    rss_load = rss_mb()
    ids = prompts(llm.tokenize(TEXT.encode(), add_bos=False))

    def gen(prompt: list[int], n: int) -> float:
        llm.reset()
        t, count = time.perf_counter(), 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == n:
                break
        return time.perf_counter() - t

    gen(ids[0], 8)
    t1, t128 = gen(ids[0], 1), gen(ids[0], NEW_TOKENS)
    return {"import_s": imported, "load_s": load, "b1_decode_tok_s": (NEW_TOKENS - 1) / (t128 - t1),
            "b16_output_tok_s": None, "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb()}


RUNNERS = {"moeserve": run_moeserve, "moeserve-base": run_moeserve, "transformers": run_transformers,
           "llama.cpp": run_llama_cpp}


def worker(engine: str, path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    print(json.dumps(RUNNERS[engine](path, threads)))


def available(engine: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"moeserve": "moeserve", "transformers": "transformers",
                                     "llama.cpp": "llama_cpp"}[engine]) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="a .gguf (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--baseline-src", default=None, help="a folder holding an older moeserve/ to run beside")
    args = ap.parse_args()
    if args.model is None:
        from moeserve.loader.gguf import default_model_path

        args.model = default_model_path()
    if args.worker:
        return worker(args.worker, args.model, args.threads)

    engines = [e for e in args.engines.split(",") if available(e)]
    if args.baseline_src:
        engines.insert(0, "moeserve-base")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads={args.threads}, reps={args.reps}; model {os.path.basename(args.model)}")
    print(f"# load average at start: {os.getloadavg()} (a shared machine: other jobs ran beside this one)")
    print(f"# skipped (not installed): {sorted(set(args.engines.split(',')) - set(engines)) or 'none'}")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for rep in range(args.reps):
        for engine in engines:  # interleaved: each repeat runs every engine once
            proc = subprocess.run([sys.executable, __file__, "--worker", engine, "--threads", str(args.threads),
                                   "--model", args.model], capture_output=True, text=True,
                                  env=dict(env, PYTHONPATH=args.baseline_src) if engine == "moeserve-base" else env)
            if proc.returncode != 0:
                print(f"# rep {rep} {engine}: FAILED\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[engine].append(r)
            print(f"rep {rep} {engine:13s} {json.dumps(r)}  load-avg {os.getloadavg()[0]:.1f}", flush=True)

    def med(engine: str, key: str) -> float | None:
        vals = [r[key] for r in results[engine] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    print(f"\n| median of {args.reps} | load | (import) | b1 decode tok/s | b16 output tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for e in engines:
        print(f"| {e} | {fmt(med(e, 'load_s'), '.2f')} s | {fmt(med(e, 'import_s'), '.1f')} s | "
              f"{fmt(med(e, 'b1_decode_tok_s'), '.1f')} | {fmt(med(e, 'b16_output_tok_s'), '.1f')} | "
              f"{fmt(med(e, 'peak_rss_mb'), '.0f')} |")
    ours = {k: med("moeserve", k) for k in ("b1_decode_tok_s", "b16_output_tok_s", "load_s", "peak_rss_mb")} \
        if "moeserve" in engines else {}
    if ours:
        lc = med("llama.cpp", "b1_decode_tok_s") if "llama.cpp" in engines else None
        hf = med("transformers", "b16_output_tok_s") if "transformers" in engines else None
        print("\ntargets (issue 14):")
        print(f"  b1 decode >= 0.5x llama.cpp: {fmt(ours['b1_decode_tok_s'] / lc if lc else None, '.2f')}x")
        print(f"  b16 output >= 1.5x transformers: {fmt(ours['b16_output_tok_s'] / hf if hf else None, '.2f')}x")
        base = med("moeserve-base", "b16_output_tok_s") if "moeserve-base" in engines else None
        if base and hf:
            print(f"  (baseline {args.baseline_src}: b16 {base / hf:.2f}x transformers; this tree / baseline "
                  f"{ours['b16_output_tok_s'] / base:.2f}x)")
        print(f"  load <= 5 s: {ours['load_s']:.2f} s")
        print(f"  peak RSS <= 600 MB + KV pool (128 MB): {ours['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
