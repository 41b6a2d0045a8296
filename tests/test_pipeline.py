"""Pipeline parallelism: the layer split, one stage's model and weights, and whole engines at PP=2 and TP=2 x PP=2
(real processes, gloo) whose greedy tokens must equal the one-process engine's, through chunked prefill,
preemption and the prefix cache, with two micro-batches of different requests in flight at once."""

from __future__ import annotations


import pytest
import torch
from dist_harness import free_port
from grammar_cases import grammared
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.distributed import parallel_state as ps
from moeserve.distributed.pipeline import MissingLayer, stage_layer_range

PROMPTS = [list(range(5, 5 + n)) for n in (3, 11, 29, 40)]
SHARED = list(range(40, 72))
# a small pool and step budget: prompts are chunked, requests preempted and resumed, a prefix is shared
SMALL = dict(device="cpu", num_gpu_blocks_override=12, block_size=8, max_num_batched_tokens=24)


def tokens(llm: LLM, prompts, n: int = 16) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.mark.parametrize("layers, stages, want", [
    (2, 2, [(0, 1), (1, 2)]),
    (3, 2, [(0, 2), (2, 3)]),  # the remainder goes before the last stage (which also holds the LM head)
    (7, 4, [(0, 2), (2, 4), (4, 6), (6, 7)]),
    (4, 1, [(0, 4)]),
])
def test_layers_split_in_contiguous_ranges(layers, stages, want):
    assert [stage_layer_range(layers, s, stages) for s in range(stages)] == want


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        stage_layer_range(2, 0, 3)


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama_tied"), "LlamaForCausalLM", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3moe"), "Qwen3MoeForCausalLM")


@pytest.fixture
def as_stage():
    """Pretend to be stage `rank` of a 2-stage pipeline (a PP group without torch.distributed: only its rank and
    size are read while building)."""
    def enter(rank: int):
        ps._groups["pp"] = ps.GroupCoordinator([0, 1], None, rank)
    yield enter
    ps.destroy_model_parallel()


def _build(path: str):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    return load_model(EngineConfig(model=path, device="cpu"), torch.device("cpu"), torch.float32).model


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_builds_and_loads_only_its_part(qwen3_moe, as_stage, rank):
    """3 layers over 2 stages: stage 0 holds the embedding and layers 0-1, stage 1 layer 2, the norm and the LM
    head; the loader skips the other stage's tensors and still fills every local parameter."""
    as_stage(rank)
    model = _build(qwen3_moe)
    held = [i for i, layer in enumerate(model.model.layers) if not isinstance(layer, MissingLayer)]
    assert held == ([0, 1] if rank == 0 else [2])
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("model.embed_tokens.") for n in names) == (rank == 0)
    assert any(n.startswith("lm_head.") for n in names) == (rank == 1)
    assert any(n.startswith("model.norm.") for n in names) == (rank == 1)
    assert all(not n.startswith(f"model.layers.{i}.") for n in names for i in range(3) if i not in held)
    assert model.num_kv_layers() == len(held) and model.kv_layer_start == held[0]


def test_the_last_stage_keeps_a_tied_embedding_for_its_lm_head(llama_tied, as_stage):
    as_stage(1)
    model = _build(llama_tied)
    assert isinstance(model.model.layers[0], MissingLayer)
    assert model.lm_head.table() is model.model.embed_tokens.weight
    from safetensors.torch import load_file
    import glob

    (shard,) = glob.glob(f"{llama_tied}/*.safetensors")
    torch.testing.assert_close(model.lm_head.table(), load_file(shard)["model.embed_tokens.weight"])


def _matches_one_process(path: str, tp: int, with_grammars: bool = False) -> None:
    prompts = PROMPTS + [SHARED + [7, 8, 9], SHARED + [10, 11]]
    one = LLM(model=path, **SMALL)
    ref = tokens(one, prompts)
    ref_grammared = grammared(one, prompts) if with_grammars else None
    assert one.llm_engine.scheduler.num_preemptions_total > 0  # the case is exercised
    llm = LLM(model=path, **SMALL, tensor_parallel_size=tp, pipeline_parallel_size=2, master_port=free_port())
    try:
        in_flight = _watch_micro_batches(llm.llm_engine)
        assert tokens(llm, prompts) == ref
        assert max(in_flight) == 2  # two micro-batches were in the pipeline at once
        if with_grammars:  # the last stage's leader masks and samples them
            assert grammared(llm, prompts) == ref_grammared
        engine = llm.llm_engine
        assert engine.scheduler.num_preemptions_total > 0 and engine.kv.prefix_hits > 0
        assert tokens(llm, prompts[1:2], 5) == [ref[1][:5]]  # the last stage's mirror forgot the finished ones
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    finally:
        llm.llm_engine.shutdown()


def _watch_micro_batches(engine) -> list[int]:
    """How many micro-batches were in flight at each collection; every launched step must hold only requests no
    micro-batch in flight holds (their next input tokens are not back yet)."""
    seen: list[int] = []
    collect, execute = engine._collect_micro_batch, engine.executor.execute

    def watched_collect(touched):
        seen.append(len(engine.pp_inflight))
        return collect(touched)

    def watched_execute(step, prev):
        assert not set(step.req_ids) & engine.pp_busy, "a request in two micro-batches at once"
        return execute(step, prev)

    engine._collect_micro_batch, engine.executor.execute = watched_collect, watched_execute
    return seen


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_llama_tied_pipeline_matches_one_process(llama_tied, tp):
    _matches_one_process(llama_tied, tp, with_grammars=tp == 1)


def test_deepseek_v2_mla_pipeline_matches_one_process(tmp_path):
    """MLA: the latent cache of only this stage's layers, indexed by the global layer."""
    _matches_one_process(make_tiny_checkpoint(tmp_path, "DeepseekV2ForCausalLM"), 1)


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_qwen3_moe_pipeline_with_an_uneven_split_matches_one_process(qwen3_moe, tp):
    _matches_one_process(qwen3_moe, tp)


def test_aborting_a_request_in_flight_leaves_the_others_intact(llama_tied):
    """PP=2: a request aborted while its micro-batch is still in the pipeline ends alone (its tokens, when they
    come back, are dropped); the others finish with the one-process tokens and every block goes back."""
    prompts = PROMPTS
    ref = tokens(LLM(model=llama_tied, **SMALL), prompts)
    llm = LLM(model=llama_tied, **SMALL, pipeline_parallel_size=2, master_port=free_port())
    engine = llm.llm_engine
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        outs, aborted = {}, None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
            if aborted is None and engine.pp_inflight:
                held = next(iter(engine.pp_busy))  # a request whose micro-batch is in flight
                aborted = engine.requests[held].parent_id
                engine.abort_request(aborted)
        assert aborted is not None
        for i in range(len(prompts)):
            rid = f"r{i}"
            if rid == aborted:
                assert rid not in outs or outs[rid].outputs[0].finish_reason == "abort"
            else:
                assert outs[rid].outputs[0].token_ids == ref[i]
        assert not engine.pp_inflight and not engine.pp_busy
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2xpp2", "dp2xpp2xtp2"])
def test_dp2_x_pp2_with_expert_parallel_matches_one_process(qwen3_moe, tp):
    """DP=2 x PP=2 (x TP=2) + EP (4 or 8 processes): each DP rank is a pipeline of its own, with its own scheduler and KV pool;
    a micro-batch is one step of every DP rank (a rank with nothing runs a dummy step through its stages, so a
    stage's expert collectives across the DP ranks complete); each DP rank's last-stage leader samples. Greedy
    tokens equal one process through chunked prefill, preemption and the prefix cache, with two micro-batches in
    flight, then with one request alone (the other DP rank idles in dummy steps)."""
    prompts = PROMPTS + [SHARED + [7, 8, 9], SHARED + [10, 11]]
    ref = tokens(LLM(model=qwen3_moe, **SMALL), prompts)
    llm = LLM(model=qwen3_moe, **SMALL, data_parallel_size=2, pipeline_parallel_size=2, tensor_parallel_size=tp,
              enable_expert_parallel=True, master_port=free_port())
    engine = llm.llm_engine
    try:
        in_flight = []
        collect = engine._collect_micro_batch

        def watched(touched):
            in_flight.append(len(engine.pp_inflight))
            return collect(touched)

        engine._collect_micro_batch = watched
        assert tokens(llm, prompts) == ref
        assert max(in_flight) == 2
        assert all(kv.prefix_queries > 0 for kv in engine.kvs)  # requests were spread over both DP ranks
        assert engine.get_stats().num_preemptions_total > 0 and sum(kv.prefix_hits for kv in engine.kvs) > 0
        assert tokens(llm, prompts[1:2], 5) == [ref[1][:5]]
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    finally:
        engine.shutdown()
