"""One-shot and two-shot all-reduce over NVLink through PyTorch's symmetric memory, for the messages of decode.

At batch 1 a TP=2 step of qwen3-30b-a3b holds 96 all-reduces of 4 KB each, and NCCL's ring spends ~10-20 us on
each: more than the halved weight reads save. Here every rank of a group owns one buffer that all the others
can read over NVLink (`torch.distributed._symmetric_memory`); a small all-reduce is one kernel
(`symm_mem::one_shot_all_reduce_copy_out`): each rank copies its input into its buffer, the ranks meet at a
barrier on the buffer's signal pads, and each sums every rank's copy itself; a second barrier kernel keeps the
buffer from being overwritten while a peer still reads it. It needs peer access between the
GPUs, not NVLink multicast (which stays off on our machines; KINDS.md). Messages above `max_bytes`, other
dtypes, and groups that span nodes go to NCCL. The choice depends on the tensor's size only, so every rank of
the group takes the same road, and a CUDA graph captures the kernel like any other.

Measured (graphs of 96 chained calls): on 2xH200 9.3 us against NCCL's 15.7 us for 4 KB; on 4xH200 at hidden 4096,
one-shot 10.4 / two-shot 8.9 us against NCCL's 20.7 us at 8 KB and two-shot 16.1 against 29.7 us at 1 MiB
(results/layouts/2026-11-27-session13-h200x4). Inside a decode step the gap is smaller (NCCL 10.1 us a call at TP=4
batch 1, 17.7 us at batch 128, two-shot 12.8 us there), and where decode gained end to end decides the default
(`DEFAULT_MIN_RANKS`): groups of 4+ ranks take this path, groups of 2 keep NCCL unless `--enable-custom-all-reduce`,
and `--disable-custom-all-reduce` (vLLM's flag) turns it off.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("moeserve")

# On by default in groups of this many ranks and more. Measured end to end: qwen3-235b TP=4 (12 layers, 4xH200)
# decode 3 % faster at batch 1, 1-2 % at 32-128, in two calls (results/layouts/2026-11-27-session13-h200x4);
# qwen3-30b-a3b TP=2 batch 1 5 % slower with the one-shot kernel (3.58 vs 3.42 ms, results/layouts/allreduce),
# so groups of 2 keep NCCL unless asked.
DEFAULT_MIN_RANKS = 4

# Messages up to ONE_SHOT_BYTES (per group size) take the one-shot kernel: each rank reads every peer's whole
# copy, one launch (plus the closing barrier). Larger ones up to TWO_SHOT_BYTES take the two-shot kernel: each
# rank sums 1/size of the message from every peer and writes that slice back into every peer's buffer (NVLink
# peer stores, no multicast), so each GPU reads the message once rather than size times; vLLM's custom
# all-reduce makes the same two choices. Past TWO_SHOT_BYTES NCCL's ring serves.
ONE_SHOT_BYTES = {2: 1 << 20, 4: 512 << 10, 6: 256 << 10, 8: 256 << 10}
TWO_SHOT_BYTES = 8 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmetricAllReduce:
    def __init__(self, group, device: torch.device, one_shot_bytes: int, max_bytes: int = TWO_SHOT_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.one_shot_bytes = min(one_shot_bytes, max_bytes)
        self.max_bytes = max_bytes
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9):
            symm_mem.enable_symm_mem_for_group(self.group_name)  # needed before torch 2.9, deprecated after
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        # The one-shot kernel meets its peers only before reading: without a second meeting a fast rank's next call
        # would copy into its buffer while a slow peer still reads the last one (seen on 2xH200 as a wrong sum
        # across CUDA-graph replays). The closing barrier uses the last signal-pad channel, which the kernel's own
        # per-block slots never reach. The two-shot kernel meets its peers again before it returns.
        self.end_channel = symm_mem.get_signal_pad_size() // 4 // group.size() - 1

    def handles(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype in DTYPES and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0 and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group's ranks, in a new tensor (x is left as it was)."""
        if x.numel() * x.element_size() <= self.one_shot_bytes:
            return self.one_shot(x)
        return self.two_shot(x)

    def _staging(self, x: torch.Tensor) -> torch.Tensor:
        return self.buffer[:x.numel() * x.element_size()].view(x.dtype)

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        out = torch.empty_like(flat)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(self._staging(x), flat, "sum", self.group_name, out)
        self.handle.barrier(channel=self.end_channel)
        return out.view(x.shape)

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        staging = self._staging(x)
        staging.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staging, "sum", self.group_name)
        return staging.clone().view(x.shape)


def make_symmetric_all_reduce(group, ranks: list[int], ranks_per_node: int,
                              device: torch.device) -> SymmetricAllReduce | None:
    """The fast path for one group, or None where it cannot serve (CPU, one node's ranks not all peers, a
    group spanning nodes). Every rank of the group decides alike: the same facts, then one NCCL vote."""
    size = len(ranks)
    if device.type != "cuda" or size not in ONE_SHOT_BYTES or len({r // ranks_per_node for r in ranks}) != 1:
        return None
    local = [r % ranks_per_node for r in ranks]
    ok = all(torch.cuda.can_device_access_peer(a, b) for a in local for b in local if a != b)
    fast = None
    if ok:
        try:
            fast = SymmetricAllReduce(group, device, ONE_SHOT_BYTES[size])
        except Exception as e:  # an old driver, no peer mappings: NCCL serves
            logger.warning("moeserve: symmetric-memory all-reduce unavailable (%s: %s); NCCL serves all sizes",
                           type(e).__name__, e)
    if not _all_agree(fast is not None, group, device):
        return None
    ones = torch.ones(8, dtype=torch.bfloat16, device=device)  # every rank has a buffer: no one waits alone
    probes = torch.stack([fast.one_shot(ones), fast.two_shot(ones)])
    if not _all_agree(bool((probes == size).all().item()), group, device):
        return None
    logger.info("moeserve: all-reduces of ranks %s through symmetric memory: one-shot up to %d KiB, two-shot up to "
                "%d KiB", ranks, fast.one_shot_bytes >> 10, fast.max_bytes >> 10)
    return fast


def _all_agree(ok: bool, group, device: torch.device) -> bool:
    vote = torch.tensor([int(ok)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=group)
    return vote.item() == 1
