"""Do moeserve and vLLM compute the same model on one random checkpoint? Greedy tokens and each decode step's
routed experts from both, side by side.

    python benchmarks/routing_check.py run --engine moeserve --model DIR --out moeserve.json
    python benchmarks/routing_check.py run --engine vllm --model DIR --out vllm.json
    python benchmarks/routing_check.py run --engine transformers --model DIR --out transformers.json
    python benchmarks/routing_check.py compare moeserve.json vllm.json transformers.json

Why (session 16, results/fp8/2026-11-28-session16): on the random qwen3-30b-a3b-fp8 checkpoint vLLM's decode step
at batch 32 (5.65 ms) was shorter than reading the experts that uniform routing touches (~111 of 128 a layer,
6.0 ms on an H200), while moeserve's TPOT there equalled its TPOT on dummy weights, whose fp32 router spreads the
tokens uniformly. Either the engines route differently on identical weights (one of them computes another model)
or both concentrate and only vLLM's kernels profit; the latency ratios at batch 8+ mean nothing until this says
which.

`run`: the latency workload's prompts for one batch (workloads.latency_prompts, 128 tokens), greedy, ignore_eos,
--steps tokens; records each request's tokens and, for every decode step and MoE layer, the experts each request
was routed to. moeserve runs eager (no CUDA graphs) with a forward hook on every Router; vLLM returns them itself
(enable_return_routed_experts: [tokens, layers, top_k] a request, row p = the token at position p); transformers,
the reference, gives each layer's router logits (softmax routers: their top-k is the choice).
`compare`: per engine, distinct experts a layer a decode step beside uniform routing's expectation; between the
engines (each pair of the runs given), how many leading tokens each request agrees on, and over the agreeing
steps how often a request's expert set in a layer is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def uniform_distinct(num_experts: int, picks: int) -> float:
    """Expected distinct experts when `picks` choices fall uniformly on num_experts (top-k sets of B tokens: B*k)."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** picks)


def distinct_per_step(routes: list[list[list[list[int]]]]) -> float:
    """routes[request][step][layer] = that request's top-k experts; mean over (step, layer) of the union's size
    over requests."""
    steps = min(len(r) for r in routes)
    layers = len(routes[0][0])
    sizes = [len({e for r in routes for e in r[s][lay]}) for s in range(steps) for lay in range(layers)]
    return sum(sizes) / len(sizes)


def agreement(a: dict, b: dict) -> dict:
    """Leading tokens two runs share per request, and over those steps the share of (request, step, layer) whose
    expert sets are equal."""
    prefix, same, total = [], 0, 0
    for ta, tb, ra, rb in zip(a["tokens"], b["tokens"], a["routes"], b["routes"]):
        n = 0
        while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
            n += 1
        prefix.append(n)
        # decode step s processes generated token s (its routing is decided by tokens 0..s): agreeing up to n
        # tokens means steps 0..n-1 saw the same inputs
        for s in range(min(n, len(ra), len(rb))):
            for la, lb in zip(ra[s], rb[s]):
                same += set(la) == set(lb)
                total += 1
    return {"prefix_tokens": prefix, "mean_prefix": sum(prefix) / len(prefix),
            "same_expert_sets": same / total if total else None, "compared_sets": total}


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    from workloads import LatencySpec, latency_prompts

    return latency_prompts(LatencySpec(), batch, 0, vocab)


def run_moeserve(a, prompts) -> dict:
    import torch

    from moeserve import LLM, SamplingParams
    from moeserve.layers.moe import Router

    # all prompts in one prefill step, so that every later forward is one decode step of the whole batch
    llm = LLM(model=a.model, enforce_eager=True, max_model_len=a.max_model_len, gpu_memory_utilization=0.85,
              max_num_seqs=max(a.batch, 2), max_num_batched_tokens=sum(map(len, prompts)) + a.batch, seed=0,
              **json.loads(a.engine_args))
    model = llm.llm_engine.executor.worker.model
    routers = [m for _, m in model.named_modules() if isinstance(m, Router)]
    calls: list[list[torch.Tensor]] = [[] for _ in routers]  # per layer, per forward: ids [T, k]
    for i, r in enumerate(routers):
        r.register_forward_hook(lambda mod, inp, out, i=i: calls[i].append(out[1].detach().cpu()))
    params = SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # forwards of exactly `batch` rows after the prefill are the decode steps, rows in request order (one batch,
    # all admitted together, none finishing early: ignore_eos); each processes the token generated before it
    decode = [j for j, ids in enumerate(calls[0]) if ids.shape[0] == len(prompts)][-(a.steps - 1):]
    if len(decode) != a.steps - 1:
        raise SystemExit(f"routing_check: {len(decode)} forwards of the whole batch, not {a.steps - 1} decode steps "
                         f"(forward sizes {[ids.shape[0] for ids in calls[0]]})")
    routes = [[[calls[lay][j][r].tolist() for lay in range(len(routers))] for j in decode]
              for r in range(len(prompts))]
    return {"tokens": tokens, "routes": routes, "top_k": int(calls[0][0].shape[1])}


def run_transformers(a, prompts) -> dict:
    """The reference: transformers' own model (block-fp8 checkpoints through its fp8 quantizer, on a GPU), greedy
    with its KV cache; a softmax router's top-k of its logits is its choice."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = json.loads(a.engine_args)
    device = kw.pop("device", "cuda")
    if kw.pop("dequantize_fp8", False):  # block-fp8 weights widened to bf16 at load (no fp8 kernels, 2x the memory)
        from transformers import FineGrainedFP8Config

        kw["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, kw.pop("dtype", "bfloat16")),
                                                 device_map=device, **kw).eval()
    batch, k = len(prompts), model.config.num_experts_per_tok
    tokens: list[list[int]] = [[] for _ in prompts]
    routes: list[list] = [[] for _ in prompts]
    cur, cache = torch.tensor(prompts, device=device), None  # the latency prompts share one length
    with torch.no_grad():
        for s in range(a.steps):
            out = model(input_ids=cur, past_key_values=cache, use_cache=True, output_router_logits=True)
            cache = out.past_key_values
            if s:  # this forward processed token s - 1: decode step s - 1
                last = [lg.view(batch, -1, lg.shape[-1])[:, -1].topk(k).indices.tolist() for lg in out.router_logits]
                for r in range(batch):
                    routes[r].append([layer[r] for layer in last])
            cur = out.logits[:, -1].argmax(-1)[:, None]
            for r in range(batch):
                tokens[r].append(int(cur[r]))
    return {"tokens": tokens, "routes": routes, "top_k": k}


def run_vllm(a, prompts) -> dict:
    from peers.vllm.run_vllm import QUIET_ENV, use_site

    os.environ.update(QUIET_ENV)  # offline, and no FlashInfer sampler (not carried), as the suite runs vLLM
    use_site(None)
    from vllm import LLM, SamplingParams

    llm = LLM(model=a.model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=a.max_model_len,
              gpu_memory_utilization=0.85, max_num_seqs=max(a.batch, 2), seed=0, enable_return_routed_experts=True,
              **json.loads(a.engine_args))
    params = SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens, routes = [], []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        rex = c.routed_experts  # [positions, layers, top_k]; decode step s processes position len(p) + s
        routes.append([rex[len(p) + s].tolist() for s in range(min(a.steps - 1, rex.shape[0] - len(p)))])
    return {"tokens": tokens, "routes": routes, "top_k": len(routes[0][0][0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--engine", choices=("moeserve", "vllm", "transformers"), required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--steps", type=int, default=32)
    r.add_argument("--max-model-len", type=int, default=1024)
    r.add_argument("--engine-args", default="{}", help="more LLM(...) keywords, JSON")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        cfg = json.loads((Path(a.model) / "config.json").read_text())
        prompts = _prompts(a.batch, cfg["vocab_size"])
        res = {"moeserve": run_moeserve, "vllm": run_vllm, "transformers": run_transformers}[a.engine](a, prompts)
        res.update(engine=a.engine, batch=a.batch, steps=a.steps, model=a.model,
                   num_experts=cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts"))
        Path(a.out).write_text(json.dumps(res))
        a_runs = [res]
    else:
        a_runs = [json.loads(Path(p).read_text()) for p in a.runs]
    for res in a_runs:
        picks = res["batch"] * res["top_k"]
        print(f"{res['engine']}: distinct experts a layer a decode step {distinct_per_step(res['routes']):.1f} "
              f"(uniform routing: {uniform_distinct(res['num_experts'], picks):.1f} of {res['num_experts']}); "
              f"distinct tokens at the last step {len({t[-1] for t in res['tokens']})} of {res['batch']}")
    for i, x in enumerate(a_runs):
        for y in a_runs[i + 1:]:
            ag = agreement(x, y)
            print(f"{x['engine']} vs {y['engine']}: leading tokens in agreement, mean {ag['mean_prefix']:.1f} of "
                  f"{x['steps']}; equal expert sets over those steps {ag['same_expert_sets']} "
                  f"({ag['compared_sets']} compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
