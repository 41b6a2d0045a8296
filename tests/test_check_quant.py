"""moeserve check-quant (issue 19 part 6) on the CPU with tiny random checkpoints: the scoring hook against
transformers, a model against itself (KL 0, full agreement), online fp8 against the fp32 checkpoint (small KL;
PASS under loose thresholds, FAIL under impossible ones, the verdict line and the JSON), an fp8 checkpoint against
its unquantized source, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.cli import main

PROMPTS = ["The capital of France is", "def add(a, b):\n", "Once upon a time", "1, 2, 3, 4,",
           "Roses are red,", "Q: What is 2 + 2?\nA:"]
COMMON = ["--device", "cpu", "--max-tokens", "12", "--no-progress", "--block-size", "8"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cq")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", "\\n") for p in PROMPTS) + "\n")
    return dict(llama=make_tiny_checkpoint(root / "llama", "LlamaForCausalLM"),
                moe=make_tiny_checkpoint(root / "moe", "Qwen3MoeForCausalLM"), prompts=str(prompts), root=root)


def _run(argv, capsys):
    rc = main(["check-quant", *argv])
    out = capsys.readouterr()
    return rc, out.out.strip().splitlines(), out.err


def test_scoring_matches_transformers(ckpts):
    from transformers import AutoModelForCausalLM

    from moeserve import LLM
    from moeserve.engine.scoring import score_logprobs

    seqs = [[5, 17, 42, 9, 11, 3], list(range(3, 40, 3)), [7, 8]]
    starts = [2, 0, 1]
    llm = LLM(model=ckpts["llama"], device="cpu", block_size=8, max_num_batched_tokens=16)  # two batches
    got = list(score_logprobs(llm.llm_engine, seqs, starts, max_positions=8))
    hf = AutoModelForCausalLM.from_pretrained(ckpts["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        for s, p, lp in zip(seqs, starts, got):
            ref = torch.log_softmax(hf(torch.tensor([s])).logits[0].float(), -1)[p:]
            assert lp.shape == ref.shape
            torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.kv.pool.num_free == llm.llm_engine.kv.num_blocks  # every scoring block given back


@pytest.mark.parametrize("arch", ["llama", "moe"])
def test_model_against_itself(ckpts, arch, capsys, tmp_path):
    out = tmp_path / "r.json"
    rc, lines, _ = _run([ckpts[arch], "--reference", ckpts[arch], "--prompts", ckpts["prompts"],
                         "--max-kl", "1e-9", "--min-top1", "1", "--min-greedy-match", "1",
                         "--save-result", str(out), *COMMON], capsys)
    assert rc == 0, lines
    assert lines[-1].startswith("check-quant PASS: kl=")
    r = json.loads(out.read_text())
    assert r["passed"] and abs(r["kl_mean"]) < 1e-9 and r["kl_max"] < 1e-6
    assert r["top1_agreement"] == 1.0 and r["greedy_match"] == 1.0
    assert r["mean_common_prefix"] == r["mean_reference_len"] > 0
    assert r["num_prompts"] == len(PROMPTS) and r["positions"] == sum(p["reference_len"] for p in r["per_prompt"])


@pytest.mark.parametrize("arch", ["llama", "moe"])
def test_online_fp8_against_fp32(ckpts, arch, capsys, tmp_path):
    out = tmp_path / "r.json"
    rc, lines, _ = _run([ckpts[arch], "--quantization", "fp8", "--prompts", ckpts["prompts"], "--max-kl", "0.05",
                         "--min-top1", "0.5", "--min-greedy-match", "0", "--save-result", str(out), *COMMON], capsys)
    r = json.loads(out.read_text())
    print(arch, {k: r[k] for k in ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "greedy_match",
                                   "mean_common_prefix", "positions")})
    assert rc == 0, lines
    assert r["passed"] and lines[-1] == r["verdict"] and lines[-1].startswith("check-quant PASS")
    assert 0 < r["kl_mean"] < 0.05  # fp8 changed something, not much
    assert r["quantized"]["quantization"] == "fp8" and r["reference"]["quantization"] is None
    assert r["thresholds"] == {"max_kl": 0.05, "min_top1": 0.5, "min_greedy_match": 0.0}
    for key in ("kl_median", "kl_p99", "top1_agreement", "greedy_match", "mean_common_prefix", "per_prompt"):
        assert key in r
    # the same models, an impossible threshold: FAIL, exit 1, the failed measure named
    rc, lines, _ = _run([ckpts[arch], "--quantization", "fp8", "--prompts", ckpts["prompts"], "--max-kl", "0",
                         "--min-top1", "0", "--min-greedy-match", "0", *COMMON], capsys)
    assert rc == 1 and lines[-1].startswith("check-quant FAIL (kl): kl=")


def test_builtin_prompts_default_thresholds(ckpts, capsys):
    rc, lines, err = _run([ckpts["llama"], "--reference", ckpts["llama"], "--device", "cpu", "--max-tokens", "4"],
                          capsys)
    assert rc == 0 and "32 prompts" in lines[-1] and "(max 0.02)" in lines[-1] and "(min 0.95)" in lines[-1]
    assert "loading the reference" in err


def test_fp8_checkpoint_against_reference(ckpts, capsys, tmp_path):
    fp8_pair = pytest.importorskip("test_fp8").make_fp8_pair
    fp8, _ = fp8_pair(tmp_path, "LlamaForCausalLM", (16, 16))
    src = str(tmp_path / "src")
    out = tmp_path / "r.json"
    rc, lines, _ = _run([fp8, "--reference", src, "--prompts", ckpts["prompts"], "--max-kl", "0.05",
                         "--min-top1", "0.5", "--min-greedy-match", "0", "--save-result", str(out), *COMMON], capsys)
    r = json.loads(out.read_text())
    print({k: r[k] for k in ("kl_mean", "kl_max", "top1_agreement", "greedy_match", "mean_common_prefix")})
    assert rc == 0, lines
    assert 0 < r["kl_mean"] < 0.05
    # an fp8 checkpoint needs its reference named
    rc, _, err = _run([fp8, "--quantization", "fp8", *COMMON], capsys)
    assert rc == 2 and "--reference" in err


def test_refusals(ckpts, capsys, tmp_path):
    rc, _, err = _run([ckpts["llama"], *COMMON], capsys)
    assert rc == 2 and "nothing to compare" in err
    rc, _, err = _run([ckpts["llama"], "--quantization", "fp8", "-tp", "2", *COMMON], capsys)
    assert rc == 2 and "one process" in err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": 1}\n')
    rc, _, err = _run([ckpts["llama"], "--quantization", "fp8", "--prompts", str(bad), *COMMON], capsys)
    assert rc == 2 and "p.jsonl:1" in err


def test_one_model_at_a_time(ckpts, monkeypatch):
    """The reference's engine is gone (no reference left to it) before the quantized model loads."""
    import gc
    import weakref

    from moeserve.quant_check import runner

    loaded = []
    real = runner._load

    def load(args):
        gc.collect()
        assert all(r() is None for r in loaded), "the reference engine is still alive"
        llm = real(args)
        loaded.append(weakref.ref(llm.llm_engine))
        return llm

    monkeypatch.setattr(runner, "_load", load)
    m = runner.compare(dict(model=ckpts["llama"], device="cpu", block_size=8),
                       dict(model=ckpts["llama"], device="cpu", block_size=8, quantization="fp8"),
                       PROMPTS[:2], 4, progress=False)
    assert len(loaded) == 2 and m["positions"] == 8


def test_prompt_files_and_verdict(tmp_path):
    from moeserve.quant_check.prompts import PROMPTS as BUILTIN, load_prompts
    from moeserve.quant_check.runner import Thresholds, verdict

    assert load_prompts(None) == list(BUILTIN) and len(BUILTIN) == 32
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a b"}\n\n{"prompt_token_ids": [5, 6]}\n"plain"\n')
    assert load_prompts(str(f)) == ["a b", [5, 6], "plain"]
    t = tmp_path / "p.txt"
    t.write_text("one\\ntwo\n\nthree\n")
    assert load_prompts(str(t)) == ["one\ntwo", "three"]
    m = dict(kl_mean=0.004, top1_agreement=0.97, greedy_match=0.3, mean_common_prefix=30.0, mean_reference_len=64.0,
             num_prompts=32, positions=2048)
    ok, line = verdict(m, Thresholds(0.02, 0.95, 0.1))
    assert ok and line.startswith("check-quant PASS: kl=0.004 nats/token (max 0.02) top1=0.9700 (min 0.95)")
    ok, line = verdict(dict(m, top1_agreement=0.9, greedy_match=float("nan")), Thresholds(0.02, 0.95, 0.1))
    assert not ok and line.startswith("check-quant FAIL (top1, greedy_match):")
