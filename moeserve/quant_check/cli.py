"""`moeserve check-quant`: is the quantized model as good as its reference?

  moeserve check-quant MODEL --quantization fp8            online fp8 of MODEL against MODEL unquantized
  moeserve check-quant QUANTIZED_MODEL --reference MODEL   a quantized checkpoint against its bf16 sibling

A fixed prompt set (or --prompts FILE) goes through both, one model after the other. Measured: the mean per-token
KL divergence KL(reference || quantized) over the whole vocabulary on the reference's greedy continuation (teacher
forcing: both models see the same contexts), the top-1 agreement on those positions, and greedy-sequence
agreement (prompts whose free-running greedy outputs are identical; mean common prefix). One verdict line on
stdout, PASS or FAIL with the numbers; exit 0 on PASS, 1 on FAIL, 2 on bad input.

Default thresholds: good 8-bit weights keep KL around 1e-3 to 1e-2 nats/token (llama.cpp's --kl-divergence
tables: 8-bit ~1e-3, 6-bit ~5e-3, 4-bit K-quants ~2e-2 to 5e-2; FP8 W8A8 reports sit in the 8-bit to 6-bit range),
so --max-kl 0.02 passes any sound FP8 with room and fails 4-bit-class damage. Those same tables put top-1
agreement at 97-99% for 8-bit and ~94% for 4-bit: --min-top1 0.95. One flip anywhere sends a free-running
continuation elsewhere, so exact greedy matches over 64 tokens are rare even at 98-99% top-1 (0.98^64 ~ 0.27):
--min-greedy-match 0.1 is a guard against a broken model, not a fine measure; KL is the gate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_MAX_KL = 0.02
DEFAULT_MIN_TOP1 = 0.95
DEFAULT_MIN_GREEDY_MATCH = 0.1


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from moeserve.cli import _add_engine_flags  # the engine flags of serve/generate, for both models

    p.add_argument("model", nargs="?", default=None,
                   help="the model to check: a bf16/fp32 checkpoint with --quantization, or a quantized checkpoint "
                        "with --reference")
    g = p.add_argument_group("check-quant")
    g.add_argument("--reference", default=None, metavar="MODEL",
                   help="the unquantized sibling to compare against (default: MODEL itself, unquantized)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts: .jsonl ({\"prompt\": ...} or {\"prompt_token_ids\": [...]} per line) or one per "
                        "text line (default: 32 built-in prompts)")
    g.add_argument("--max-tokens", type=int, default=64, help="length of the greedy continuations")
    g.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                   help="most mean KL(reference || quantized), nats per token")
    g.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1,
                   help="least top-1 agreement on the teacher-forced positions")
    g.add_argument("--min-greedy-match", type=float, default=DEFAULT_MIN_GREEDY_MATCH,
                   help="least fraction of prompts whose greedy outputs are identical")
    g.add_argument("--save-result", default=None, metavar="FILE.json", help="write the measurements and verdict")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _add_engine_flags(p)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-quant", help="accuracy gate: a quantized model against its reference",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def _declares_quantization(model: str) -> bool:
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def sides(args: argparse.Namespace) -> tuple[dict, dict]:
    """(reference engine args, quantized engine args) of the parsed flags."""
    from moeserve.cli import engine_args_from

    model = args.model or args.model_flag
    if not model:
        raise ValueError("give the MODEL to check")
    kv_quant = getattr(args, "kv_cache_dtype", "auto") not in ("auto", "bf16", "fp16")
    if args.reference is None and args.quantization is None and not kv_quant:
        raise ValueError("nothing to compare: give --quantization fp8 (MODEL against itself unquantized) or "
                         "--reference MODEL (a quantized checkpoint against its unquantized sibling)")
    if args.reference is None and _declares_quantization(model):
        raise ValueError(f"{model} is a quantized checkpoint: give its unquantized sibling with --reference")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size != 1 or args.nnodes != 1:
        raise ValueError("check-quant runs each model on one process (one GPU or the CPU) for now")
    base = engine_args_from(args)
    quant = dict(base, model=model, quantization=args.quantization)
    ref = dict(base, model=args.reference or model, quantization=None)
    if "kv_cache_dtype" in ref:  # the reference keeps its KV cache in the model dtype too
        ref["kv_cache_dtype"] = "auto"
    return ref, quant


def _jsonable(x):
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    from moeserve.quant_check.prompts import load_prompts
    from moeserve.quant_check.runner import Thresholds, compare, verdict

    ref, quant = sides(args)
    prompts = load_prompts(args.prompts)
    th = Thresholds(args.max_kl, args.min_top1, args.min_greedy_match)
    m = compare(ref, quant, prompts, args.max_tokens, progress=not args.no_progress)
    passed, line = verdict(m, th)
    print(line, flush=True)
    if args.save_result:
        doc = dict(passed=passed, verdict=line, thresholds=vars(th), **m)
        Path(args.save_result).write_text(json.dumps(_jsonable(doc), indent=2), encoding="utf-8")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="moeserve check-quant", description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"moeserve check-quant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
