"""Server-sent events that stop the moment the client goes away.

Starlette's StreamingResponse (ASGI spec >= 2.4) notices a disconnect only when a send fails, i.e. at the next
token. We watch for `http.disconnect` alongside the stream and cancel it at once; the body iterator is then
closed, and its `finally` aborts the request in the engine, freeing its KV blocks.
"""

from __future__ import annotations

import json
import logging

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("moeserve")


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else _encode(data)
    return f"data: {text}\n\n"


class ChunkTemplate:
    """The events of one stream, `{**head, "choices": [...], **extra}`, with the head (id, object, created, model)
    encoded once. The commonest event, one choice whose only news is text, is joined from strings around the
    encoded text: encoding the whole chunk dict per token was most of the event loop's JSON work (8 us -> 0.3 us a
    token; benchmarks/results/serve/2026-11-27-cpu-gil-contention). Byte for byte what `sse(dict)` writes."""

    def __init__(self, head: dict, text_field: tuple[str, ...]):
        self._head = "data: " + _encode(head)[:-1] + ',"choices":'
        # chat: ("delta", "content") -> {"index":i,"delta":{"content":TEXT}, ...}; completions: ("text",)
        self._open = "".join(f'"{k}":{{' for k in text_field[:-1]) + f'"{text_field[-1]}":'
        self._close = "}" * (len(text_field) - 1) + ',"logprobs":null,"finish_reason":null}]}\n\n'

    def chunk(self, choices: list[dict], **extra) -> str:
        body = self._head + _encode(choices)
        if extra:
            body += "," + _encode(extra)[1:-1]
        return body + "}\n\n"

    def text(self, index: int, text: str) -> str:
        """The event of choice `index` with `text` only (no logprobs, not finished)."""
        return f'{self._head}[{{"index":{index},{self._open}{_encode(text)}{self._close}'


DONE = sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, status_code: int = 200, headers=None):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, status_code=status_code, headers=headers, media_type=self.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
