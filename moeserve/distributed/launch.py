"""Start the ranks of one engine: torch.distributed's TCP rendezvous, one process per GPU, one node or several.

Rank 0 is the engine's own process (scheduler + rank 0's worker). The other ranks of rank 0's node are spawned
here; on every other node `moeserve serve ... --node-rank K` spawns that node's ranks and serves nothing. Under
`torchrun` every rank is already a process: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from
its environment and nothing is spawned.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel

logger = logging.getLogger("moeserve")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes


def from_torchrun_env() -> RankInfo | None:
    """The rank torchrun (or any launcher setting its variables) gave this process, if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return RankInfo(rank=int(os.environ["RANK"]), world_size=world, local_rank=local,
                    nnodes=max(world // local_world, 1), node_rank=int(os.environ.get("GROUP_RANK", 0)),
                    master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=int(os.environ.get("MASTER_PORT", 29500)))


def node_ranks(info: RankInfo) -> list[int]:
    """The global ranks of info's node, in order."""
    n = info.ranks_per_node
    return list(range(info.node_rank * n, (info.node_rank + 1) * n))


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def nccl_graph_mixing_off(layout: ParallelLayout) -> bool:
    """Whether this layout runs NCCL without its support for mixing graph-captured and eager collectives
    (NCCL_GRAPH_MIXING_SUPPORT=0): DP attention with expert parallelism and one rank per DP replica.

    With mixing support (NCCL's default) every captured collective carries cross-stream ordering through side
    streams and events. A DP x EP decode graph holds 192 of them at 48 layers (all-gathers and reduce-scatters of
    the experts' tokens), and on 2xH200 each cudaGraphLaunch then blocked the host for about the step's own length
    (21 ms of a 24 ms step, qwen3-30b-a3b at 256 rows): the steps ran one after the other instead of overlapping the
    host's next step. Without it NCCL is correct only if a rank never issues an eager collective while one of its
    graph launches is outstanding: the runner waits for its last replay before an eager forward
    (ModelRunner.wait_graph_before_eager), and at TP = 1 the forward passes are the only NCCL calls of a DP rank
    (at TP > 1 the sampled tokens are broadcast eagerly after every step, so those layouts keep NCCL's default)."""
    return layout.dp > 1 and layout.enable_expert_parallel and layout.tp == 1 and layout.pp == 1


def init_rank(info: RankInfo, layout: ParallelLayout, device: torch.device):
    """Join the rendezvous and make the process groups. Returns the gloo control group (it sets up the step
    channel, distributed/step_channel.py, and carries step messages across nodes; the data path uses NCCL on CUDA,
    gloo on CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if nccl_graph_mixing_off(layout):  # before the first communicator: NCCL reads it once (a user's value stays)
            os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size, **kwargs)
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    initialize_model_parallel(layout, info.ranks_per_node)
    return control


def spawn_workers(config, info: RankInfo, device_type: str) -> list[mp.Process]:
    """Start this node's ranks other than the engine's own (all of them on a node other than 0)."""
    from moeserve.distributed.worker_main import worker_main

    ctx = mp.get_context("spawn")
    procs = []
    for rank in node_ranks(info):
        if rank == 0:
            continue
        me = replace(info, rank=rank, local_rank=rank - info.node_rank * info.ranks_per_node)
        p = ctx.Process(target=worker_main, args=(config, me, device_type), name=f"moeserve-rank{rank}",
                        daemon=True)
        p.start()
        procs.append(p)
    return procs


def run_if_not_rank_zero(config) -> int | None:
    """`moeserve serve` on a process that is not rank 0 (torchrun's other ranks, or a node other than 0) runs
    worker ranks instead of the server and returns their exit code; on rank 0's process returns None."""
    from moeserve.distributed.worker_main import worker_main
    from moeserve.loader.model_loader import resolve_device

    if config.world_size == 1:
        return None
    device_type = resolve_device(config.device).type
    info = from_torchrun_env()
    if info is not None:
        if info.rank == 0:
            return None
        worker_main(config, info, device_type)
        return 0
    if config.node_rank == 0:
        return None
    info = RankInfo(rank=-1, world_size=config.world_size, local_rank=-1, nnodes=config.nnodes,
                    node_rank=config.node_rank, master_addr=config.master_addr, master_port=config.master_port)
    procs = spawn_workers(config, info, device_type)
    logger.warning("moeserve: node %d of %d runs ranks %s for the server on %s:%d", config.node_rank, config.nnodes,
                   node_ranks(info), config.master_addr, config.master_port)
    code = 0
    for p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    return code
