"""POST /v1/chat/completions: the chat template applied to the messages, then one engine request."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from moeserve.server.chat_tools import AnswerParser, history_for_template, plan_tools
from moeserve.server.errors import APIError, bad_request
from moeserve.server.protocol import ChatCompletionRequest
from moeserve.server.reasoning_parsers import grammar_markers
from moeserve.server.serving import OpenAIServing, engine_failure, final_outputs, merged, usage
from moeserve.server.sse import DONE, ChunkTemplate, EventStreamResponse, sse


def _message_for_template(m) -> dict:
    msg = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"Only text content parts are supported; got type {part.get('type')!r}.",
                                  param="messages")
            texts.append(part["text"])
        msg["content"] = "\n".join(texts)
    elif content is None:
        msg["content"] = ""
    return msg


def render_prompt(serving: OpenAIServing, req: ChatCompletionRequest) -> list[int]:
    return serving.encode(render_text(serving, req, req.tools), add_special_tokens=False)


def render_text(serving: OpenAIServing, req: ChatCompletionRequest, tools: list[dict] | None) -> str:
    tok = serving.tokenizer
    template = serving.settings.chat_template
    if tok is None:
        raise bad_request("This model has no tokenizer, so chat is not available; use /v1/completions with "
                          "token ids.")
    if template is None and not getattr(tok, "chat_template", None):
        raise bad_request("This model has no chat template; start the server with --chat-template.")
    messages = [history_for_template(_message_for_template(m), i) for i, m in enumerate(req.messages)]
    kwargs = dict(req.chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        text = tok.apply_chat_template(
            messages, tokenize=False, chat_template=template,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message, **kwargs)
    except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
        raise bad_request(f"The chat template could not render these messages: {e}", param="messages") from None
    # The template writes its own special tokens (BOS included), so none are added on top.
    return text


# Arguments render_prompt passes itself: chat_template_kwargs may not set them (tools would slip past the
# tool check; the others would clash with ours).
RESERVED_TEMPLATE_KWARGS = ("tools", "documents", "messages", "conversation", "chat_template", "tokenize",
                            "add_generation_prompt", "continue_final_message", "return_dict")


def _with_grammar(params, schema: dict):
    from moeserve.sampling_params import InvalidSamplingParam
    try:
        return params.clone(structured_outputs={"json": schema})
    except InvalidSamplingParam as e:
        raise bad_request(f"The tools' schemas could not be compiled together: {e}", param="tools") from None


def _check_unsupported(req: ChatCompletionRequest) -> None:
    for key in RESERVED_TEMPLATE_KWARGS:
        if req.chat_template_kwargs and key in req.chat_template_kwargs:
            what = "send tools in the request's `tools` field" if key == "tools" else f"{key!r} is set by moeserve"
            raise bad_request(f"chat_template_kwargs may not contain {key!r}: {what}.",
                              param=f"chat_template_kwargs.{key}")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, arrival: float,
                                 until_disconnected):
    model = serving.model_name(req.model)
    _check_unsupported(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    plan = plan_tools(req, serving.settings)
    params = serving.sampling_params(req, max_tokens=max_tokens, logprobs=top_n)
    if plan.forced_schema is not None:
        if params.structured_outputs is not None:
            raise bad_request(f"tool_choice {req.tool_choice!r} is enforced with a grammar of its own; it cannot "
                              "be combined with another structured output.", param="tool_choice")
        params = _with_grammar(params, plan.forced_schema)
    if plan.parser is not None and plan.parser.needs_special_tokens:
        params.skip_special_tokens = False  # the call markers are special tokens
    prompt_text = render_text(serving, req, plan.tools)
    prompt_ids = serving.encode(prompt_text, add_special_tokens=False)
    if serving.settings.reasoning_parser is not None and params.structured_outputs is not None:
        markers = grammar_markers(prompt_text, lambda s: serving.encode(s, add_special_tokens=False))
        if markers is not None:  # think first, then the grammar holds the answer (vLLM's behaviour)
            params = params.clone(structured_outputs=replace(params.structured_outputs, reasoning_markers=markers))
    parse = serving.settings.reasoning_parser is not None or plan.parser is not None
    answers = ([AnswerParser(plan, serving.settings.reasoning_parser, prompt_text) for _ in range(params.n)]
               if parse else None)
    serving.check_length(prompt_ids, max_tokens, param="messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await serving.start_all(request_id, [prompt_ids], params, arrival)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStreamResponse(_stream(serving, streams, request_id, model, created, params.n, top_n,
                                           include_usage, answers))
    try:
        (out,) = await until_disconnected(final_outputs(streams))
    except APIError:
        raise
    except Exception as e:
        raise engine_failure(e) from None
    choices = []
    for c in out.outputs:
        choices.append({
            "index": c.index,
            "message": answers[c.index].message(c.text) if answers else {"role": "assistant", "content": c.text},
            "logprobs": ({"content": serving.chat_logprobs(c.token_ids, c.logprobs or [], top_n)}
                         if top_n is not None else None),
            "finish_reason": _finish(answers[c.index] if answers else None, c.finish_reason),
            "stop_reason": c.stop_reason,
        })
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)),
    }


def _finish(answer: AnswerParser | None, reason: str | None) -> str | None:
    """"tool_calls" when the answer made calls and ended by itself; one cut by max_tokens stays "length"."""
    if answer is not None and answer.called and reason is not None and reason != "length":
        return "tool_calls"
    return reason


async def _stream(serving: OpenAIServing, streams, request_id: str, model: str, created: int, n: int,
                  top_n: int | None, include_usage: bool,
                  answers: list[AnswerParser] | None = None) -> AsyncIterator[str]:
    template = ChunkTemplate({"id": request_id, "object": "chat.completion.chunk", "created": created,
                              "model": model}, ("delta", "content"))
    chunk = template.chunk
    # One choice, no parsers, no logprobs: a token's event is its text alone (until the one that ends it)
    plain = n == 1 and answers is None and top_n is None
    sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n
    last = None
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        async for _, out in merged(streams):
            last = out
            choices = []
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                delta = c.text[sent_chars[i]:]
                if plain and c.finish_reason is None:  # the per-token path: no dicts, one string join
                    if delta:
                        yield template.text(i, delta)
                    sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    continue
                new_tokens = c.token_ids[sent_tokens[i]:]
                if not delta and not new_tokens and c.finish_reason is None:
                    continue
                if answers:  # reasoning, content and tool calls, each in its own field
                    d = answers[i].delta(delta)
                    if c.finish_reason is not None:
                        for k, v in answers[i].delta("", final=True).items():
                            d[k] = d.get(k, type(v)()) + v
                    body = d
                else:
                    body = {"content": delta} if delta else {}
                finish = _finish(answers[i] if answers else None, c.finish_reason)
                choice = {"index": i, "delta": body, "logprobs": None, "finish_reason": finish}
                if top_n is not None and new_tokens:
                    entries = (c.logprobs or [])[sent_tokens[i]:]
                    choice["logprobs"] = {"content": serving.chat_logprobs(new_tokens, entries, top_n)}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    done[i] = True
                if body or c.finish_reason is not None or choice["logprobs"] is not None:
                    choices.append(choice)
                sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
            if choices:
                yield chunk(choices)
        if include_usage and last is not None:
            yield chunk([], usage=usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs)))
    except Exception as e:
        yield sse(engine_failure(e).body())
    finally:
        for s in streams:
            s.close()
    yield DONE
