"""On a machine with 2+ GPUs: each parallel layout against one GPU, on tiny random checkpoints in fp32.

    python3 benchmarks/multi_gpu_check.py [--archs LlamaForCausalLM,Qwen3MoeForCausalLM,...]

For each architecture: greedy tokens of one GPU, then of each layout that fits the GPUs present (TP, PP, TP x PP,
and for MoE models TP+EP and DP+EP), through the real multi-process engine (NCCL, CUDA graphs). Prints one line
per layout and exits 1 if any layout's tokens differ or a layout was left unrun for lack of time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 60, 130)] + [[7] * 33]
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "tp2_ep": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "dp2_ep": dict(data_parallel_size=2, enable_expert_parallel=True),
    "pp2": dict(pipeline_parallel_size=2),
    "tp4": dict(tensor_parallel_size=4),
    "tp4_ep": dict(tensor_parallel_size=4, enable_expert_parallel=True),
    "dp4_ep": dict(data_parallel_size=4, enable_expert_parallel=True),
    "tp2_pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "dp2_tp2_ep": dict(data_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True),
    # the all-reduce through symmetric memory is on by default at 4 ranks (tp4 above); NCCL's at 4, and the
    # symmetric one at 2 ranks (opt-in) on subgroups
    "tp4_nccl": dict(tensor_parallel_size=4, disable_custom_all_reduce=True),
    "dp2_tp2_ep_symm": dict(data_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True,
                         enable_custom_all_reduce=True),
}
MOE = ("Mixtral", "Moe", "Deepseek")


def gpus_of(layout: dict) -> int:
    return (layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
            * layout.get("data_parallel_size", 1))


def run(path: str, port: int, dtype: str = "float32", eager: bool = False, **layout
        ) -> tuple[list[list[int]], float]:
    """One engine in a process of its own (on CUDA an engine keeps its NCCL groups until its process ends)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_child, args=(queue, path, port, dtype, eager, layout))
    proc.start()
    ok, value = queue.get(timeout=600)
    proc.join(timeout=30)
    if proc.is_alive():
        print("  (the engine's process did not exit within 30 s of its result: killed)", flush=True)
        proc.kill()
    elif proc.exitcode:
        print(f"  (the engine's process exited with {proc.exitcode} after its result)", flush=True)
    if not ok:
        raise RuntimeError(value)
    return value


def _run_child(queue, path, port, dtype, eager, layout) -> None:
    import traceback

    try:
        queue.put((True, _run_engine(path, port, dtype, eager, **layout)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


def _run_engine(path: str, port: int, dtype: str, eager: bool, **layout) -> tuple[list[list[int]], float]:
    from moeserve import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=path, dtype=dtype, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
              master_port=port, enforce_eager=eager, **layout)
    start = time.perf_counter() - t
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    out += [llm.generate({"prompt_token_ids": PROMPTS[1]}, params)[0].outputs[0].token_ids]  # alone: DP dummies
    out += _staggered(llm.llm_engine, params)
    llm.llm_engine.shutdown()
    del llm
    return out, start


def _staggered(eng, params) -> list[list[int]]:
    """Requests that arrive while others decode: decode steps (graph replays) and eager steps with prefill chunks
    take turns with requests in flight across the change (under DP without NCCL's graph mixing, an eager step
    waits for the replay before it)."""
    done: dict[str, list[int]] = {}

    def step():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)

    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"s{i}", p, params)
    for _ in range(4):
        step()
    for i, p in enumerate(PROMPTS[3:], 3):
        eng.add_request(f"s{i}", p, params)
        step()
    while eng.has_unfinished_requests():
        step()
    return [done[f"s{i}"] for i in range(len(PROMPTS))]


def main() -> int:
    from tiny_checkpoints import make_tiny_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="LlamaForCausalLM,Qwen3MoeForCausalLM,DeepseekV2ForCausalLM,"
                                        "Glm4MoeForCausalLM,MixtralForCausalLM")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no engine after this many seconds")
    ap.add_argument("--autotune", action="store_true",
                    help="tune the kernels for each tiny shape (slow on a fresh machine: 25-50 s per engine on "
                         "4xH200); by default they keep their first configuration, which is what tokens are "
                         "checked with")
    a = ap.parse_args()
    if not a.autotune:
        os.environ["MOESERVE_AUTOTUNE"] = "0"  # read by every engine process this script starts
    import torch

    n_gpus = torch.cuda.device_count()  # no CUDA context in this process: each engine runs in a child
    opts = dict(dtype=a.dtype, eager=a.eager)
    bad = 0
    port = 29650
    t0 = time.time()
    for arch in a.archs.split(","):
        if time.time() - t0 > a.budget_s:
            print(f"{arch:28s} NOT RUN: past --budget-s", flush=True)
            bad += 1
            continue
        path = make_tiny_checkpoint(tempfile.mkdtemp(), arch, max_position_embeddings=512)
        ref, s0 = run(path, port, **opts)
        print(f"{arch:28s} 1 GPU   start {s0:5.1f}s")
        for name, layout in LAYOUTS.items():
            if name not in a.layouts.split(","):
                continue
            if "ep" in name and not any(m in arch for m in MOE) or gpus_of(layout) > n_gpus:
                continue
            if time.time() - t0 > a.budget_s:
                print(f"{arch:28s} {name:7s} NOT RUN: past --budget-s", flush=True)
                bad += 1
                continue
            port += 1
            try:
                got, s = run(path, port, **opts, **layout)
                same = sum(g == r for g, r in zip(got, ref))
                ok = same == len(ref)
                print(f"{arch:28s} {name:7s} start {s:5.1f}s  tokens identical: {same}/{len(ref)}"
                      f"{'' if ok else '  MISMATCH'}", flush=True)
            except Exception as e:
                ok = False
                print(f"{arch:28s} {name:7s} FAILED: {e!r}", flush=True)
            bad += not ok
    print("multi_gpu_check:", "all layouts match one GPU" if not bad else f"{bad} layouts differ or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
