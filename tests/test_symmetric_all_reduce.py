"""The symmetric-memory all-reduce against NCCL's, on two GPUs (skipped without them), eager and inside a CUDA
graph, and the choice of road (CPU and unsupported sizes go to the ordinary collective)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch

from dist_harness import free_port
from moeserve.distributed.symmetric_all_reduce import ONE_SHOT_BYTES, TWO_SHOT_BYTES, make_symmetric_all_reduce


def test_no_fast_path_on_cpu_or_across_nodes():
    assert make_symmetric_all_reduce(None, [0, 1], 2, torch.device("cpu")) is None
    # ranks 1 and 2 with 2 ranks per node sit on two nodes: NCCL (no device needed to decide that)
    assert make_symmetric_all_reduce(None, [1, 2], 2, torch.device("cuda", 0)) is None
    assert make_symmetric_all_reduce(None, [0, 1, 2], 4, torch.device("cuda", 0)) is None  # 3 ranks: no kernel size


def road(fast, x: torch.Tensor) -> str:
    """Which kernel an all-reduce of x takes."""
    if not fast.handles(x):
        return "nccl"
    return "one_shot" if x.numel() * x.element_size() <= fast.one_shot_bytes else "two_shot"


def _rank(rank: int, world: int, port: int, queue) -> None:
    try:
        import torch.distributed as dist

        from moeserve.distributed.parallel_state import (ParallelLayout, get_tp_group,
                                                         initialize_model_parallel)

        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=dev)
        initialize_model_parallel(ParallelLayout(tp=world, custom_all_reduce=2), world)
        tp = get_tp_group()
        assert tp.fast_all_reduce is not None, "the fast path did not come up"
        checked = []
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 3, 64, 128, 1024, 4096):
                g = torch.Generator(device="cpu").manual_seed(rows)
                xs = [torch.randn(rows, 2048, generator=g).to(dtype) for _ in range(world)]
                x = xs[rank].to(dev)
                want = sum(t.float() for t in xs).to(dtype)
                got = tp.all_reduce(x.clone())  # one-shot when small, two-shot when larger, NCCL past both
                torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
                checked.append((str(dtype), rows, road(tp.fast_all_reduce, x)))
        # inside a CUDA graph: capture 8 chained all-reduces, then replay with new inputs (one-shot, then two-shot)
        for rows in (4, 512):
            x = torch.zeros(rows, 2048, dtype=torch.bfloat16, device=dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                y = x
                for _ in range(3):  # warm up outside the graph
                    y = tp.all_reduce(x) * 0.5
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = x
                for _ in range(8):
                    y = tp.all_reduce(y) * (1.0 / world)
            # replay 1: every rank holds 1.0; replay 2: rank r holds r + 1 (the mean of 1..world comes out)
            for replay, (value, mean) in enumerate([(1.0, 1.0), (float(rank + 1), (world + 1) / 2)]):
                x.fill_(value)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.allclose(y.float().cpu(), torch.full((rows, 2048), mean)), (rows, replay, value, y[0, :4])
            checked.append(("graph", rows, road(tp.fast_all_reduce, x)))
        queue.put((rank, True, checked))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # the result reaches the parent before this process ends without NCCL's teardown
        os._exit(0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_symmetric_all_reduce_matches_nccl_on_two_gpus():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, ok, value = queue.get(timeout=180)
        assert ok, f"rank {rank}:\n{value}"
        results[rank] = value
    for p in procs:
        p.join(timeout=30)
    roads = {c[2] for c in results[0]}
    assert roads == {"one_shot", "two_shot", "nccl"}, results[0]  # every road taken, each equal to the exact sum
    assert {c[2] for c in results[0] if c[0] == "graph"} == {"one_shot", "two_shot"}, results[0]
    assert 4096 * 2048 * 2 > TWO_SHOT_BYTES > 1024 * 2048 * 2 > ONE_SHOT_BYTES[2]
