"""`moeserve serve` with kernels/step_trace.py's Tracer on its engine: every engine step's rows, prefill tokens,
host launch time, GPU time and wall time, written when the server shuts down (SIGTERM), as JSONL plus the summary
by kind of step. It answers where a served step's time goes next to the same engine driven offline.

    MOESERVE_STEP_TRACE_OUT=DIR python3 benchmarks/serve_step_trace.py serve MODEL [moeserve serve flags...]

serve_pair.py --trace-steps runs moeserve's server this way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "kernels"))


def attach(out_dir: Path) -> None:
    """Wrap LLMEngine.from_engine_args: the engine it builds gets a Tracer, written out at its shutdown."""
    from step_trace import Tracer, summarize

    from moeserve.engine.engine import LLMEngine

    build = LLMEngine.from_engine_args.__func__

    def traced_build(cls, **kwargs):
        eng = build(cls, **kwargs)
        tracer = Tracer(eng)
        shutdown = eng.shutdown
        written = []

        def traced_shutdown():
            if not written:  # the server's shutdown hook and its finally both stop the engine
                written.append(True)
                rows = tracer.finish()
                busy = [r for r in rows if r["kind"] != "idle"]
                out_dir.mkdir(parents=True, exist_ok=True)
                with open(out_dir / "server-steps.jsonl", "w") as f:
                    for r in rows:
                        f.write(json.dumps(r) + "\n")
                wall = sum(r["wall_s"] for r in busy) or 1e-9
                out_tokens = sum(r.get("decode_rows", 0) for r in busy)
                text = summarize(busy, wall, out_tokens)
                (out_dir / "server-steps-summary.txt").write_text(text + "\n")
                print(text, flush=True)
            shutdown()

        eng.shutdown = traced_shutdown
        return eng

    LLMEngine.from_engine_args = classmethod(traced_build)


def main() -> int:
    attach(Path(os.environ.get("MOESERVE_STEP_TRACE_OUT", "step-trace")))
    from moeserve.cli import main as cli_main

    t = time.perf_counter()
    code = cli_main(sys.argv[1:])
    print(f"serve_step_trace: server ran {time.perf_counter() - t:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
