"""The FastAPI application: routes, API-key check, body-size limit, and OpenAI-style errors for everything."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from moeserve import __version__
from moeserve.server.chat import create_chat_completion
from moeserve.server.completions import create_completion
from moeserve.server.errors import APIError, bad_request, from_validation_error
from moeserve.server.metrics import ServerMetrics
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest, invalid_unicode_at
from moeserve.server.serving import OpenAIServing

logger = logging.getLogger("moeserve")


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


def build_app(serving: OpenAIServing, metrics: ServerMetrics) -> FastAPI:
    settings = serving.settings
    app = FastAPI(title="moeserve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.serving = serving
    app.state.metrics = metrics
    api_key = settings.api_key.encode() if settings.api_key else None

    # -- errors: always {"error": {...}} --
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return bad_request(str(e.errors()[:1])).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, e: ClientDisconnect):
        return Response(status_code=499)  # nobody is listening: no answer, no traceback

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        logger.exception("moeserve: unhandled error")
        # Starlette re-raises after sending this, and the connection is not reused: say so to the client.
        return APIError(500, f"Internal server error: {type(e).__name__}", code="internal_error",
                        headers={"Connection": "close"}).response()

    # -- helpers --
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare_digest: the time taken does not tell how much of the key was right
        if not hmac.compare_digest(given, api_key):
            raise APIError(401, "Missing or incorrect API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_json_content_type(request: Request) -> None:
        # A browser may post text/plain across origins without a CORS preflight; application/json needs one.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise APIError(415, f"The request body must be JSON, sent with 'Content-Type: application/json' "
                                f"(got {media or 'none'!r}).", code="unsupported_media_type")

    async def read_json(request: Request) -> dict:
        limit = settings.max_request_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4300 digits
            raise bad_request(f"The request body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad_request("The request body nests too deeply.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        where = invalid_unicode_at(body)
        if where is not None:
            raise bad_request(f"{where}: the string is not valid Unicode (a lone surrogate).", param=where)
        return body

    def parse(model_cls, body: dict):
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def until_disconnected(request: Request):
        async def run(coro):
            """Await `coro`, cancelling it (and so aborting its requests) if the client disconnects first."""
            task = asyncio.ensure_future(coro)

            async def watch():
                while (await request.receive())["type"] != "http.disconnect":
                    await asyncio.sleep(0.05)  # never spin, whatever the server hands back

            watcher = asyncio.ensure_future(watch())
            try:
                await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                raise ClientGone()
            finally:
                watcher.cancel()
                task.cancel()
        return run

    async def handle(request: Request, model_cls, create):
        arrival = time.time()
        check_auth(request)
        check_json_content_type(request)
        req = parse(model_cls, await read_json(request))
        try:
            result = await create(serving, req, arrival, until_disconnected(request))
        except ClientGone:
            return Response(status_code=499)
        return result if isinstance(result, Response) else JSONResponse(result)

    # -- routes --
    # The routes read the body themselves (size limit, OpenAI-shaped errors); the schema still names the models.
    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, create_chat_completion)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        return await handle(request, CompletionRequest, create_completion)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        created = int(app.state.started)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "moeserve", "root": name,
             "max_model_len": settings.max_model_len} for name in settings.model_names]}

    @app.get("/health")
    async def health():
        if not serving.engine.is_running:
            return APIError(503, "The engine is not running.", code="engine_dead").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/expert_load")
    async def expert_load(request: Request):
        """The layer x expert table of tokens routed over the telemetry window (--expert-load-telemetry)."""
        check_auth(request)
        snap = await serving.engine.refresh_expert_load()
        table = snap.to_json() if snap is not None else {"layers": [], "num_experts": 0, "window_s": 0.0}
        return {"object": "expert_load", "model": settings.model_names[0], "enabled": snap is not None, **table}

    @app.get("/metrics")
    async def prometheus_metrics():
        await serving.engine.refresh_expert_load()  # the engine thread's snapshot; no-op when telemetry is off
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, CompletionRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.state.started = time.time()
    return app


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes (--max-request-body-bytes).",
                    code="request_too_large")
