"""Engine behaviour on a tiny Llama: sampling options, stops, n > 1, logprobs, prefix cache, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.engine.errors import RequestRejected


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(model=path)


PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (4, 9, 21)]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS, p)
    b = llm.generate(PROMPTS[::-1], p)[::-1]  # other order, so other batch rows
    c = llm.generate(PROMPTS[1], p)
    assert _tokens(a) == _tokens(b)
    assert _tokens(c)[0] == _tokens(a)[1]
    d = llm.generate(PROMPTS, p.clone(seed=99))
    assert _tokens(d) != _tokens(a)


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)))
    topk = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True)))
    topp = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=16, ignore_eos=True)))
    minp = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.5, min_p=1.0, max_tokens=16, ignore_eos=True)))
    assert greedy == topk == topp == minp


def test_n_completions(llm):
    outs = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True))
    assert len(outs[0].outputs) == 3 and [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    same = llm.generate(PROMPTS[0], SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True))
    assert same[0].outputs[0].token_ids == same[0].outputs[1].token_ids


def test_max_tokens_and_stop_token_ids(llm):
    base = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(base.token_ids) == 20 and base.finish_reason == "length"
    stop_id = base.token_ids[6]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                  ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_min_tokens_holds_back_stop_tokens(llm):
    plain = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stops = sorted(set(plain.outputs[0].token_ids))  # every token the model would pick
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, min_tokens=6,
                                                  stop_token_ids=stops))[0].outputs[0]
    assert len(out.token_ids) >= 6
    assert not set(out.token_ids[:5]) & set(stops)
    without = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=stops))[0]
    assert len(without.outputs[0].token_ids) == 1  # the control: the very first token stops it


def test_stop_string_cut_cleanly(llm):
    prompt = "Paris is the capital of"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    assert len(full) > 8
    stop = full[4:7]
    first = full.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    c = out.outputs[0]
    assert c.text == full[:first] and c.finish_reason == "stop" and c.stop_reason == stop
    inc = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=stop, ignore_eos=True,
                                              include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == full[: first + len(stop)]


def test_logprobs_match_transformers(path, llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = PROMPTS[2]["prompt_token_ids"]
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = ref.topk(5)
    lp = out.logprobs[0]
    assert out.token_ids[0] == int(top.indices[0]) and lp[out.token_ids[0]].rank == 1
    for tid, val in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(lp[tid].logprob - val) < 1e-4
    assert abs(out.cumulative_logprob - float(top.values[0])) < 1e-4


def test_penalties_change_the_distribution(llm):
    p = dict(temperature=0, max_tokens=24, ignore_eos=True)
    plain = _tokens(llm.generate(PROMPTS, SamplingParams(**p)))
    for kw in (dict(repetition_penalty=3.0), dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        pen = _tokens(llm.generate(PROMPTS, SamplingParams(**p, **kw)))
        assert pen != plain, kw
        # penalised runs repeat themselves no more than the plain ones
        assert sum(len(set(t[0])) for t in pen) >= sum(len(set(t[0])) for t in plain), kw


def test_prefix_cache_reuses_blocks_with_identical_output(path):
    shared = list(range(10, 50))  # 40 tokens: two full blocks of 16 are shareable
    prompts = [{"prompt_token_ids": shared + [60 + i]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = _tokens(LLM(model=path, enable_prefix_caching=False).generate(prompts, params))
    cached_llm = LLM(model=path, block_size=16)
    first = cached_llm.generate(prompts[:1], params)
    rest = cached_llm.generate(prompts[1:], params)
    assert _tokens(first + rest) == plain
    assert all(o.num_cached_tokens == 32 for o in rest)
    assert cached_llm.llm_engine.kv.prefix_hits >= 64


def test_dummy_weights_from_config_only(path, tmp_path):
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    llm = LLM(model=str(tmp_path), load_format="dummy", seed=3)
    assert llm.get_tokenizer() is None
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate("text needs a tokenizer")


# -- bad input: each raises its documented error --

def test_missing_model_dir():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM(model="/nonexistent/model")


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(model=str(tmp_path))


def test_missing_weights(path, tmp_path):
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(model=str(tmp_path))


def test_unsupported_architecture(path, tmp_path):
    cfg = json.load(open(f"{path}/config.json"))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported architecture.*LlamaForCausalLM"):
        LLM(model=str(tmp_path), load_format="dummy")


def test_missing_config_field(path, tmp_path):
    cfg = json.load(open(f"{path}/config.json"))
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(model=str(tmp_path), load_format="dummy")


def test_checkpoint_config_mismatch(path, tmp_path):
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{path}/{f}", tmp_path / f)
    cfg = json.load(open(f"{path}/config.json"))
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.*shape"):
        LLM(model=str(tmp_path))


def test_dtype_the_device_cannot_run(path):
    with pytest.raises(ValueError, match="float16"):
        LLM(model=path, dtype="float16", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=path, dtype="float8")


def test_unknown_engine_argument(path):
    with pytest.raises(TypeError, match="Unknown engine argument"):
        LLM(model=path, max_num_seq=4)


def test_prompt_longer_than_max_model_len(path):
    llm = LLM(model=path, max_model_len=32)
    with pytest.raises(RequestRejected, match="max_model_len"):
        llm.generate({"prompt_token_ids": list(range(40))})
    with pytest.raises(ValueError, match="exceeds"):
        LLM(model=path, max_model_len=100000)


def test_prompt_larger_than_kv_pool(path):
    llm = LLM(model=path, num_gpu_blocks_override=2, block_size=16)
    with pytest.raises(RequestRejected, match="pool"):
        llm.generate({"prompt_token_ids": list(range(40))})
    # prompt + max_tokens beyond the whole pool could never finish: refused at admission, not cut short
    with pytest.raises(RequestRejected, match="pool") as e:
        llm.generate({"prompt_token_ids": list(range(20))}, SamplingParams(max_tokens=100, ignore_eos=True))
    assert e.value.code == "kv_cache_exceeded"
    # without max_tokens it runs until the pool is full, rather than hanging
    out = llm.generate({"prompt_token_ids": list(range(20))}, SamplingParams(max_tokens=None, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0),
                                dict(n=0), dict(top_k=-5), dict(min_p=2), dict(presence_penalty=3),
                                dict(logprobs=-1), dict(stop=[""]), dict(seed=2**64), dict(seed=-1)])
def test_invalid_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_bad_token_ids(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [10**9]})
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})


def test_start_up_fit_check_refuses_before_loading():
    """The engine's CUDA start-up check, fed an 80 GB device: Mixtral-8x7B in bf16 cannot fit one GPU."""
    from moeserve.config import EngineConfig
    from moeserve.engine.engine import DoesNotFit, check_fits_before_loading
    from moeserve.loader.model_loader import resolve_source

    cfg = EngineConfig(model="mistralai/Mixtral-8x7B-v0.1", load_format="dummy", max_model_len=4096)
    with pytest.raises(DoesNotFit, match="does not fit.*weights.*Suggestion"):
        check_fits_before_loading(cfg, resolve_source(cfg), torch.bfloat16, 80 * 10**9)
    small = EngineConfig(model="Qwen/Qwen3-30B-A3B", load_format="dummy", max_model_len=4096)
    check_fits_before_loading(small, resolve_source(small), torch.bfloat16, 80 * 10**9)  # fits: no error


def test_block_tables_track_every_request_through_preemption_and_prefix_sharing(path):
    """The runner rewrites only the block-table entries that changed; after every step each batch row must still
    hold exactly its request's blocks, whoever held the row before (preempted, finished, shifted rows)."""
    llm = LLM(model=path, num_gpu_blocks_override=14, block_size=8, max_num_batched_tokens=16)
    runner = llm.llm_engine.runner
    prepare, checked = runner._prepare, []

    def checking_prepare(step, prev_tokens=None):
        out = prepare(step, prev_tokens)
        tables = runner.stagings[(runner.num_steps - 1) % len(runner.stagings)].tables.numpy()
        for b, rid in enumerate(step.req_ids):  # the scheduler's truth, not the runner's own copy
            blocks = llm.llm_engine.requests[rid].block_ids
            assert tables[b, : len(blocks)].tolist() == blocks
        checked.append(len(step.req_ids))
        return out

    runner._prepare = checking_prepare
    shared = list(range(40, 52))
    prompts = [{"prompt_token_ids": shared + [7 + i] * (1 + 3 * i)} for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=20 + 10 * i, ignore_eos=True) for i in range(5)]
    outs = llm.generate(prompts, params)
    assert llm.llm_engine.scheduler.num_preemptions_total > 0 and max(checked) >= 3
    ref = LLM(model=path)
    assert _tokens(outs) == _tokens(ref.generate(prompts, params))


def test_final_only_requests_report_once_and_the_same(llm):
    from moeserve.sampling_params import RequestOutputKind

    eng = llm.llm_engine
    base = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, n=2, seed=3)
    for kind in RequestOutputKind:
        eng.add_request(f"kind-{kind.name}", PROMPTS[1]["prompt_token_ids"], base.clone(output_kind=kind))
    seen: dict[str, list] = {f"kind-{k.name}": [] for k in RequestOutputKind}
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen[out.request_id].append(out)
    final, cumulative = seen["kind-FINAL_ONLY"], seen["kind-CUMULATIVE"]
    assert len(final) == 1 and final[0].finished and len(cumulative) == 7
    assert [c.token_ids for c in final[0].outputs] == [c.token_ids for c in cumulative[-1].outputs]


@pytest.mark.parametrize("budget", [48, 512, 8192, 131072])
def test_mixed_batch_graph_sizes_pad_by_at_most_a_quarter(budget):
    """The padded token counts of the mixed-batch CUDA graphs: ascending, each at most 25% above the one below
    (a step pads by that much at most), ending at the step budget or MAX_MIXED_GRAPH_TOKENS, whichever is less."""
    from types import SimpleNamespace

    from moeserve.engine.runner import ModelRunner

    sizes = ModelRunner._mixed_graph_sizes(SimpleNamespace(max_tokens=budget, MAX_MIXED_GRAPH_TOKENS=16384))
    assert sizes == sorted(set(sizes)) and sizes[-1] == min(budget, 16384)
    assert all(b <= max(1.25 * a, a + 256) for a, b in zip(sizes, sizes[1:]))
