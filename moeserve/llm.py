"""The offline API, in vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from moeserve.engine.engine import LLMEngine
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | dict


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        engine_args.setdefault("usage", "offline")  # batch jobs: the defaults favour throughput (config.usage)
        self.llm_engine = LLMEngine.from_engine_args(model=model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(params)} SamplingParams.")
        engine = self.llm_engine
        final: dict[int, SamplingParams] = {}  # one FINAL_ONLY copy per params object: outputs built once, at the end
        for p in params:
            if id(p) not in final:
                final[id(p)] = p.clone(output_kind=RequestOutputKind.FINAL_ONLY)
        params = [final[id(p)] for p in params]
        order = []
        for prompt, p in zip(prompts, params):
            rid = str(next(self._ids))
            engine.add_request(rid, _prompt_of(prompt), p)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            engine.abort_request([r for r in order if r not in done])
            raise
        return [done[r] for r in order]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat() needs a tokenizer with a chat template.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
                   for c in conversations]
        return self.generate(prompts, sampling_params)


def _prompt_of(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
    raise ValueError("A prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}.")
