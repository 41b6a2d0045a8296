"""POST /v1/completions: one engine request per prompt (a string, token ids, or a batch of either)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from moeserve.server.errors import APIError, bad_request
from moeserve.server.protocol import CompletionRequest
from moeserve.server.serving import OpenAIServing, engine_failure, final_outputs, merged, usage
from moeserve.server.sse import DONE, ChunkTemplate, EventStreamResponse, sse


def prompts_of(serving: OpenAIServing, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [serving.encode(prompt)]
    if not prompt:
        raise bad_request("prompt must not be empty.", param="prompt")
    if isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        limit = serving.settings.max_prompts_per_request
        if len(prompt) > limit:
            raise bad_request(f"At most {limit} prompts per request are served (--max-prompts-per-request); got "
                              f"{len(prompt)}.", param="prompt")
        if isinstance(prompt[0], str):
            return [serving.encode(p) for p in prompt]
        prompts = [list(p) for p in prompt]
    for ids in prompts:
        serving.check_token_ids(ids, "prompt")
    return prompts


def _check_unsupported(req: CompletionRequest) -> None:
    if req.echo:
        raise bad_request("echo is not supported by moeserve.", param="echo")
    if req.suffix:
        raise bad_request("suffix is not supported by moeserve.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported by moeserve.", param="best_of")


async def create_completion(serving: OpenAIServing, req: CompletionRequest, arrival: float, until_disconnected):
    model = serving.model_name(req.model)
    _check_unsupported(req)
    params = serving.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    prompts = prompts_of(serving, req.prompt)
    for ids in prompts:
        serving.check_length(ids, req.max_tokens, param="prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await serving.start_all(request_id, prompts, params, arrival)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStreamResponse(_stream(serving, streams, request_id, model, created, params.n, req.logprobs,
                                           include_usage))
    try:
        outs = await until_disconnected(final_outputs(streams))
    except APIError:
        raise
    except Exception as e:
        raise engine_failure(e) from None
    choices = []
    for p, out in enumerate(outs):
        for c in out.outputs:
            choices.append({
                "index": p * params.n + c.index, "text": c.text,
                "logprobs": (serving.completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, 0)
                             if req.logprobs is not None else None),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            })
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": usage(sum(len(o.prompt_token_ids) for o in outs),
                       sum(len(c.token_ids) for o in outs for c in o.outputs)),
    }


async def _stream(serving: OpenAIServing, streams, request_id: str, model: str, created: int, n: int,
                  top_n: int | None, include_usage: bool) -> AsyncIterator[str]:
    template = ChunkTemplate({"id": request_id, "object": "text_completion", "created": created, "model": model},
                             ("text",))
    chunk = template.chunk
    plain = n == 1 and top_n is None  # a token's event is its text alone (until the one that ends its choice)
    total = len(streams) * n
    sent_chars, sent_tokens, done = [0] * total, [0] * total, [False] * total
    last: dict[int, object] = {}
    try:
        async for p, out in merged(streams):
            last[p] = out
            choices = []
            for c in out.outputs:
                i = p * n + c.index
                if done[i]:
                    continue
                delta = c.text[sent_chars[i]:]
                if plain and c.finish_reason is None:  # the per-token path: no dicts, one string join
                    if delta:
                        yield template.text(i, delta)
                    sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    continue
                new_tokens = c.token_ids[sent_tokens[i]:]
                if not delta and c.finish_reason is None and (top_n is None or not new_tokens):
                    continue
                choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": c.finish_reason}
                if top_n is not None and new_tokens:
                    entries = (c.logprobs or [])[sent_tokens[i]:]
                    choice["logprobs"] = serving.completion_logprobs(new_tokens, entries, top_n, sent_chars[i])
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    done[i] = True
                choices.append(choice)
                sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
            if choices:
                yield chunk(choices)
        if include_usage and last:
            yield chunk([], usage=usage(sum(len(o.prompt_token_ids) for o in last.values()),
                                        sum(len(c.token_ids) for o in last.values() for c in o.outputs)))
    except Exception as e:
        yield sse(engine_failure(e).body())
    finally:
        for s in streams:
            s.close()
    yield DONE
