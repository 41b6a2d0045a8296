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
    """With --trace-steps, also every engine step the server ran (serve_step_trace.py), written at its SIGTERM."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM")
    out = tmp_path / "out"
    rc = serve_pair.main(["--model", ckpt, "--engines", "moeserve", "--serve-args", "--max-model-len 128 --device cpu",
                          "--bench-args", "--num-prompts 6 --input-len 12 --output-len 5 --endpoint completions "
                          "--ignore-eos", "--out-dir", str(out), "--trace-steps"])
    assert rc == 0
    report = json.loads((out / "serve_pair.json").read_text())
    row = report["summary"]["moeserve"]
    assert row["completed"] == 6 and row["failed"] == 0 and row["output_throughput"] > 0
    args = report["engines"]["moeserve"]["serve_args"]
    assert "--tokenizer" in args  # the tests' tokenizer, built for both
    assert args[args.index("--hf-overrides") + 1] == '{"vocab_size": 384}'  # every sampled id has text
    assert (out / "moeserve-server.log").read_text()  # the server's own output is kept beside the result
    assert "| output_throughput |" in capsys.readouterr().out
    steps = [json.loads(line) for line in (out / "moeserve-steps" / "server-steps.jsonl").read_text().splitlines()]
    busy = [s for s in steps if s["kind"] != "idle"]
    assert sum(s["decode_rows"] for s in busy) >= 6 * 4  # each request's tokens after its first came from decode rows
    assert sum(s["prefill_tokens"] for s in busy) >= 6 * 12 - 6  # the prompts
    assert all(s["wall_s"] > 0 for s in busy)
    assert "decode" in (out / "moeserve-steps" / "server-steps-summary.txt").read_text()


def test_vllm_is_started_through_its_own_cli():
    cmd = serve_pair.engine_command("vllm")
    assert cmd[0] == sys.executable and "vllm.entrypoints.cli.main" in cmd[-2]
    assert cmd[-1] == "serve"  # `vllm MODEL` is not a command: the subcommand comes first
    assert serve_pair.engine_command("moeserve") is None
    assert serve_pair.engine_command("moeserve", trace_steps=True)[-2:] == [
        str(Path(serve_pair.__file__).with_name("serve_step_trace.py")), "serve"]


def test_random_weights_are_built_once_with_the_tokenizers_vocabulary_and_served(tmp_path):
    """--random-weights: one random checkpoint of the model's config (vocabulary cut to the tokenizer's, the
    config overrides laid over it) that the servers load instead of dummy weights."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "Qwen3MoeForCausalLM")
    out, weights = tmp_path / "out", tmp_path / "random"
    rc = serve_pair.main(["--model", ckpt, "--engines", "moeserve", "--serve-args", "--max-model-len 128 --device cpu",
                          "--bench-args", "--num-prompts 3 --input-len 12 --output-len 4 --endpoint completions "
                          "--ignore-eos", "--out-dir", str(out), "--random-weights", str(weights),
                          "--config-overrides", '{"num_hidden_layers": 1}'])
    assert rc == 0
    cfg = json.loads((weights / "config.json").read_text())
    assert cfg["vocab_size"] == 384 and cfg["num_hidden_layers"] == 1
    assert list(weights.glob("*.safetensors"))
    report = json.loads((out / "serve_pair.json").read_text())
    args = report["engines"]["moeserve"]["serve_args"]
    assert args[0] == str(weights) and args[args.index("--load-format") + 1] == "auto"
    assert "--hf-overrides" not in args  # the checkpoint's own config holds the vocabulary
    assert report["summary"]["moeserve"]["completed"] == 3
