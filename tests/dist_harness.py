"""Run a function on N CPU ranks (gloo) in forked processes and collect what each returns.

    results = run_ranks(2, fn, arg)   # fn(rank, arg) on ranks 0 and 1, torch.distributed initialised

A rank that raises fails the call with its traceback; a rank that hangs fails it after `timeout` seconds.
What a rank returns crosses as plain pickled bytes: a queue would share a tensor's storage by file descriptor,
which the parent can no longer fetch once the rank has exited (FileNotFoundError, seen in CI).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_except(*taken: int) -> int:
    """A free port other than those given (a port just released may be handed out again)."""
    while True:
        port = free_port()
        if port not in taken:
            return port


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            queue.put((rank, True, pickle.dumps(fn(rank, *args))))
        finally:
            from moeserve.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(world: int, fn, *args, timeout: float = 180.0) -> list:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
