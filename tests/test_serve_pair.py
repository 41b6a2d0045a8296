"""benchmarks/serve_pair.py: a server per engine under the same `moeserve bench serve` load, side by side (the
moeserve half on CPU; vLLM's needs the device's carried install)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_checkpoints import make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_pair  # noqa: E402


def test_moeserve_half_measures_every_request_and_keeps_the_server_log(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM")
    out = tmp_path / "out"
    rc = serve_pair.main(["--model", ckpt, "--engines", "moeserve", "--serve-args", "--max-model-len 128 --device cpu",
                          "--bench-args", "--num-prompts 6 --input-len 12 --output-len 5 --endpoint completions "
                          "--ignore-eos", "--out-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "serve_pair.json").read_text())
    row = report["summary"]["moeserve"]
    assert row["completed"] == 6 and row["failed"] == 0 and row["output_throughput"] > 0
    args = report["engines"]["moeserve"]["serve_args"]
    assert "--tokenizer" in args  # the tests' tokenizer, built for both
    assert args[args.index("--hf-overrides") + 1] == '{"vocab_size": 384}'  # every sampled id has text
    assert (out / "moeserve-server.log").read_text()  # the server's own output is kept beside the result
    assert "| output_throughput |" in capsys.readouterr().out


def test_vllm_is_started_through_its_own_cli():
    cmd = serve_pair.engine_command("vllm")
    assert cmd[0] == sys.executable and "vllm.entrypoints.cli.main" in cmd[-2]
    assert cmd[-1] == "serve"  # `vllm MODEL` is not a command: the subcommand comes first
    assert serve_pair.engine_command("moeserve") is None
