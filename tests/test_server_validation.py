"""Issue 13, the API side: one bad request never hurts another. Every malformed field is an OpenAI-shaped 400
naming it (`param`), never a 500 and never a failure of the requests beside it; the waiting queue holds its bound
under a burst; text/plain bodies are refused; a client that leaves mid-body is closed quietly.

The server cases run the real `moeserve serve` on a tiny random Llama with a 1,024-token KV pool; the rest run
in-process (SamplingParams, the request models, the async engine's queue bound, the app's 500 path)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.sampling_params import SamplingParams
from moeserve.server.process import ServerProcess
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest, invalid_unicode_at

MAX_NUM_SEQS, MAX_WAITING = 4, 8
POOL_BLOCKS, BLOCK = 64, 16  # 1,024 tokens of KV cache
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("validation"), "LlamaForCausalLM",
                                max_position_embeddings=4096)
    args = [ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", "4096",
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING),
            "--num-gpu-blocks-override", str(POOL_BLOCKS), "--block-size", str(BLOCK)]
    with ServerProcess(args) as s:
        yield s


def post(server, path: str, body: dict, headers=JSON, **kw) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\ud800" (valid JSON); httpx's own encoder would fail on it
    return httpx.post(server.base_url + path, content=json.dumps(body).encode(), headers=headers, timeout=60, **kw)


def raw_post(server, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.base_url + path, content=raw, headers=JSON, timeout=60)


def assert_400(r: httpx.Response, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def completion(**kw) -> dict:
    return {"model": "tiny", "prompt": "Paris is the capital of", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, **kw}


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, **kw}


def gauges(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) if f.type == "gauge" for s in f.samples}


def wait_idle(server, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        g = gauges(server)
        idle = (g["moeserve:num_requests_running"] == 0 and g["moeserve:num_requests_waiting"] == 0
                and g["moeserve:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return g
        time.sleep(0.05)


# -- in-process: the offline API and the request models --

@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", 1e308), ("temperature", -0.1),
    ("repetition_penalty", math.nan), ("repetition_penalty", math.inf), ("repetition_penalty", 0.0),
    ("repetition_penalty", 101.0), ("top_p", math.nan), ("min_p", math.nan), ("presence_penalty", math.nan),
    ("frequency_penalty", -math.inf), ("top_k", 2**70), ("top_k", -2), ("top_k", 4.0), ("top_k", True),
    ("stop_token_ids", [-100000]), ("min_tokens", 2**40), ("max_tokens", 4.0), ("seed", -1),
])
def test_sampling_params_reject_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_sampling_params_still_take_the_edges():
    p = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, repetition_penalty=2, presence_penalty=-2,
                       frequency_penalty=2, seed=2**63 - 1, stop="x", stop_token_ids=[0])
    assert p.top_k == 0 and p.stop == ["x"] and p.greedy


def test_integer_fields_take_integer_valued_floats_only():
    req = CompletionRequest.model_validate({"prompt": [1.0, 2], "max_tokens": 4.0, "n": 2.0, "top_k": 5.0})
    assert (req.prompt, req.max_tokens, req.n, req.top_k) == ([1, 2], 4, 2, 5)
    assert all(type(x) is int for x in (req.max_tokens, req.n, req.top_k, *req.prompt))
    for bad in ({"max_tokens": 4.5}, {"max_tokens": True}, {"n": "2"}, {"max_tokens": math.inf}):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate({"prompt": "x", **bad})
    for bad in ({"temperature": math.nan}, {"top_p": math.inf}, {"repetition_penalty": 1e999}):
        with pytest.raises(ValueError):
            ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **bad})


def test_invalid_unicode_is_found_by_path():
    assert invalid_unicode_at({"messages": [{"role": "user", "content": "ok"}, {"content": "a\ud800"}]}) \
        == "messages.1.content"
    assert invalid_unicode_at({"stop": ["fine", "\udfff"]}) == "stop.1"
    assert invalid_unicode_at({"chat_template_kwargs": {"\ud800": 1}}) == "chat_template_kwargs"
    assert invalid_unicode_at({"prompt": "héllo ✓ 🙂", "n": 1, "x": [[[]]]}) is None


# -- in-process: the waiting-queue bound under a burst --

class _SlowToAdmitEngine:
    """Takes requests into its waiting queue slowly (the engine thread is busy), never runs them."""

    def __init__(self):
        from moeserve.engine.engine import EngineStats
        self.stats_cls = EngineStats
        self.waiting: list[str] = []

    def add_request(self, request_id, prompt, params, arrival_time=None):
        time.sleep(0.01)
        self.waiting.append(request_id)

    def abort_request(self, request_id):
        if request_id in self.waiting:
            self.waiting.remove(request_id)

    def has_unfinished_requests(self):
        return False

    def step(self):
        return []

    def get_stats(self):
        return self.stats_cls(0, len(self.waiting), 0.0, 0, 0, 0, 1, 1, 0, 0)


def test_waiting_queue_bound_is_hard_under_a_burst():
    from moeserve.engine.async_engine import AsyncLLMEngine, QueueFull

    fake = _SlowToAdmitEngine()
    engine = AsyncLLMEngine(fake, max_waiting_requests=MAX_WAITING, idle_wait_s=0.01).start()

    async def burst():
        async def one(i):
            await asyncio.sleep(i * 0.002)  # spread out, so adds arrive while the engine thread is taking others
            try:
                await engine.add_request(f"r{i}", [1, 2], SamplingParams(max_tokens=4))
                return "ok"
            except QueueFull:
                return "full"
        return await asyncio.gather(*(one(i) for i in range(100)))

    try:
        results = asyncio.run(burst())
        assert results.count("ok") == MAX_WAITING and len(fake.waiting) == MAX_WAITING
        assert engine.num_waiting() == MAX_WAITING
    finally:
        engine.shutdown()


# -- in-process: an unhandled error closes the connection it answers on --

def test_unhandled_error_is_500_with_connection_close():
    from fastapi.testclient import TestClient

    from moeserve.server.app import build_app
    from moeserve.server.serving import ServerSettings

    class BrokenServing:
        settings = ServerSettings(model_names=["tiny"], max_model_len=64)
        engine = None

        def model_name(self, requested):
            raise RuntimeError("a bug")

    app = build_app(BrokenServing(), metrics=None)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert r.json()["error"]["code"] == "internal_error"


# -- the real server --

def test_bad_fields_fail_alone_while_valid_requests_stream(server):
    """The issue's two blast-radius cases, sent while four greedy requests stream: each bad one is a 400 naming
    its field, and each valid one still gets exactly its solo answer."""
    prompts = ["Paris is the capital of", "The quick brown fox", "Hello world", "One two three"]
    solo = [post(server, "/completions", completion(prompt=p, max_tokens=24)).json()["choices"][0]["text"]
            for p in prompts]
    results: list[str | None] = [None] * len(prompts)

    def stream(i: int) -> None:
        text = []
        body = json.dumps(completion(prompt=prompts[i], max_tokens=24, stream=True)).encode()
        with httpx.stream("POST", server.base_url + "/completions", content=body, headers=JSON, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text.extend(c["text"] for c in json.loads(line[6:])["choices"])
        results[i] = "".join(text)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    assert_400(post(server, "/completions", completion(top_k=1180591620717411303424)), "top_k")
    err = assert_400(post(server, "/completions", completion(min_tokens=1, stop_token_ids=[-100000])), None)
    assert err["param"].startswith("stop_token_ids")
    for t in threads:
        t.join(60)
    assert results == solo
    wait_idle(server)


@pytest.mark.parametrize("path,body,param", [
    ("/completions", completion(prompt="\ud800"), "prompt"),
    ("/completions", completion(prompt=["ok", "x\udfff"]), "prompt.1"),
    ("/completions", completion(stop=["\ud800"]), "stop.0"),
    ("/completions", completion(model="\ud800"), "model"),
    ("/chat/completions", chat(messages=[{"role": "user", "content": "\ud800"}]), "messages.0.content"),
    ("/chat/completions", chat(messages=[{"role": "\ud800", "content": "hi"}]), "messages.0.role"),
    ("/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
     "messages.0.content.0.text"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    assert_400(post(server, path, body), param)


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "temperature": 1e308}', "temperature"),
    (b'{"prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
    (b'{"prompt": "x", "repetition_penalty": 1e999}', "repetition_penalty"),
    (b'{"prompt": "x", "repetition_penalty": 101}', "repetition_penalty"),
    (b'{"prompt": "x", "top_p": -Infinity}', "top_p"),
    (b'{"prompt": "x", "max_tokens": 4.5}', "max_tokens"),
    (b'{"prompt": "x", "min_tokens": 100000}', "min_tokens"),
    (b'{"prompt": [1, 2, 100000]}', "prompt"),
    (b'{"prompt": [[1, 2], [-1]]}', "prompt"),
    (b'{"prompt": "x", "stop_token_ids": [100000]}', "stop_token_ids"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", None),  # past Python's int-parsing limit
])
def test_numbers_out_of_range_are_400(server, raw, param):
    assert_400(raw_post(server, "/completions", raw), param)


def test_integer_valued_floats_are_accepted(server):
    ref = post(server, "/completions", completion(max_tokens=4)).json()
    r = post(server, "/completions", completion(max_tokens=4.0, n=1.0, top_k=-1.0, seed=7.0))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref["choices"][0]["text"]
    assert r.json()["usage"]["completion_tokens"] == 4


def test_count_caps(server):
    assert_400(post(server, "/completions", completion(stop=[f"s{i}" for i in range(100_000)])), "stop")
    assert_400(post(server, "/completions", completion(stop_token_ids=[1] * 1000)), "stop_token_ids")
    assert_400(post(server, "/completions", completion(prompt=["a"] * 1000)), "prompt")
    assert post(server, "/completions", completion(stop=["zz"] * 64)).status_code == 200  # the default cap


def test_chat_template_kwargs_cannot_smuggle_tools(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert_400(post(server, "/chat/completions", chat(chat_template_kwargs={"tools": tools})),
               "chat_template_kwargs.tools")
    assert_400(post(server, "/chat/completions", chat(chat_template_kwargs={"tokenize": True})),
               "chat_template_kwargs.tokenize")
    assert post(server, "/chat/completions", chat(chat_template_kwargs={"enable_thinking": False})).status_code \
        == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_json_content_type_required(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(server.base_url + "/completions", content=json.dumps(completion()).encode(), headers=headers,
                   timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ok = post(server, "/completions", completion(), headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_request_larger_than_the_kv_pool_is_refused(server):
    r = post(server, "/completions", completion(prompt=list(range(1, 101)), max_tokens=1000))
    assert_400(r, None, code="kv_cache_exceeded")


def test_openapi_publishes_the_body_models(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    top_k = schemas["CompletionRequest"]["properties"]["top_k"]["anyOf"][0]
    assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", -1, 2**31 - 1)
    assert "messages" in schemas["ChatCompletionRequest"]["required"]


def test_disconnect_mid_body_is_quiet(server):
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hel")
            time.sleep(0.2)
    time.sleep(0.5)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    log = server.log_tail(100_000)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_burst_never_exceeds_the_waiting_bound(server):
    """100 concurrent long requests against --max-num-seqs 4 --max-waiting-requests 8: at most 12 are taken,
    the rest are 503 with Retry-After; once the taken ones are closed, nothing is left behind."""
    wait_idle(server)

    async def burst() -> list[int]:
        body = json.dumps(completion(prompt="Hi", max_tokens=900, stream=True)).encode()
        release = asyncio.Event()
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as c:
            async def one() -> int:
                async with c.stream("POST", server.base_url + "/completions", content=body, headers=JSON) as r:
                    if r.status_code == 503:
                        assert int(r.headers["Retry-After"]) >= 1
                        assert json.loads(await r.aread())["error"]["code"] == "queue_full"
                        return 503
                    await release.wait()  # hold the taken ones open until every answer is in
                    return r.status_code

            tasks = [asyncio.create_task(one()) for _ in range(100)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in tasks) < 100 - (MAX_NUM_SEQS + MAX_WAITING) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # any stragglers past the bound would have answered by now
            release.set()
            return await asyncio.gather(*tasks)

    statuses = asyncio.run(burst())
    taken = statuses.count(200)
    assert set(statuses) <= {200, 503}
    assert 1 <= taken <= MAX_NUM_SEQS + MAX_WAITING, statuses
    g = wait_idle(server)
    assert g["moeserve:num_requests_running"] == g["moeserve:num_requests_waiting"] == 0
    assert g["moeserve:kv_cache_usage_perc"] == 0
