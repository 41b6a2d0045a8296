"""hf_overrides (vLLM's flag): laid over config.json before the engine, the fit check and the planner read it."""

from __future__ import annotations

import json
import shlex

import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.cli import build_parser, engine_args_from
from moeserve.config import EngineConfig
from moeserve.plan.arch import apply_hf_overrides
from moeserve.plan.cli import main as plan_main
from moeserve.plan.planner import PlanRequest, make_plan


def test_objects_merge_key_by_key_other_values_replace():
    cfg = {"num_hidden_layers": 61, "rope_scaling": {"type": "yarn", "factor": 40}, "text_config": None}
    out = apply_hf_overrides(cfg, {"num_hidden_layers": 4, "rope_scaling": {"factor": 8}, "text_config": {"a": 1}})
    assert out == {"num_hidden_layers": 4, "rope_scaling": {"type": "yarn", "factor": 8}, "text_config": {"a": 1}}
    assert cfg["num_hidden_layers"] == 61 and cfg["rope_scaling"]["factor"] == 40  # the original is not changed
    assert apply_hf_overrides(cfg, None) is cfg
    with pytest.raises(ValueError, match="JSON object"):
        apply_hf_overrides(cfg, [1])


def _greedy(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": [3, 5, 7, 9]}], params)]


def test_engine_serves_the_overridden_config_as_if_config_json_said_so(tmp_path):
    """Dummy weights of a 3-layer config told to keep 1 layer equal a config.json that says 1 layer."""
    path = make_tiny_checkpoint(tmp_path / "three", "Qwen3MoeForCausalLM", num_hidden_layers=3)
    cfg = json.loads((tmp_path / "three" / "config.json").read_text())
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    kw = dict(load_format="dummy", seed=5, max_model_len=64, device="cpu")
    overridden = LLM(model=str(path), hf_overrides={"num_hidden_layers": 1}, **kw)
    assert len(overridden.llm_engine.model.model.layers) == 1
    assert overridden.llm_engine.hf_config.num_hidden_layers == 1
    got = _greedy(overridden)
    assert got == _greedy(LLM(model=str(one), **kw))
    assert got != _greedy(LLM(model=str(path), **kw))  # the 3 layers do answer differently


def test_bad_overrides_are_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="hf_overrides"):
        EngineConfig(hf_overrides="[1]")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--hf-overrides", "{not json"])
    assert "--hf-overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--hf-overrides", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "m", "--hf-overrides", '{"num_hidden_layers": 2}'])
    assert EngineConfig.from_kwargs(**engine_args_from(args)).hf_overrides == {"num_hidden_layers": 2}


def test_plan_sizes_the_truncated_model_and_prints_the_flag_in_both_commands(capsys):
    full = make_plan(PlanRequest("deepseek-ai/DeepSeek-R1", gpus="8xH200-141GB", max_model_len=16384))
    short = make_plan(PlanRequest("deepseek-ai/DeepSeek-R1", gpus="4xH100-80GB", max_model_len=16384, tp=4,
                                  hf_overrides={"num_hidden_layers": 12}))
    assert full.spec.num_layers == 61 and short.spec.num_layers == 12
    assert len(short.spec.moe_layers) == 9  # first_k_dense_replace = 3 dense layers kept
    assert short.kv_bytes_per_token == full.kv_bytes_per_token * 12 // 61
    for engine in ("moeserve", "vllm"):
        argv = shlex.split(short.commands[engine].splitlines()[-1])
        assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"num_hidden_layers": 12}
    assert "--hf-overrides" not in full.commands["moeserve"]
    assert plan_main(["deepseek-ai/DeepSeek-R1", "--gpus", "4xH100-80GB", "--hf-overrides",
                      '{"num_hidden_layers": 12}', "--max-model-len", "16384", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]  # a plan, not an error
    with pytest.raises(SystemExit):
        plan_main(["deepseek-ai/DeepSeek-R1", "--hf-overrides", "12"])
