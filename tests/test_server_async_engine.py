"""AsyncLLMEngine against a scripted engine: streaming, aborts, rejections, a full queue, failing steps, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moeserve.engine.async_engine import AsyncLLMEngine, EngineDead, QueueFull, RequestFailed
from moeserve.engine.engine import EngineStats
from moeserve.engine.errors import RequestRejected
from moeserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeserve.sampling_params import SamplingParams


class ScriptedEngine:
    """One token per request per step; `fail_steps` makes the next steps raise."""

    def __init__(self):
        self.requests: dict[str, list] = {}  # id -> [tokens, max_tokens, arrival]
        self.aborted: list[str] = []
        self.fail_steps = 0
        self.error_for = None  # a request id whose next output reports a failure of its own
        self.num_waiting = 0
        self.threads: set[str] = set()

    def add_request(self, request_id, prompt, params, arrival_time=None):
        self.threads.add(threading.current_thread().name)
        if prompt == "reject":
            raise RequestRejected("too long")
        self.requests[request_id] = [[], params.max_tokens, arrival_time]

    def step(self):
        self.threads.add(threading.current_thread().name)
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("boom")
        time.sleep(0.001)
        outs = []
        for rid, (tokens, max_tokens, arrival) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= max_tokens or rid == self.error_for
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, "x" * len(tokens), list(tokens),
                                      finish_reason="length" if done else None)], done, RequestMetrics(arrival),
                                      error="injected failure" if rid == self.error_for else None))
            if done:
                del self.requests[rid]
        return outs

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def get_stats(self):
        return EngineStats(len(self.requests), self.num_waiting, 0.0, 0, 0, 0, 1, 1, 0, 0)


@pytest.fixture
def engine():
    fake = ScriptedEngine()
    eng = AsyncLLMEngine(fake, max_waiting_requests=64).start()
    yield eng
    eng.shutdown()


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(eng, rid, max_tokens=5, prompt="p"):
    outs = [o async for o in eng.generate(prompt, SamplingParams(max_tokens=max_tokens), rid)]
    return outs


def test_streams_cumulative_outputs_from_one_engine_thread(engine):
    outs = run(collect(engine, "a", 7))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == list(range(7))
    assert all(not o.finished for o in outs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths)
    async def many():
        return await asyncio.gather(*(collect(engine, f"r{i}", 3 + i % 5) for i in range(50)))

    results = run(many())
    assert [len(r[-1].outputs[0].token_ids) for r in results] == [3 + i % 5 for i in range(50)]
    assert engine.engine.threads == {"moeserve-engine"}


def test_rejection_is_raised_to_the_caller(engine):
    with pytest.raises(RequestRejected):
        run(collect(engine, "bad", prompt="reject"))
    assert run(collect(engine, "good", 2))[-1].finished  # still serving


def test_leaving_early_aborts(engine):
    async def first_then_leave():
        stream = await engine.add_request("long", "p", SamplingParams(max_tokens=100000))
        async for _ in stream:
            break
        stream.close()

    run(first_then_leave())
    deadline = time.monotonic() + 5
    while "long" not in engine.engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.engine.aborted == ["long"]
    assert not engine.engine.requests


def test_cancelled_reader_aborts(engine):
    async def cancel_mid_stream():
        task = asyncio.create_task(collect(engine, "c", 100000))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_mid_stream())
    deadline = time.monotonic() + 5
    while "c" not in engine.engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "c" in engine.engine.aborted


def test_full_waiting_queue(engine):
    engine.engine.num_waiting = 64
    engine.stats = engine.engine.get_stats()
    with pytest.raises(QueueFull):
        run(collect(engine, "q"))
    engine.engine.num_waiting = 0
    engine.stats = engine.engine.get_stats()
    assert run(collect(engine, "q", 2))[-1].finished


def test_a_failing_step_kills_the_engine_loudly(engine):
    """A fault of the whole step (device, model, worker) cannot be survived: every request fails, health goes
    down, the server is told (on_death) so it exits non-zero, and new requests are refused."""
    deaths = []
    engine.on_death = deaths.append

    async def one():
        stream = await engine.add_request("f", "p", SamplingParams(max_tokens=100000))
        engine.engine.fail_steps = 1
        with pytest.raises(EngineDead, match="boom"):
            async for _ in stream:
                pass

    run(one())
    engine._thread.join(10)  # the streams fail first, then the thread tells on_death and ends
    assert engine.step_errors == 1 and "f" in engine.engine.aborted
    assert not engine.is_running and len(deaths) == 1
    with pytest.raises(EngineDead):
        run(collect(engine, "after", 3))


def test_one_failed_request_fails_alone(engine):
    """An output with `error` (one request's own sampling failed in the engine) fails that stream only."""
    engine.engine.error_for = "bad"

    async def both():
        bad = await engine.add_request("bad", "p", SamplingParams(max_tokens=5))
        good = collect(engine, "good", 5)
        with pytest.raises(RequestFailed, match="injected"):
            async for _ in bad:
                pass
        return await good

    outs = run(both())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5 and engine.is_running


def test_shutdown_fails_in_flight_and_new_requests(engine):
    async def scenario():
        stream = await engine.add_request("s", "p", SamplingParams(max_tokens=100000))
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead):
            await collect(engine, "late")

    run(scenario())
    assert not engine.is_running


def test_engine_thread_binds_a_bare_cuda_device_by_index(monkeypatch):
    """An engine on "cuda" (no index: the serve default) makes its thread current on the device that was current
    where the engine was built; torch.cuda.set_device refuses a bare "cuda" (the GPU server died at start-up)."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    fake = ScriptedEngine()
    fake.device = torch.device("cuda")
    eng = AsyncLLMEngine(fake, max_waiting_requests=8).start()
    try:
        assert run(collect(eng, "a", 2))[-1].finished
    finally:
        eng.shutdown()
    assert calls == [3]
