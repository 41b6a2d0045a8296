"""The loop of a rank other than 0: take each step message from rank 0 (distributed/step_channel.py), run the
forward pass with this rank's shard, and receive the step's sampled tokens (the next step's pending inputs) from TP
rank 0. A leader that samples on its own (a DP rank's, or the last pipeline stage's) sends its tokens to rank 0
instead."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger("moeserve")


def agree_num_blocks(local_blocks: int, control) -> int:
    """Every rank must allocate the same number of KV blocks: the least any rank can hold."""
    t = torch.tensor([local_blocks], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control)
    return int(t.item())


def spin_seconds(device: torch.device) -> float:
    """How long a rank waiting for a step message polls without sleeping (distributed/step_channel.py): on a GPU
    about a step, so that the next one starts at once; on the CPU not at all (the cores compute)."""
    return 0.05 if device.type == "cuda" else 0.0


def worker_main(config, info, device_type: str) -> None:
    from moeserve.distributed.launch import init_rank, rank_device
    from moeserve.distributed.parallel_state import get_dp_group, get_pp_group, get_tp_group
    from moeserve.distributed.step_channel import open_channel
    from moeserve.engine.worker import LeaderSampler, Worker
    from moeserve.loader.model_loader import resolve_dtype, resolve_source

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(info.ranks_per_node, 1)))
    device = rank_device(device_type, info.local_rank)
    control = init_rank(info, config.parallel_layout(), device)
    torch.manual_seed(config.seed)
    worker = Worker(config, device, resolve_dtype(config.dtype_name, device), resolve_source(config))
    worker.initialize_cache(agree_num_blocks(worker.available_kv_blocks(), control))
    tp, dp, pp = get_tp_group(), get_dp_group(), get_pp_group()
    leader = None  # samples here, from a mirror of the requests: DP ranks' leaders, the last PP stage's leader
    if (dp.size > 1 or pp.size > 1) and tp.rank == 0 and pp.is_last:
        loaded = worker.loaded
        leader = LeaderSampler(loaded.hf_config.vocab_size, device, config.seed, loaded.eos_token_ids,
                               loaded.tokenizer)
    channel = open_channel(control, info.rank, info.nnodes == 1, leader is not None, spin_seconds(device))
    prev = None
    kept = None  # a DP leader under async scheduling: its last step's draws, sent once the next message came
    code = 1
    try:
        while True:
            step = channel.receive()
            if step is None:
                break
            if pp.size > 1:
                # PP (this stage's layers, one micro-batch after another; with DP, every DP rank's step in one
                # message): no async scheduling; the last stage's leader samples and sends the tokens to rank 0
                if isinstance(step, list):
                    step = step[dp.rank]
                logits = worker.execute(step, None)
                if leader is not None:
                    leader.apply(step)
                    if step.sample_rows:
                        channel.reply(leader.sample(step, logits))
                continue
            if isinstance(step, list):  # DP: every DP rank's step in one message, [] = send what you kept
                prev, kept = _data_parallel_step(worker, leader, tp, channel, step[dp.rank] if step else None,
                                                 prev, kept)
                continue
            worker.execute(step, prev)
            S = len(step.sample_rows)
            if S and tp.size > 1:
                prev = tp.broadcast(torch.empty(S, dtype=torch.int64, device=device), src=0)
        channel.flush()
        channel.close()
        code = 0
    except BaseException:
        logger.exception("moeserve rank %d failed", info.rank)
        raise
    finally:
        if device.type == "cuda":  # see release_process_groups: on NCCL the process just ends
            logging.shutdown()
            os._exit(code)
        release_process_groups()


def _data_parallel_step(worker, leader, tp, channel, step, prev, kept):
    """One DP step on this rank (step None: a flush). The DP rank's leader (its TP rank 0) samples its rows. Waiting
    steps: it sends the tokens to rank 0 at once. Async steps: they stay on the device as the next step's pending
    inputs (broadcast to the rank's TP group), and go to rank 0 after the next message, so that this rank's host
    never waits for its GPU before the next step is queued. Returns (prev, kept)."""
    S = 0
    if step is not None:
        logits = worker.execute(step, prev)
        S = len(step.sample_rows)
    drawn = None
    if leader is not None and step is not None:
        leader.apply(step)
        if S and not step.sample_async:
            channel.reply(leader.sample(step, logits))
        elif S:
            drawn = leader.draw(step, logits)
            prev = drawn.tokens
    if step is not None and step.sample_async and S and tp.size > 1:
        prev = tp.broadcast(prev if drawn is not None else torch.empty(S, dtype=torch.int64, device=worker.device),
                            src=0)
    if kept is not None:  # the step before's draws: rank 0 collects them after it sent this message
        channel.reply(leader.settle(kept))
    return prev, drawn


def release_process_groups() -> None:
    """Leave torch.distributed, so that another engine can start in this process (the CPU tests do). Not through
    NCCL's teardown: it waits on peers that may already be gone (a worker hung in destroy_process_group at shutdown
    on 2xH200, seen with faulthandler), so a CUDA worker process just ends (os._exit), and rank 0, whose workers
    have been joined or killed by then, aborts its communicators, which waits on nobody. Left to the interpreter's
    exit instead, they ended every multi-GPU engine's process with "terminate called without an active exception"
    (SIGABRT after a clean shutdown, 2xH200, sessions 22-23)."""
    from moeserve.distributed.parallel_state import destroy_model_parallel

    destroy_model_parallel()
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception as exc:  # an experimental torch API: keep the shutdown going whatever it does
            logger.warning("aborting the NCCL process groups failed (%s); left to the process exit", exc)
        return
    dist.destroy_process_group()
