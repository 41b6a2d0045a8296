"""A stand-in for vLLM's offline API, for CPU tests of run_vllm.py: records what it was asked, answers in vLLM's
shapes (RequestOutput.outputs[0].token_ids, RequestOutput.metrics as RequestStateStats, llm_engine.vllm_config).
Set FAKE_VLLM_NO_METRICS=1 to answer without metrics (the wall-clock fallback)."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

__version__ = "0.26.0"
CALLS: list[dict] = []  # every generate call: prompts and max_tokens
LOG = os.environ.get("FAKE_VLLM_LOG")  # a file that gets one JSON line per generate call


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, **kw):
        if kw.get("load_format") != "dummy" or not kw.get("skip_tokenizer_init"):
            raise ValueError(f"the benchmark must ask for dummy weights without a tokenizer, got {kw}")
        with open(os.path.join(kw["model"], "config.json")) as f:
            self.config = json.load(f)
        self.kw = kw
        cache = SimpleNamespace(block_size=16, num_gpu_blocks=1000, enable_prefix_caching=True)
        sched = SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=kw["max_num_seqs"], enable_chunked_prefill=True)
        cfg = SimpleNamespace(cache_config=cache, scheduler_config=sched, compilation_config=SimpleNamespace(mode=3),
                              model_config=SimpleNamespace(enforce_eager=False))
        self.llm_engine = SimpleNamespace(vllm_config=cfg)

    def generate(self, reqs, params, use_tqdm=True):
        vocab = self.config["vocab_size"]
        prompts = [r["prompt_token_ids"] for r in reqs]
        for p in prompts:
            if not all(0 <= t < vocab for t in p):
                raise ValueError("token id out of the vocabulary")
            if len(p) + params.max_tokens > self.kw["max_model_len"]:
                raise ValueError("longer than max_model_len")
        CALLS.append({"prompts": prompts, "max_tokens": params.max_tokens})
        if LOG:
            with open(LOG, "a") as f:
                f.write(json.dumps(CALLS[-1]) + "\n")
        t0 = time.monotonic()
        outs = []
        for i, p in enumerate(prompts):
            n = params.max_tokens
            first = t0 + 0.010 + 0.001 * i
            metrics = None
            if not os.environ.get("FAKE_VLLM_NO_METRICS"):
                metrics = SimpleNamespace(first_token_latency=0.010 + 0.001 * i, first_token_ts=first,
                                          last_token_ts=first + 0.002 * (n - 1), arrival_time=time.time())
            outs.append(SimpleNamespace(prompt_token_ids=p, metrics=metrics,
                                        outputs=[SimpleNamespace(token_ids=[(t * 7 + 1) % vocab for t in p[:1] * n])]))
        return outs
