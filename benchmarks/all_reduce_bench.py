"""All-reduce latency on the GPUs of one host: NCCL against the symmetric-memory one-shot and two-shot kernels
(moeserve/distributed/symmetric_all_reduce.py), per message size, each timed as a CUDA graph of 96 chained
all-reduces (a decode step of a 48-layer model holds 96) replayed 20 times, median per all-reduce. Each kernel's
sum is first checked against NCCL's at every size it is timed at.

    python benchmarks/all_reduce_bench.py --world 2 --hidden 2048 --out results.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import traceback

import torch

CHAIN = 96


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_graph(fn, x: torch.Tensor) -> float:
    """Seconds per all-reduce: the median of 20 replays of a graph of CHAIN chained calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(CHAIN):
            y = fn(y)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.distributed.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CHAIN)
    return statistics.median(times)


def _rank(rank: int, world: int, port: int, hidden: int, rows: list[int], queue) -> None:
    try:
        import torch.distributed as dist

        from moeserve.distributed.parallel_state import ParallelLayout, get_tp_group, initialize_model_parallel

        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=dev)
        initialize_model_parallel(ParallelLayout(tp=world, custom_all_reduce=2), world)
        tp = get_tp_group()
        fast = tp.fast_all_reduce

        def nccl(y):
            dist.all_reduce(y, group=tp.group)
            return y

        out = []
        for r in rows:
            x = torch.randn(r, hidden, dtype=torch.bfloat16, device=dev) * 1e-3
            row = {"rows": r, "bytes": x.numel() * 2, "nccl_us": _time_graph(nccl, x.clone()) * 1e6}
            if fast is not None and fast.handles(x):
                want = nccl(x.clone())
                for name in ("one_shot", "two_shot"):
                    kernel = getattr(fast, name)
                    torch.testing.assert_close(kernel(x), want, rtol=1e-2, atol=1e-4)
                    row[f"{name}_us"] = _time_graph(kernel, x.clone()) * 1e6
                row["chosen"] = "one_shot" if row["bytes"] <= fast.one_shot_bytes else "two_shot"
            out.append(row)
        queue.put((rank, True, {"fast_path": fast is not None, "rows": out}))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # the result reaches the parent before this process ends without NCCL's teardown
        os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512,1024")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.hidden, rows, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, ok, value = queue.get(timeout=300)
        if not ok:
            raise SystemExit(f"rank {rank} failed:\n{value}")
        results[rank] = value
    report = {"gpu": torch.cuda.get_device_name(0), "world": args.world, "hidden": args.hidden, "chain": CHAIN,
              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())), **results[0]}
    print(f"{'rows':>6} {'bytes':>9} {'nccl us':>9} {'1-shot us':>9} {'2-shot us':>9} {'chosen':>9} {'vs nccl':>7}")
    for r in report["rows"]:
        one, two = r.get("one_shot_us"), r.get("two_shot_us")
        cells = ["-" if v is None else f"{v:.2f}" for v in (one, two)]
        chosen = r.get("chosen", "nccl")
        ratio = f"{r[chosen + '_us'] / r['nccl_us']:.2f}" if chosen != "nccl" else ""
        print(f"{r['rows']:>6} {r['bytes']:>9} {r['nccl_us']:>9.2f} {cells[0]:>9} {cells[1]:>9} {chosen:>9} {ratio:>7}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
