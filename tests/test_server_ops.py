"""Serving operations end to end on the real `moeserve serve` (tiny random Llama, CPU): GET /ready after startup,
the startup phase times in the log, and the SIGTERM drain (503 server_draining for new requests, the stream in
flight finishes, exit 0; a drain timeout shorter than the request cuts it and still exits 0)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.server.process import ServerProcess

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ops"), "LlamaForCausalLM",
                                max_position_embeddings=MAX_MODEL_LEN)


def serve(ckpt, drain_timeout_s: float) -> ServerProcess:
    return ServerProcess([ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len",
                          str(MAX_MODEL_LEN), "--drain-timeout-s", str(drain_timeout_s), "--async-scheduling"])


class Stream(threading.Thread):
    """A streaming completion read in the background: its chunks, usage, whether [DONE] came, any error."""

    def __init__(self, server: ServerProcess, max_tokens: int):
        super().__init__(daemon=True)
        self.url = server.base_url + "/completions"
        self.body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "stream": True,
                     "ignore_eos": True, "temperature": 0,
                     "stream_options": {"include_usage": True}}
        self.chunks, self.usage, self.done, self.finish_reason, self.error = 0, None, False, None, None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        self.usage = chunk.get("usage") or self.usage
                        for choice in chunk["choices"]:
                            self.chunks += 1
                            self.finish_reason = choice["finish_reason"] or self.finish_reason
                        self.started.set()
        except Exception as e:  # the drain timeout cuts the connection
            self.error = e
        finally:
            self.started.set()


def post_completion(server: ServerProcess) -> httpx.Response:
    return httpx.post(server.base_url + "/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                      timeout=10)


def test_ready_startup_times_and_drain_on_sigterm(ckpt):
    with serve(ckpt, drain_timeout_s=60) as server:
        assert httpx.get(server.url + "/ready", timeout=5).status_code == 200
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        log = server.log_tail(20000)
        assert "moeserve: startup: load " in log and "prefill warm-up" in log and "total " in log, log

        stream = Stream(server, max_tokens=3000)
        stream.start()
        assert stream.started.wait(30) and stream.error is None
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the 0.1 s tick has seen the signal

        refused = post_completion(server)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_draining"
        assert refused.headers["Retry-After"] == "1"
        ready = httpx.get(server.url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_draining"
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # liveness: still alive
        assert stream.is_alive(), "the stream must still be in flight while the new request was refused"

        stream.join(60)
        assert stream.error is None and stream.done and stream.finish_reason == "length"
        assert stream.usage["completion_tokens"] == 3000
        assert server.proc.wait(30) == 0, server.log_tail()
        assert "drained in" in server.log_tail()


def test_drain_timeout_cuts_the_request_and_exits_0(ckpt):
    with serve(ckpt, drain_timeout_s=1) as server:
        stream = Stream(server, max_tokens=MAX_MODEL_LEN - 8)
        stream.start()
        assert stream.started.wait(30) and stream.error is None
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0, server.log_tail()
        assert time.monotonic() - sent < 10
        stream.join(10)
        assert stream.chunks > 0 and not stream.done and stream.usage is None
        assert "drain timeout" in server.log_tail()
