"""The CPU multi-rank harness itself (tests/dist_harness.py): a rank's result must still be readable after the rank's
process has exited. A CI run once failed here: a tensor put on the queue crossed as a shared-storage file
descriptor that only the (by then exited) rank could hand over."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import torch

from dist_harness import _entry, free_port


def _a_tensor(rank: int) -> torch.Tensor:
    return torch.arange(6.0).reshape(2, 3) + rank


def test_a_ranks_result_is_readable_after_the_rank_exited():
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_entry, args=(0, 1, free_port(), _a_tensor, (), queue), daemon=True)
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    rank, ok, value = queue.get(timeout=10)
    assert ok, value
    assert torch.equal(pickle.loads(value), torch.arange(6.0).reshape(2, 3))
