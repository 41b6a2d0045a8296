"""Several ranks for real: `LLM(tensor_parallel_size=2)` spawning its worker process, `moeserve serve` over two
"nodes" on localhost, under torchrun, and a rank that dies. Greedy tokens must equal the one-process engine's.
CPU (gloo), tiny checkpoints; each case starts real processes, so there are few of them."""

from __future__ import annotations


import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from dist_harness import free_port, free_port_except
from grammar_cases import grammared
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.server.process import ServerProcess

PROMPTS = [list(range(5, 5 + n)) for n in (3, 11, 29, 40)]


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def tokens(llm: LLM, prompts=PROMPTS, n: int = 12) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n))]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3moe"), "Qwen3MoeForCausalLM")


def test_tp2_offline_with_preemption_chunking_and_prefix_cache_matches_one_process(llama):
    """Small pool and step budget: requests are chunked, preempted and resumed, and share a cached prefix."""
    shared = list(range(40, 72))
    prompts = PROMPTS + [shared + [7, 8, 9], shared + [10, 11]]
    kw = dict(model=llama, device="cpu", num_gpu_blocks_override=12, block_size=8, max_num_batched_tokens=24)
    one = LLM(**kw)
    ref = tokens(one, prompts, 20)
    assert one.llm_engine.scheduler.num_preemptions_total > 0  # the case is exercised
    two = LLM(**kw, tensor_parallel_size=2, master_port=free_port())
    try:
        assert tokens(two, prompts, 20) == ref
        assert two.llm_engine.scheduler.num_preemptions_total > 0
        assert two.llm_engine.kv.prefix_hits > 0
    finally:
        two.llm_engine.shutdown()


@pytest.mark.parametrize("tp,async_scheduling", [(1, False), (1, True), (2, True)])
def test_dp2_attention_with_expert_parallel_matches_one_process(qwen3_moe, tp, async_scheduling):
    """DP=2 (x TP) + EP: each DP rank schedules its own requests into its own KV pool, its leader samples them,
    and a DP rank with nothing to do runs dummy steps so the experts' collectives complete (the solo request).
    Async scheduling: every rank's next step reads its pending tokens from its own device (DP rank 1's leader
    broadcasts its draws to its TP group); grammars make the engine wait for each step (the switch to and fro)."""
    prompts = PROMPTS + [[9] * 17]
    small = dict(num_gpu_blocks_override=10, block_size=8, max_num_batched_tokens=24)  # chunked, preempted
    one = LLM(model=qwen3_moe, device="cpu", **small)
    ref, ref_grammared = tokens(one, prompts, 20), grammared(one, prompts) if tp == 1 else None
    llm = LLM(model=qwen3_moe, device="cpu", data_parallel_size=2, tensor_parallel_size=tp,
              enable_expert_parallel=True, master_port=free_port(), async_scheduling=async_scheduling, **small)
    try:
        assert llm.llm_engine.async_scheduling == async_scheduling
        assert tokens(llm, prompts, 20) == ref
        assert llm.llm_engine.get_stats().num_preemptions_total > 0
        if ref_grammared is not None:  # half of these sampled by DP rank 1's leader
            assert grammared(llm, prompts) == ref_grammared
        assert tokens(llm, prompts[1:2], 20) == ref[1:2]  # one request: the other DP rank idles in dummy steps
        engine = llm.llm_engine
        assert all(kv.prefix_queries > 0 for kv in engine.kvs)  # requests were spread over both DP ranks
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
        # aborted while its draws are in flight (kept by its leader, under async scheduling): the others go on alike
        for i, p in enumerate(prompts[:4]):
            engine.add_request(f"ab{i}", p, greedy(20))
        for _ in range(6):
            engine.step()
        engine.abort_request(["ab1", "ab2"])
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert done["ab0"] == ref[0] and done["ab3"] == ref[3] and "ab1" not in done
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
    finally:
        llm.llm_engine.shutdown()


def texts(llm: LLM, prompts=PROMPTS, n: int = 12) -> list[str]:
    return [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n))]


def served_texts(base_url: str, prompts=PROMPTS, n: int = 12) -> list[str]:
    out = []
    for p in prompts:
        r = httpx.post(base_url + "/completions", timeout=120, json={
            "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


def test_two_nodes_on_localhost_with_expert_parallel(qwen3_moe, tmp_path):
    """`--nnodes 2`: node 1 runs rank 1 only (no server), node 0 serves; TP=2 with experts split over both."""
    ref = texts(LLM(model=qwen3_moe, device="cpu"))
    node0 = ServerProcess([])  # its HTTP port is chosen now; the rendezvous port must differ from it
    common = [qwen3_moe, "--device", "cpu", "-tp", "2", "--enable-expert-parallel", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port_except(node0.port))]
    node0.serve_args = [*common, "--node-rank", "0"]
    log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", *common, "--node-rank", "1"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        with node0 as server:
            assert served_texts(server.base_url) == ref
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]  # rank 0 said stop
    finally:
        if node1.poll() is None:
            node1.kill()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "resource_tracker" not in line]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_serves_tp2_and_a_dead_rank_fails_loudly(llama, tmp_path):
    """Every rank started by torchrun: rank 0 serves, rank 1 works. Then kill rank 1: the server must stop
    answering 200 on /health and exit non-zero, never hang."""
    ref = texts(LLM(model=llama, device="cpu"))
    http_port = free_port()
    port = free_port_except(http_port)
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(["torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                             str(port), "-m", "moeserve.cli", "serve", llama, "--device", "cpu", "-tp", "2",
                             "--port", str(http_port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

        assert served_texts(base + "/v1") == ref
        ranks = _children(proc.pid)  # torchrun's children are the ranks
        rank1 = [p for p in ranks if "RANK=1" in open(f"/proc/{p}/environ").read().split("\0")]
        assert len(ranks) == 2 and len(rank1) == 1
        rank1 = rank1[0]
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(timeout=90)  # torchrun sees a rank fail and ends the group
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_a_spawned_rank_that_dies_fails_the_server_loudly(llama):
    """`moeserve serve -tp 2` spawns rank 1 itself; killing it must make /health fail and the process exit 1."""
    srv = ServerProcess([])
    srv.serve_args = [llama, "--device", "cpu", "-tp", "2", "--master-port", str(free_port_except(srv.port))]
    with srv as server:
        assert served_texts(server.base_url, PROMPTS[:1], 4)
        workers = _children(server.proc.pid)
        assert workers, "no rank process found"
        for p in workers:
            os.kill(p, signal.SIGKILL)
        code = server.proc.wait(timeout=60)
        assert code != 0
