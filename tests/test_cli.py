"""The `moeserve` command line: flags with vLLM's names and help, `generate` against the offline API, `plan`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.cli import build_parser, engine_args_from, main
from moeserve.config import EngineConfig

ISSUE_FLAGS = ["--host", "--port", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
               "--max-num-batched-tokens", "--gpu-memory-utilization", "--dtype", "--load-format", "--seed",
               "--tokenizer", "--chat-template", "--device", "--block-size"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "LlamaForCausalLM")


def _serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def test_serve_help_explains_every_flag():
    actions = {opt: a for a in _serve_parser()._actions for opt in a.option_strings}
    for flag in ISSUE_FLAGS:
        assert flag in actions, flag
        assert actions[flag].help and len(actions[flag].help) > 10, flag
    assert set(actions["--load-format"].choices) >= {"auto", "dummy"}
    text = _serve_parser().format_help()
    for flag in ISSUE_FLAGS:
        assert flag in text


def test_console_entry_point():
    exe = shutil.which("moeserve")
    cmd = [exe] if exe else [sys.executable, "-m", "moeserve.cli"]
    out = subprocess.run(cmd + ["serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-num-batched-tokens" in out.stdout
    out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("moeserve ")


def test_sub_commands_are_real():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "generate", "bench"} <= set(sub.choices)
    bench = next(a for a in sub.choices["bench"]._actions if a.dest == "bench_command")
    assert set(bench.choices) == {"serve"}  # no stubs: `bench serve` is the one load generator so far


def test_flags_reach_the_engine_config(ckpt):
    args = build_parser().parse_args([
        "serve", ckpt, "--max-model-len", "256", "--max-num-seqs", "7", "--max-num-batched-tokens", "512",
        "--gpu-memory-utilization", "0.5", "--dtype", "float32", "--load-format", "dummy", "--seed", "3",
        "--tokenizer", ckpt, "--device", "cpu", "--block-size", "32", "--served-model-name", "a", "b",
        "--no-enable-prefix-caching"])
    cfg = EngineConfig.from_kwargs(**engine_args_from(args))  # no unknown keywords
    assert (cfg.model, cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (ckpt, 256, 7, 512)
    assert (cfg.gpu_memory_utilization, cfg.dtype, cfg.load_format, cfg.seed) == (0.5, "float32", "dummy", 3)
    assert (cfg.tokenizer, cfg.device, cfg.block_size, cfg.served_model_name) == (ckpt, "cpu", 32, "a")
    assert cfg.enable_prefix_caching is False
    assert args.served_model_name == ["a", "b"] and args.host == "127.0.0.1" and args.port == 8000


def test_custom_all_reduce_flags_choose_the_groups_that_take_it(ckpt):
    """On by default in groups of 4+ ranks (measured faster there), --enable-custom-all-reduce also at 2,
    vLLM's --disable-custom-all-reduce never; both at once is refused."""
    def min_ranks(*flags: str) -> int:
        args = build_parser().parse_args(["serve", ckpt, "--tensor-parallel-size", "4", *flags])
        cfg = EngineConfig.from_kwargs(**engine_args_from(args))
        assert cfg.parallel_layout().custom_all_reduce == cfg.custom_all_reduce_min_ranks
        return cfg.custom_all_reduce_min_ranks

    assert (min_ranks(), min_ranks("--enable-custom-all-reduce"), min_ranks("--disable-custom-all-reduce")) == (4, 2, 0)
    with pytest.raises(ValueError, match="contradict"):
        min_ranks("--enable-custom-all-reduce", "--disable-custom-all-reduce")


def test_generate_prints_the_offline_answer(ckpt, capsys):
    llm = LLM(model=ckpt, device="cpu")
    ref_raw = llm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    ref_chat = llm.chat([{"role": "user", "content": "Hello"}],
                        SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert main(["generate", "--model", ckpt, "--device", "cpu", "--max-tokens", "8", "--no-chat",
                 "Hello, world"]) == 0
    assert capsys.readouterr().out == ref_raw + "\n"
    assert main(["generate", "--model", ckpt, "--device", "cpu", "--max-tokens", "8", "Hello"]) == 0
    assert capsys.readouterr().out == ref_chat + "\n"


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "moeserve generate: error:" in err and "missing" in err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "not-a-port"])
    assert e.value.code == 2


def test_plan_is_wired():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "plan" not in sub.choices:
        pytest.skip("moeserve.plan.cli is not in this checkout")
    assert main(["plan", "--list"]) == 0


def test_plans_single_gpu_command_parses_and_multi_gpu_layouts_are_refused_clearly(ckpt, capsys):
    import shlex

    from moeserve.plan.planner import PlanRequest, make_plan

    one = make_plan(PlanRequest("Qwen/Qwen3-30B-A3B", gpus="1xH100-80GB")).commands["moeserve"]
    argv = shlex.split(one)[1:]  # drop the program name
    assert argv[0] == "serve" and not one.startswith("#")
    engine_args_from(_serve_parser().parse_args(argv[1:]))  # every flag the plan writes is accepted
    four = make_plan(PlanRequest("Qwen/Qwen3-235B-A22B", gpus="4xH200-141GB")).commands["moeserve"]
    assert four.startswith("moeserve serve")  # a layout the engine runs is printed to run as it is
    args = engine_args_from(_serve_parser().parse_args(shlex.split(four)[2:]))
    assert args["tensor_parallel_size"] == 4 and not args["enable_expert_parallel"]  # experts TP-sharded (measured faster)
    two_nodes = make_plan(PlanRequest("deepseek-ai/DeepSeek-V3", gpus="8xH100-80GB", nodes=2)).commands["moeserve"]
    assert "does not run" not in two_nodes and "--pipeline-parallel-size 2" in two_nodes  # PP runs as printed
    # a layout the engine does not run is refused before anything loads, naming the flag
    assert main(["generate", "--model", ckpt, "-dp", "2", "hi"]) == 2  # DP attention needs EP
    assert "enable_expert_parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # int4 is sized by the planner but not run yet: argparse refuses it
        main(["generate", "--model", ckpt, "--quantization", "int4", "hi"])
    assert e.value.code == 2 and "--quantization" in capsys.readouterr().err
