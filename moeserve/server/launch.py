"""`moeserve serve`: load the engine, start its thread, and serve the OpenAI API with uvicorn."""

from __future__ import annotations

import logging
import os
import time

from moeserve.server.serving import ServerSettings

logger = logging.getLogger("moeserve")


def read_chat_template(value: str | None) -> str | None:
    """--chat-template is a file path or the Jinja template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template.")
    return value


def check_agent_flags(enable_auto_tool_choice: bool, tool_call_parser: str | None,
                      reasoning_parser: str | None) -> None:
    """Unknown parser names fail at startup, before any weight is loaded."""
    from moeserve.server.reasoning_parsers import reasoning_parser_class
    from moeserve.server.tool_parsers import tool_parser_class

    if tool_call_parser is not None:
        tool_parser_class(tool_call_parser)
    if reasoning_parser is not None:
        reasoning_parser_class(reasoning_parser)
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME.")


def build_server(engine, *, served_model_names: list[str] | None = None, api_key: str | None = None,
                 chat_template: str | None = None, max_waiting_requests: int = 4096,
                 max_request_body_bytes: int = 16 * 1024 * 1024, max_logprobs: int = 20,
                 max_stop_strings: int = 64, max_stop_token_ids: int = 256, max_prompts_per_request: int = 256,
                 enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None):
    """The FastAPI app around an LLMEngine, with the engine thread started. Returns (app, async_engine)."""
    from moeserve.engine.async_engine import AsyncLLMEngine
    from moeserve.server.app import build_app
    from moeserve.server.lifecycle import Lifecycle, install
    from moeserve.server.metrics import ServerMetrics
    from moeserve.server.serving import OpenAIServing

    check_agent_flags(enable_auto_tool_choice, tool_call_parser, reasoning_parser)
    names = list(served_model_names or [engine.model_name])
    async_engine = AsyncLLMEngine(engine, max_waiting_requests=max_waiting_requests)
    metrics = ServerMetrics(lambda: async_engine.stats, names[0],
                            expert_load_source=lambda: async_engine.expert_load_latest,
                            config_info=engine.config_info() if hasattr(engine, "config_info") else None)
    async_engine.observer = metrics
    settings = ServerSettings(model_names=names, max_model_len=engine.max_model_len, chat_template=chat_template,
                              max_logprobs=max_logprobs, api_key=api_key,
                              max_request_body_bytes=max_request_body_bytes,
                              vocab_size=getattr(getattr(engine, "hf_config", None), "vocab_size", None),
                              max_stop_strings=max_stop_strings, max_stop_token_ids=max_stop_token_ids,
                              max_prompts_per_request=max_prompts_per_request,
                              enable_auto_tool_choice=enable_auto_tool_choice, tool_call_parser=tool_call_parser,
                              reasoning_parser=reasoning_parser)
    app = build_app(OpenAIServing(async_engine, engine.tokenizer, settings), metrics)
    install(app, Lifecycle(settings.retry_after_s), async_engine)  # GET /ready and the SIGTERM drain
    async_engine.start()
    return app, async_engine


def run_server(args, engine_args: dict) -> int:
    import uvicorn

    from moeserve.engine.engine import LLMEngine

    from moeserve.config import EngineConfig
    from moeserve.distributed.launch import run_if_not_rank_zero
    from moeserve.server.lifecycle import make_draining_server, startup_report

    started = time.perf_counter()
    chat_template = read_chat_template(args.chat_template)
    agents = dict(enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
                  tool_call_parser=getattr(args, "tool_call_parser", None),
                  reasoning_parser=getattr(args, "reasoning_parser", None))
    check_agent_flags(**agents)
    code = run_if_not_rank_zero(EngineConfig.from_kwargs(**engine_args))
    if code is not None:  # this process runs worker ranks of a server whose rank 0 is elsewhere
        return code
    engine = LLMEngine.from_engine_args(**engine_args)
    app, async_engine = build_server(
        engine, served_model_names=args.served_model_name, api_key=args.api_key, chat_template=chat_template,
        max_waiting_requests=args.max_waiting_requests, max_request_body_bytes=args.max_request_body_bytes,
        max_logprobs=args.max_logprobs, max_stop_strings=args.max_stop_strings,
        max_stop_token_ids=args.max_stop_token_ids, max_prompts_per_request=args.max_prompts_per_request,
        **agents)
    logger.info("%s", startup_report(engine.timings, time.perf_counter() - started))
    logger.info("moeserve: serving %s on http://%s:%d/v1 (max_model_len=%d)", engine.model_name, args.host,
                args.port, engine.max_model_len)
    server = make_draining_server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                       timeout_graceful_shutdown=5),
        app.state.lifecycle, getattr(args, "drain_timeout_s", 30.0))

    died: list[BaseException] = []

    def engine_died(error: BaseException) -> None:  # fail loudly: stop serving and exit non-zero
        logger.error("moeserve: the engine died (%s); shutting the server down", error)
        died.append(error)
        server.should_exit = True

    async_engine.on_death = engine_died

    def stop_engine() -> None:
        """At the application's shutdown, while the process still runs: uvicorn re-raises the SIGTERM it caught
        once it is done, which ends the process before a `finally` below would run (the other ranks must be
        told to stop, or they fail on a closed connection)."""
        async_engine.shutdown()
        engine.shutdown()

    app.router.on_shutdown.append(stop_engine)
    try:
        server.run()
    finally:
        async_engine.shutdown()
        engine.shutdown()
    return 1 if died else 0
