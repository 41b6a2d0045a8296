"""A full waiting queue answers 503 with Retry-After, and the server recovers once it drains."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.server.process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("queue"), "LlamaForCausalLM",
                                max_position_embeddings=4096)
    with ServerProcess([ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-num-seqs", "1",
                        "--max-waiting-requests", "1"]) as s:
        yield s


def gauges(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) if f.type == "gauge" for s in f.samples}


def wait_for(predicate, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_queue_full_is_503_with_retry_after(server):
    long = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    url = server.base_url + "/completions"
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url, json=long) as running:
            assert running.status_code == 200
            assert wait_for(lambda: gauges(server)["moeserve:num_requests_running"] == 1)
            with c.stream("POST", url, json=long) as waiting:
                assert waiting.status_code == 200  # accepted, queued behind the first
                assert wait_for(lambda: gauges(server)["moeserve:num_requests_waiting"] == 1)
                r = c.post(url, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 503
                assert int(r.headers["Retry-After"]) >= 1
                err = r.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "server_error"
                assert set(err) == {"message", "type", "param", "code"}
        # both streams are closed: both aborted, the queue is empty again
        assert wait_for(lambda: (g := gauges(server))["moeserve:num_requests_running"] == 0
                        and g["moeserve:num_requests_waiting"] == 0 and g["moeserve:kv_cache_usage_perc"] == 0)
        ok = c.post(url, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
