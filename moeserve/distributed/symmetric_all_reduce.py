"""One-shot all-reduce over NVLink through PyTorch's symmetric memory, for the small messages of decode.

At batch 1 a TP=2 step of qwen3-30b-a3b holds 96 all-reduces of 4 KB each, and NCCL's ring spends ~10-20 us on
each: more than the halved weight reads save. Here every rank of a group owns one buffer that all the others
can read over NVLink (`torch.distributed._symmetric_memory`); an all-reduce is one kernel
(`symm_mem::one_shot_all_reduce_copy_out`): each rank copies its input into its buffer, the ranks meet at a
barrier on the buffer's signal pads, and each sums every rank's copy itself; a second barrier kernel keeps the
buffer from being overwritten while a peer still reads it. It needs peer access between the
GPUs, not NVLink multicast (which stays off on our machines; KINDS.md). Messages above `max_bytes`, other
dtypes, and groups that span nodes go to NCCL. The choice depends on the tensor's size only, so every rank of
the group takes the same road, and a CUDA graph captures the kernel like any other.

Measured on 2xH200 (benchmarks/results/layouts/allreduce/): 9.3 us against NCCL's 15.7 us for 4 KB in a graph
of 96 chained calls (6.7 us without the closing barrier, which is needed for correctness), yet qwen3-30b-a3b
TP=2 decode was no faster (batch 1: 3.58 ms against 3.42 ms; batch 8-128 equal within 1%): batch-1 decode is
bound by its chain of ~700 dependent kernels, not by the all-reduces. So it is opt-in
(`--enable-custom-all-reduce`) until a fused decode path makes the collectives the larger share.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("moeserve")

# Beyond these sizes (bytes) a ring's bandwidth wins over reading every peer's whole buffer (per group size).
MAX_BYTES = {2: 1 << 20, 4: 512 << 10, 6: 256 << 10, 8: 256 << 10}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmetricAllReduce:
    def __init__(self, group, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9):
            symm_mem.enable_symm_mem_for_group(self.group_name)  # needed before torch 2.9, deprecated after
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        # The kernel meets its peers only before reading: without a second meeting a fast rank's next call would
        # copy into its buffer while a slow peer still reads the last one (seen on 2xH200 as a wrong sum across
        # CUDA-graph replays). The closing barrier uses the last signal-pad channel, which the kernel's own
        # per-block slots never reach.
        self.end_channel = symm_mem.get_signal_pad_size() // 4 // group.size() - 1

    def handles(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype in DTYPES and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0 and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group's ranks, in a new tensor (x is left as it was)."""
        flat = x.view(-1)
        staging = self.buffer[:flat.numel() * flat.element_size()].view(x.dtype)
        out = torch.empty_like(flat)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, flat, "sum", self.group_name, out)
        self.handle.barrier(channel=self.end_channel)
        return out.view(x.shape)


def make_symmetric_all_reduce(group, ranks: list[int], ranks_per_node: int,
                              device: torch.device) -> SymmetricAllReduce | None:
    """The fast path for one group, or None where it cannot serve (CPU, one node's ranks not all peers, a
    group spanning nodes). Every rank of the group decides alike: the same facts, then one NCCL vote."""
    size = len(ranks)
    if device.type != "cuda" or size not in MAX_BYTES or len({r // ranks_per_node for r in ranks}) != 1:
        return None
    local = [r % ranks_per_node for r in ranks]
    ok = all(torch.cuda.can_device_access_peer(a, b) for a in local for b in local if a != b)
    fast = None
    if ok:
        try:
            fast = SymmetricAllReduce(group, device, MAX_BYTES[size])
        except Exception as e:  # an old driver, no peer mappings: NCCL serves
            logger.warning("moeserve: symmetric-memory all-reduce unavailable (%s: %s); NCCL serves all sizes",
                           type(e).__name__, e)
    if not _all_agree(fast is not None, group, device):
        return None
    probe = fast(torch.ones(8, dtype=torch.bfloat16, device=device))  # every rank has a buffer: no one waits alone
    if not _all_agree(bool((probe == size).all().item()), group, device):
        return None
    logger.info("moeserve: all-reduces of ranks %s up to %d KiB through symmetric memory", ranks, fast.max_bytes >> 10)
    return fast


def _all_agree(ok: bool, group, device: torch.device) -> bool:
    vote = torch.tensor([int(ok)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=group)
    return vote.item() == 1
