"""Serving operations: readiness, the SIGTERM drain, and the startup phase times.

- `/health` is liveness (200 while the engine runs, draining or not); `GET /ready` is readiness: 200 once the
  engine is warmed up and the server started, 503 `server_draining` while draining (and 503 `engine_dead`).
- On SIGTERM (or Ctrl-C) the server stops admitting generation requests (503, `Retry-After`, code
  `server_draining`), lets the ones in flight finish for up to `--drain-timeout-s`, then shuts down and exits 0.
  A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import time

from moeserve.server.errors import APIError

logger = logging.getLogger("moeserve")

# The routes that start generation: refused while draining, and counted while in flight (a stream until its
# last byte is sent).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class Lifecycle:
    def __init__(self, retry_after_s: int = 1):
        self.retry_after_s = retry_after_s
        self.ready = False
        self.draining = False
        self.drain_started: float | None = None
        self.in_flight = 0

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    def draining_error(self) -> APIError:
        return APIError(503, "The server is shutting down and admits no new requests; retry on another replica.",
                        code="server_draining", headers={"Retry-After": str(self.retry_after_s)})


class DrainMiddleware:
    """ASGI middleware: refuses generation requests while draining and counts those in flight."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            return await self.lifecycle.draining_error().response()(scope, receive, send)
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


def install(app, lifecycle: Lifecycle, async_engine) -> None:
    """Add `GET /ready` and the drain middleware to the FastAPI app; readiness turns on at app startup."""
    from fastapi.responses import Response

    app.state.lifecycle = lifecycle

    @app.get("/ready")
    async def ready():
        if not async_engine.is_running:
            return APIError(503, "The engine is not running.", code="engine_dead").response()
        if lifecycle.draining:
            return lifecycle.draining_error().response()
        if not lifecycle.ready:
            return APIError(503, "The server is starting.", code="server_starting").response()
        return Response(status_code=200)

    def now_ready() -> None:
        lifecycle.ready = True

    app.router.on_startup.append(now_ready)
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)


def make_draining_server(config, lifecycle: Lifecycle, drain_timeout_s: float):
    """A uvicorn.Server whose first SIGTERM/SIGINT drains instead of shutting down at once.

    The drain is checked on uvicorn's 0.1 s tick: once nothing is in flight, or `drain_timeout_s` has passed,
    the server shuts down as usual (app shutdown hooks included). The first signal is not re-raised after
    serving, so the process exits 0; a second one is (uvicorn's own behaviour)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig in (signal.SIGTERM, signal.SIGINT) and not lifecycle.draining and not self.should_exit:
                lifecycle.start_draining()
                logger.info("moeserve: %s: draining %d request(s) in flight (up to %.0fs)",
                            signal.Signals(sig).name, lifecycle.in_flight, drain_timeout_s)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if lifecycle.draining and not self.should_exit:
                waited = time.monotonic() - lifecycle.drain_started
                if lifecycle.in_flight == 0:
                    logger.info("moeserve: drained in %.1fs; shutting down", waited)
                    self.should_exit = True
                elif waited >= drain_timeout_s:
                    logger.warning("moeserve: drain timeout (%.0fs) with %d request(s) in flight; cutting them",
                                   drain_timeout_s, lifecycle.in_flight)
                    self.config.timeout_graceful_shutdown = 0.5  # then uvicorn cancels what is left
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def startup_report(timings: dict[str, float], total_s: float) -> str:
    """One line with each startup phase's seconds, e.g. for the log at `moeserve serve` startup."""
    phases = [("load", timings.get("load_s")), ("KV profile", timings.get("profile_s")),
              ("prefill warm-up", timings.get("prefill_warmup_s")), ("CUDA graphs", timings.get("cuda_graphs_s"))]
    named = " | ".join(f"{name} {s:.1f}s" for name, s in phases if s is not None)
    return f"moeserve: startup: {named} | total {total_s:.1f}s"
