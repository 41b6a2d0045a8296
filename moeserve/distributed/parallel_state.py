"""The process groups of one worker, set once at start-up.

Global ranks are laid out [DP][PP][TP], TP innermost (vLLM's order): rank = (dp * pp_size + pp) * tp_size + tp.
The expert-parallel group, when `--enable-expert-parallel` is on, is every DP x TP rank of one pipeline stage,
so EP size = DP x TP and attention stays TP-sharded (with DP attention each DP rank holds its own tokens).

Before `initialize_model_parallel` (one process, or a test building a single layer) every group is the trivial
group of size 1 and every collective is the identity, so layers ask for their rank and size without caring
whether torch.distributed is up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    enable_expert_parallel: bool = False
    # CUDA: TP/EP groups of at least this many ranks, inside one node, all-reduce through symmetric memory
    # (symmetric_all_reduce.py) instead of NCCL; 0: never.
    custom_all_reduce: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ep(self) -> int:
        """Ranks the routed experts are spread over (whole experts per rank); 1 when EP is off."""
        return self.tp * self.dp if self.enable_expert_parallel else 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of a global rank."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp


class GroupCoordinator:
    """One process group as seen from one rank: its rank inside the group, the group's size, and collectives
    that are the identity when the group has one member. On gloo (CPU), reduce-scatter is an all-reduce and a
    slice, since gloo has no reduce-scatter."""

    def __init__(self, ranks: list[int], group=None, global_rank: int = 0):
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(global_rank) if global_rank in ranks else 0
        self.group = group
        self.first_rank = ranks[0]
        self.fast_all_reduce = None  # a SymmetricAllReduce on CUDA groups of one node, see initialize_model_parallel

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group; may be x itself, summed in place, or a new tensor: use the result."""
        if self.size == 1:
            return x
        if self.fast_all_reduce is not None and self.fast_all_reduce.handles(x):
            return self.fast_all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's x along dim (all the same shape)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:
            out = torch.empty((self.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            if dim != 0:
                out = torch.cat(out.chunk(self.size, dim=0), dim=dim)
            return out
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, each keeping its own 1/size of dim 0 (dim 0 divisible by size)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        n = x.shape[0] // self.size
        if x.is_cuda:
            out = torch.empty((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.reduce_scatter_tensor(out, x, group=self.group)
            return out
        dist.all_reduce(x, group=self.group)
        return x[self.rank * n:(self.rank + 1) * n].clone()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """src: rank inside this group."""
        if self.size > 1:
            dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x, dst=self.ranks[dst], group=self.group)

    def isend(self, x: torch.Tensor, dst: int):
        """Start sending x; the returned work completes once it is sent (keep x alive until then)."""
        return dist.isend(x, dst=self.ranks[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(x, src=self.ranks[src], group=self.group)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


_TRIVIAL = GroupCoordinator([0])
_groups: dict[str, GroupCoordinator] = {}
_layout = ParallelLayout()


def layout() -> ParallelLayout:
    return _layout


def get_tp_group() -> GroupCoordinator:
    return _groups.get("tp", _TRIVIAL)


def get_pp_group() -> GroupCoordinator:
    return _groups.get("pp", _TRIVIAL)


def get_dp_group() -> GroupCoordinator:
    return _groups.get("dp", _TRIVIAL)


def get_ep_group() -> GroupCoordinator:
    return _groups.get("ep", _TRIVIAL)


def initialize_model_parallel(lay: ParallelLayout, ranks_per_node: int | None = None) -> None:
    """Make the TP, PP, DP and EP groups of this rank. torch.distributed must be initialised with
    world_size == lay.world_size. Every rank calls new_group for every distinct set of ranks, in the same order.
    On NCCL the TP and EP groups that sit inside one node (of `ranks_per_node` consecutive ranks) get the
    symmetric-memory all-reduce when they have at least `lay.custom_all_reduce` ranks."""
    global _layout
    world = dist.get_world_size()
    if world != lay.world_size:
        raise ValueError(f"torch.distributed has {world} ranks but the layout needs tp*pp*dp = {lay.world_size}.")
    me = dist.get_rank()
    tp, pp, dp = lay.tp, lay.pp, lay.dp
    rank = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731

    # One group per set of ranks: TP=4+EP's EP group is its TP group, DP=2+EP's DP group is its EP group, and a group
    # of every rank is the default one (not a copy of it). Each NCCL communicator keeps buffers on every GPU that the KV cache then
    # lacks: with a separate EP group, Qwen3-235B at TP=4+EP on 4xH200 had 0.47 GiB more memory outside torch than
    # at TP=4 (236,672 KV tokens against 248,784; benchmarks/results/flagship/2026-11-27-qwen3-235b-h200x4).
    made: dict[tuple[int, ...], GroupCoordinator] = {}

    def make(name: str, all_ranks: list[list[int]]) -> None:
        for ranks in all_ranks:
            key = tuple(ranks)
            if key not in made:  # the same decision on every rank, so every rank calls new_group alike
                group = None if len(ranks) == 1 else dist.group.WORLD if len(ranks) == world else dist.new_group(ranks)
                made[key] = GroupCoordinator(ranks, group, me)
            if me in ranks:
                _groups[name] = made[key]

    make("tp", [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)])
    make("pp", [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)])
    make("dp", [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)])
    if lay.enable_expert_parallel:
        make("ep", [[rank(d, p, t) for d in range(dp) for t in range(tp)] for p in range(pp)])
    _layout = lay
    if lay.custom_all_reduce and dist.get_backend() == "nccl":
        from moeserve.distributed.symmetric_all_reduce import make_symmetric_all_reduce

        device = torch.device("cuda", torch.cuda.current_device())
        for name in ("tp", "ep"):  # all-reduces happen only in these (row-parallel layers, experts, LM head)
            g = _groups.get(name)
            # TP's and EP's may be one group: made once
            if g is not None and g.size >= max(2, lay.custom_all_reduce) and g.fast_all_reduce is None:
                g.fast_all_reduce = make_symmetric_all_reduce(g.group, g.ranks, ranks_per_node or world, device)


def destroy_model_parallel() -> None:
    global _layout
    _groups.clear()
    _layout = ParallelLayout()


class PendingSends:
    """Point-to-point sends started and not waited for: each tensor is kept alive until its send has completed
    (the finished ones are dropped whenever another is added)."""

    def __init__(self):
        self._works: list = []

    def add(self, work, tensor: torch.Tensor) -> None:
        self._works = [(w, t) for w, t in self._works if not w.is_completed()]
        self._works.append((work, tensor))

    def wait(self) -> None:
        for w, _ in self._works:
            w.wait()
        self._works = []
