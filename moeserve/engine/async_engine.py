"""AsyncLLMEngine: the synchronous LLMEngine driven by one background thread, served to asyncio callers.

The thread loops `step()` while there is work and sleeps on an event when idle. Adds and aborts arrive through
a thread-safe inbox and are applied between steps, so the engine itself is only ever touched by its own thread.
Each step's outputs are handed to the callers' event loops with one `call_soon_threadsafe` per loop. Each request
keeps only its newest output (they are cumulative), so a slow HTTP client neither stalls the batch nor piles up
a backlog: when it reads again it skips to the newest text.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Protocol

from moeserve.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger("moeserve")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine thread has stopped; nothing more will be served."""


class RequestFailed(RuntimeError):
    """This request failed inside the engine (its own sampling or output); the others were not affected."""


class StepObserver(Protocol):
    """Called from the engine thread (metrics): after each step, and when a request is aborted."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class _Stream:
    """The per-request channel from the engine thread to the caller's event loop. Outputs are cumulative, so it
    holds only the newest one: a reader that falls behind skips ahead instead of piling up a backlog."""

    __slots__ = ("loop", "latest", "ready", "accepted")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.latest: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.accepted: asyncio.Future = loop.create_future()


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _set_result(fut: asyncio.Future, value, error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)


def _deliver(items: list[tuple[_Stream, object]]) -> None:
    """Runs on the caller's event loop."""
    for stream, item in items:
        if not isinstance(stream.latest, BaseException):  # an error is final
            stream.latest = item
        stream.ready.set()


class AsyncLLMEngine:
    def __init__(self, engine, max_waiting_requests: int = 4096, observer: StepObserver | None = None,
                 idle_wait_s: float = 1.0):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self._idle_wait_s = idle_wait_s
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()  # orders _submit against the thread's death; guards the waiting count
        self._adds_in_inbox = 0  # adds accepted but not yet applied to the engine (under _lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self.stats = engine.get_stats()  # refreshed by the engine thread; read by /metrics
        device = getattr(engine, "device", None)
        if getattr(device, "type", None) == "cuda":  # the builder thread's current device (see _bind_device)
            import torch

            self._cuda_index = torch.cuda.current_device()
        # Expert-load telemetry: the engine thread's newest snapshot (None: off, or a dense model)
        self.has_expert_load = bool(getattr(getattr(engine, "config", None), "expert_load_telemetry", False))
        self.expert_load_latest = None
        self.step_errors = 0
        self.dead: BaseException | None = None
        self.on_death = None  # called from the engine thread when it dies on its own (not at shutdown)

    # -- lifecycle --
    def start(self) -> "AsyncLLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # -- the asyncio side --
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds still in the inbox."""
        with self._lock:
            return self.stats.num_waiting + self._adds_in_inbox

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          arrival_time: float | None = None) -> "RequestStream":
        """Hand a request to the engine and wait until it is taken. Raises the engine's ValueError /
        RequestRejected for a request it will not take, QueueFull when the waiting queue is at its bound.
        The caller must iterate the returned stream to the end or `close()` it (which aborts the request)."""
        if not self.is_running:
            raise EngineDead("The engine is not running.")
        channel = _Stream(asyncio.get_running_loop())
        self._submit(("add", request_id, prompt, params, arrival_time or time.time(), channel))
        try:
            await channel.accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added after all
            raise
        return RequestStream(self, request_id, channel)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """add_request + iterate; leaving the loop early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    async def refresh_expert_load(self, timeout_s: float = 5.0):
        """Ask the engine thread for an expert-load snapshot (it reads the device counts between steps) and
        return it; None when telemetry is off, the model is dense, or the engine does not answer in time."""
        if not self.has_expert_load or not self.is_running:
            return self.expert_load_latest
        fut = asyncio.get_running_loop().create_future()
        self._submit(("expert_load", fut))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except Exception:  # no answer in time, or the device read failed (the next step will say so)
            return self.expert_load_latest

    def _submit(self, item: tuple) -> None:
        with self._lock:
            if item[0] == "add":
                if self.dead is not None:
                    raise EngineDead("The engine is not running.")
                # The bound is checked and the slot taken in one step under the lock, so a burst of adds
                # cannot all pass the check before the engine thread has seen any of them.
                if self.stats.num_waiting + self._adds_in_inbox >= self.max_waiting_requests:
                    raise QueueFull(f"The waiting queue is full ({self.max_waiting_requests} requests); "
                                    f"retry later.")
                self._adds_in_inbox += 1
            self._inbox.append(item)
        self._wake.set()

    # -- the engine thread --
    def _run(self) -> None:
        try:
            self._bind_device()
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self.stats = self.engine.get_stats()
                    self._wake.wait(self._idle_wait_s)
                    continue
                self._step()
            error: BaseException = EngineDead("The server is shutting down.")
        except BaseException as e:  # a bug in our own loop: fail everyone rather than hang them
            logger.exception("moeserve engine thread died")
            error = EngineDead(f"The engine thread died: {e!r}")
        with self._lock:
            self.dead = error
        self._fail_all(error, drain_inbox=True)
        if self.on_death is not None and not self._stop.is_set():
            self.on_death(error)

    def _bind_device(self) -> None:
        """The CUDA current device is per thread: make it the engine's here too (Triton launches on it). A bare
        "cuda" means the device that was current where the engine was built (set_device needs an index)."""
        device = getattr(self.engine, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.set_device(device.index if device.index is not None else self._cuda_index)

    def _drain_inbox(self) -> None:
        added = 0
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                added += 1
                self._add(*item[1:])
            elif item[0] == "expert_load":
                self._snapshot_expert_load(item[1])
            else:
                self._abort(item[1])
        if added:
            # The adds leave the inbox count and enter the engine's waiting count in one step: the waiting
            # total never dips below the truth, so no add can slip past the bound in between.
            stats = self.engine.get_stats()
            with self._lock:
                self._adds_in_inbox -= added
                self.stats = stats

    def _add(self, request_id: str, prompt, params: SamplingParams, arrival: float, stream: _Stream) -> None:
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
        except Exception as e:  # RequestRejected / ValueError: the caller turns it into a 400
            _call_soon(stream.loop, _resolve, stream.accepted, e)
            return
        self._streams[request_id] = stream
        _call_soon(stream.loop, _resolve, stream.accepted, None)

    def _snapshot_expert_load(self, fut: asyncio.Future) -> None:
        try:
            snap, error = self.engine.expert_load(), None
            self.expert_load_latest = snap
        except Exception as e:  # a device fault surfaces in the next step; this caller just gets the error
            snap, error = None, e
        loop = fut.get_loop()
        _call_soon(loop, _set_result, fut, snap, error)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            if self.observer is not None:
                self.observer.on_abort(request_id)
        self.stats = self.engine.get_stats()

    def _step(self) -> None:
        # A failure of one request comes back as that request's output with `error` set. An exception here is a
        # fault of the whole step (the device, the model, a dead worker): the engine cannot go on, so it dies
        # loudly (health answers 503 and `moeserve serve` exits non-zero) instead of limping.
        try:
            outputs = self.engine.step()
        except Exception:
            self.step_errors += 1
            raise
        now = time.time()
        self.stats = self.engine.get_stats()
        if self.observer is not None:
            try:
                self.observer.on_outputs(outputs, now)
            except Exception:
                logger.exception("moeserve step observer failed")
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            item = RequestFailed(out.error) if out.error else out
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _fail_all(self, error: BaseException, drain_inbox: bool = False) -> None:
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            _call_soon(stream.loop, _deliver, [(stream, error)])
        while drain_inbox and self._inbox:  # adds that never reached the engine
            item = self._inbox.popleft()
            if item[0] == "add":
                with self._lock:
                    self._adds_in_inbox -= 1
                _call_soon(item[5].loop, _resolve, item[5].accepted, error)
        try:
            self.stats = self.engine.get_stats()
        except Exception:
            pass


class RequestStream:
    """Cumulative outputs of one request (the newest only, when the reader falls behind). `close()` before the end
    aborts the request in the engine (its KV blocks are freed at the next step boundary)."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, channel: _Stream):
        self.engine = engine
        self.request_id = request_id
        self._channel = channel
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        channel = self._channel
        await channel.ready.wait()
        channel.ready.clear()
        item, channel.latest = channel.latest, None
        if isinstance(item, BaseException):
            self.finished = True  # the engine has already dropped it
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
