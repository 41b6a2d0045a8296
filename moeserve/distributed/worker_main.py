"""The loop of a rank other than 0: take each step message from rank 0, run the forward pass with this rank's
shard, and receive the step's sampled tokens (the next step's pending inputs) from TP rank 0."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("moeserve")


def agree_num_blocks(local_blocks: int) -> int:
    """Every rank must allocate the same number of KV blocks: the least any rank can hold."""
    t = torch.tensor([local_blocks], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_control)
    return int(t.item())


_control = None


def set_control_group(group) -> None:
    global _control
    _control = group


def broadcast_step(step) -> object:
    """Rank 0 sends `step` (plain data, or None to stop); every other rank passes None and gets it back."""
    box = [step]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def worker_main(config, info, device_type: str) -> None:
    from moeserve.distributed.launch import init_rank, rank_device
    from moeserve.distributed.parallel_state import get_tp_group, layout
    from moeserve.engine.worker import Worker
    from moeserve.loader.model_loader import resolve_dtype, resolve_source

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(info.ranks_per_node, 1)))
    device = rank_device(device_type, info.local_rank)
    set_control_group(init_rank(info, config.parallel_layout(), device))
    torch.manual_seed(config.seed)
    worker = Worker(config, device, resolve_dtype(config.dtype_name, device), resolve_source(config))
    worker.initialize_cache(agree_num_blocks(worker.available_kv_blocks()))
    tp = get_tp_group()
    prev = None
    try:
        while True:
            step = broadcast_step(None)
            if step is None:
                break
            worker.execute(step, prev)
            S = len(step.sample_rows)
            if S and layout().world_size > 1:
                prev = tp.broadcast(torch.empty(S, dtype=torch.int64, device=device), src=0)
    finally:
        dist.destroy_process_group()
