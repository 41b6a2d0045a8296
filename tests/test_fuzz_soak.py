"""Issue 13's soak: the real server, driven by property-based requests (hypothesis over the request fields, with
wild values: NaN, huge and negative numbers, lone surrogates, wrong types, nested junk) while valid greedy
requests run beside them, clients disconnect mid-answer, and a burst overruns the waiting queue.

It asserts that no request is ever answered 500 (503 only as queue_full with Retry-After), that every valid
request's text equals its solo run, and that afterwards nothing is left running or waiting and no KV block is
held. The CI budget is about a minute of driving; `pytest tests/test_fuzz_soak.py --soak-minutes 30 -s` runs
the long version. It prints the counts it sent, per status code."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.server.process import ServerProcess

MAX_NUM_SEQS, MAX_WAITING = 4, 8
CI_DRIVE_S = 30.0
JSON = {"Content-Type": "application/json"}
VALID = [("completions", {"prompt": p, "max_tokens": 8}) for p in
         ("Paris is the capital of", "The quick brown fox", "Hello world, this is")] + \
        [("chat/completions", {"messages": [{"role": "user", "content": c}], "max_tokens": 8}) for c in
         ("What is the capital of France?", "Name three colors.")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("soak"), "LlamaForCausalLM", max_position_embeddings=512)
    args = [ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", "512",
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING),
            "--num-gpu-blocks-override", "48", "--block-size", "16", "--max-stop-strings", "16"]
    with ServerProcess(args) as s:
        yield s


# -- the generated requests --

ODD_STRINGS = st.sampled_from(["\ud800", "a\udfffb", "", " ", "\x00", "é✓🙂", "<|im_end|>", "{{ raise }}"])
WILD_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16), ODD_STRINGS)
WILD = st.recursive(WILD_SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
TEXT = st.one_of(st.text(max_size=40), ODD_STRINGS)
SMALL_FLOAT = st.one_of(st.floats(-3, 5), st.sampled_from([0.0, 1.0, 2.0, 1e308, -0.0]),
                        st.floats(allow_nan=True, allow_infinity=True))
TOKEN_IDS = st.lists(st.integers(-5, 450), min_size=0, max_size=16)
CONTENT = st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), TEXT),
                                 "content": CONTENT})


def field(plausible) -> st.SearchStrategy:
    return st.one_of(plausible, plausible, plausible, WILD)


COMMON = {
    "model": field(st.sampled_from(["tiny", "gpt-4", "tiny "])), "n": field(st.integers(-1, 3)),
    "max_tokens": field(st.one_of(st.integers(-2, 24), st.sampled_from([4.0, 4.5, 600, 2**40]))),
    "temperature": field(SMALL_FLOAT), "top_p": field(SMALL_FLOAT), "top_k": field(st.integers(-3, 500)),
    "min_p": field(SMALL_FLOAT), "repetition_penalty": field(SMALL_FLOAT),
    "presence_penalty": field(SMALL_FLOAT), "frequency_penalty": field(SMALL_FLOAT),
    "seed": field(st.integers(-2**64, 2**64)), "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=20))),
    "stop_token_ids": field(TOKEN_IDS), "min_tokens": field(st.integers(-1, 30)),
    "stream": field(st.booleans()), "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()), "skip_special_tokens": field(st.booleans()),
    "include_stop_str_in_output": field(st.booleans()), "logit_bias": field(st.dictionaries(TEXT, SMALL_FLOAT)),
    "user": field(TEXT),
}
CHAT = st.fixed_dictionaries({"messages": field(st.lists(MESSAGE, min_size=1, max_size=3))}, optional={
    **COMMON, "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(-1, 25)),
    "max_completion_tokens": field(st.integers(-1, 24)), "chat_template_kwargs": field(st.dictionaries(
        st.sampled_from(["tools", "enable_thinking", "tokenize", "x"]), WILD, max_size=2)),
    "tools": field(st.lists(st.dictionaries(st.text(max_size=5), WILD), max_size=1)),
    "tool_choice": field(st.sampled_from(["none", "auto"])), "response_format": field(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object"])})), "continue_final_message": field(st.booleans()),
})
COMPLETION = st.fixed_dictionaries({"prompt": field(st.one_of(TEXT, TOKEN_IDS, st.lists(TEXT, max_size=3),
                                                              st.lists(TOKEN_IDS, max_size=3)))}, optional={
    **COMMON, "logprobs": field(st.integers(-1, 25)), "echo": field(st.booleans()), "suffix": field(TEXT),
    "best_of": field(st.integers(0, 3)),
})
REQUESTS = st.one_of(st.tuples(st.just("chat/completions"), CHAT), st.tuples(st.just("completions"), COMPLETION))


# -- the drivers --

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []

    def add(self, kind: str, status, detail: str | None = None) -> None:
        with self.lock:
            self.counts[(kind, status)] += 1
            if detail is not None:
                self.failures.append(detail)


def check_status(tally: Tally, kind: str, r: httpx.Response, body_text: str, what: str) -> None:
    tally.add(kind, r.status_code)
    if r.status_code >= 500 and not (r.status_code == 503 and "queue_full" in body_text
                                     and "retry-after" in r.headers):
        tally.add(kind, "bad", f"{what} -> {r.status_code} {body_text[:300]}")


def send_fuzzed(client: httpx.Client, base: str, tally: Tally, path: str, body: dict) -> None:
    raw = json.dumps(body).encode()  # NaN / Infinity literals and escaped surrogates go out as they are
    what = f"POST /{path} {raw[:400]!r}"
    try:
        if body.get("stream") is True:
            with client.stream("POST", f"{base}/{path}", content=raw, headers=JSON) as r:
                text = "".join(r.iter_text())
                if r.status_code == 200 and '"internal_error"' in text:
                    tally.add("fuzz", "bad", f"{what} -> error event {text[-300:]}")
        else:
            r = client.post(f"{base}/{path}", content=raw, headers=JSON)
            text = r.text
        check_status(tally, "fuzz", r, text, what)
    except httpx.TimeoutException:
        tally.add("fuzz", "client timeout")  # a slow valid request: the client leaves, the server aborts it


def valid_worker(base: str, solo: list[str], stop: threading.Event, tally: Tally) -> None:
    """Greedy requests with known answers, streamed and not, again and again while the fuzzer runs."""
    i = 0
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            k = i % len(VALID)
            path, extra = VALID[k]
            body = {"model": "tiny", "temperature": 0, "ignore_eos": True, **extra}
            streamed = i % 2 == 1
            i += 1
            if streamed:
                text, status = stream_text(client, f"{base}/{path}", {**body, "stream": True})
            else:
                r = client.post(f"{base}/{path}", content=json.dumps(body).encode(), headers=JSON)
                status = r.status_code
                text = answer_text(r.json()) if status == 200 else r.text
            tally.add("valid", status)
            if status == 503:
                time.sleep(0.2)  # the burst filled the queue: retry later, as Retry-After says
            elif status != 200 or text != solo[k]:
                tally.add("valid", "bad", f"valid #{k} streamed={streamed}: {status} {text!r} != {solo[k]!r}")


def stream_text(client: httpx.Client, url: str, body: dict) -> tuple[str, int]:
    parts = []
    with client.stream("POST", url, content=json.dumps(body).encode(), headers=JSON) as r:
        if r.status_code != 200:
            return r.read().decode(), r.status_code
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    parts.append(c.get("text") or c.get("delta", {}).get("content") or "")
    return "".join(parts), 200


def answer_text(resp: dict) -> str:
    c = resp["choices"][0]
    return c["text"] if "text" in c else c["message"]["content"]


def disconnect_worker(base: str, stop: threading.Event, tally: Tally) -> None:
    """Clients that leave: mid-stream after the first chunk, and before a non-streamed answer is ready."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 2:
                with httpx.stream("POST", f"{base}/completions", content=json.dumps({**body, "stream": True}).encode(),
                                  headers=JSON, timeout=30) as r:
                    tally.add("disconnect", r.status_code)
                    next(r.iter_lines(), None)
            else:
                httpx.post(f"{base}/completions", content=json.dumps(body).encode(), headers=JSON,
                           timeout=httpx.Timeout(30, read=0.3))
                tally.add("disconnect", "finished first")
        except httpx.TimeoutException:
            tally.add("disconnect", "left")
        time.sleep(0.3)


async def burst(base: str, tally: Tally, size: int = 60) -> int:
    """`size` long requests at once; the ones taken are held open until all have answered, then dropped."""
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    release = asyncio.Event()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=size + 10)) as c:
        async def one() -> int:
            async with c.stream("POST", f"{base}/completions", content=body, headers=JSON) as r:
                text = (await r.aread()).decode() if r.status_code != 200 else ""
                check_status(tally, "burst", r, text, "burst")
                if r.status_code == 200:
                    await release.wait()
                return r.status_code

        tasks = [asyncio.create_task(one()) for _ in range(size)]
        deadline = time.monotonic() + 30
        while sum(t.done() for t in tasks) < size - (MAX_NUM_SEQS + MAX_WAITING) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        release.set()
        return (await asyncio.gather(*tasks)).count(200)


def gauges(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) if f.type == "gauge" for s in f.samples}


# -- the soak --

def test_fuzz_soak(server, request):
    minutes = request.config.getoption("--soak-minutes")
    drive_s = minutes * 60 if minutes else CI_DRIVE_S
    base = server.base_url
    tally = Tally()
    with httpx.Client(timeout=60) as c:  # each valid request alone first: the answers to hold the rest to
        solo = []
        for path, extra in VALID:
            r = c.post(f"{base}/{path}", content=json.dumps({"model": "tiny", "temperature": 0, "ignore_eos": True,
                                                             **extra}).encode(), headers=JSON)
            assert r.status_code == 200, r.text
            solo.append(answer_text(r.json()))

    stop = threading.Event()
    workers = [threading.Thread(target=valid_worker, args=(base, solo, stop, tally)) for _ in range(2)]
    workers.append(threading.Thread(target=disconnect_worker, args=(base, stop, tally)))
    for w in workers:
        w.start()
    started = time.monotonic()
    taken = []
    try:
        with httpx.Client(timeout=5) as client:
            @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(REQUESTS)
            def fuzz(path_body):
                send_fuzzed(client, base, tally, *path_body)

            rounds = 0
            while rounds == 0 or time.monotonic() - started < drive_s:
                seed(rounds)(fuzz)()  # a new, reproducible batch of examples each round
                if rounds % 4 == 0:
                    taken.append(asyncio.run(burst(base, tally)))
                rounds += 1
    finally:
        stop.set()
        for w in workers:
            w.join(90)

    deadline = time.monotonic() + 60
    while (g := gauges(server)) and time.monotonic() < deadline and not (
            g["moeserve:num_requests_running"] == g["moeserve:num_requests_waiting"] == 0
            and g["moeserve:kv_cache_usage_perc"] == 0):
        time.sleep(0.1)
    counts = sorted(tally.counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
    print(f"\nfuzz soak: {time.monotonic() - started:.0f}s, {sum(tally.counts.values())} requests; "
          f"burst took {taken} of 60 (bound {MAX_NUM_SEQS + MAX_WAITING})")
    for (kind, status), n in counts:
        print(f"  {kind:10} {status!s:15} {n}")
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.counts[("valid", 200)] > 0 and sum(n for (k, _), n in tally.counts.items() if k == "fuzz") > 0
    assert all(n <= MAX_NUM_SEQS + MAX_WAITING for n in taken), taken
    assert g["moeserve:num_requests_running"] == g["moeserve:num_requests_waiting"] == 0, g
    assert g["moeserve:kv_cache_usage_perc"] == 0, g
    log = server.log_tail(200_000)
    assert "Traceback" not in log, log[-4000:]
