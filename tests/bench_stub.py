"""A stub OpenAI-compatible streaming server with known timings, for the load generator's tests.

Each request waits `ttft_s`, streams its first token, then one token every `itl_s`, `max_tokens` tokens in all,
then a usage chunk and `data: [DONE]`. A prompt holding "ttft=X" or "itl=X" (seconds) overrides the timing for
that request. With `capacity` set, at most that many requests are served at once and the others queue (so the
latency collapses when the arrival rate passes capacity / service time).
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


def _override(text: str, key: str, default: float) -> float:
    m = re.search(rf"{key}=([0-9.]+)", text)
    return float(m.group(1)) if m else default


class StubServer:
    def __init__(self, ttft_s: float = 0.1, itl_s: float = 0.02, capacity: int | None = None):
        self.ttft_s, self.itl_s, self.capacity = ttft_s, itl_s, capacity
        self.requests: list[dict] = []
        self.app = self._make_app()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def _make_app(self) -> FastAPI:
        app = FastAPI()
        sem_holder: dict = {}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

        async def stream(body: dict, chat: bool):
            if self.capacity and "sem" not in sem_holder:
                sem_holder["sem"] = asyncio.Semaphore(self.capacity)
            sem = sem_holder.get("sem")
            text = json.dumps(body.get("messages") or body.get("prompt"))
            ttft, itl = _override(text, "ttft", self.ttft_s), _override(text, "itl", self.itl_s)
            n = int(body.get("max_tokens", 16))
            if sem is not None:
                await sem.acquire()
            try:
                start = time.perf_counter()
                for i in range(n):   # sleep to absolute deadlines, so the stub's own jitter does not add up
                    delay = start + ttft + i * itl - time.perf_counter()
                    await asyncio.sleep(max(delay, 0))
                    piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                    yield f"data: {json.dumps({'choices': [{'index': 0, **piece, 'finish_reason': None}]})}\n\n"
            finally:
                if sem is not None:
                    sem.release()
            usage = {"prompt_tokens": len(text.split()), "completion_tokens": n,
                     "total_tokens": len(text.split()) + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            return StreamingResponse(stream(body, True), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append(body)
            return StreamingResponse(stream(body, False), media_type="text/event-stream")

        return app

    def __enter__(self) -> "StubServer":
        # The stub and the client under test share the pytest process, whose heap holds the whole suite's modules
        # (~500k objects): one full collection takes ~0.2 s on 2 cores and, landing inside a request, adds to its
        # measured latency what no server or client did. Objects made before the stub are left out of collections.
        gc.collect()
        gc.freeze()
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stub server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        gc.unfreeze()
