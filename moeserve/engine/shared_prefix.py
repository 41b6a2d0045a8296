"""Which decode rows share a prompt prefix's KV blocks, so that attention reads that prefix once per group.

Prefix caching gives requests that begin with the same tokens the same KV blocks, so in a decode step their
block tables begin with the same block ids. Attention can then read those blocks once for the whole group (a
tensor-core tile of the group's query rows against the prefix keys: kernels/attention._prefix_attn_kernel)
instead of once per row, and merge that with each row's own keys. Planned per decode step on the host, from the
block tables the runner already holds (numpy, no device reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_GROUPS = 16  # groups per step (the prefix kernel's grid is fixed per batch size for CUDA graphs)
MIN_ROWS = 8  # smaller decode batches keep the plain kernel (no graphs of their own)
MIN_SAVED = 0.25  # take the grouped path when it spares at least this share of the step's key reads


@dataclass
class SharedPrefixes:
    """A step's groups on the device, as kernels/attention.paged_attention(shared=...) reads them: int32 tensors
    rows [>= members], the batch rows ordered by group; start [num_groups + 1] (group g is rows[start[g]:start[g+1]];
    groups past the real ones are empty); plen [num_groups], each group's prefix in tokens (whole pages, all before
    every member's newest token); row_prefix [B], each row's plen (0 in no group). Shapes are fixed per batch size,
    values read on the device: CUDA-graph safe. (Here, not in kernels/: the runner imports it on CPU too, and
    importing the kernels would load Triton there.)"""

    rows: "torch.Tensor"
    start: "torch.Tensor"
    plen: "torch.Tensor"
    row_prefix: "torch.Tensor"


@dataclass
class Plan:
    rows: np.ndarray  # [members] int32: batch rows, ordered by group
    start: np.ndarray  # [MAX_GROUPS + 1] int32: group g is rows[start[g]:start[g+1]]; empty groups repeat the end
    plen: np.ndarray  # [MAX_GROUPS] int32: each group's shared prefix in tokens (0 for empty groups)
    row_prefix: np.ndarray  # [B] int32: each row's group's plen, 0 for a row in no group

    @property
    def num_groups(self) -> int:
        return int(np.count_nonzero(np.diff(self.start)))


def plan(tables: np.ndarray, positions: np.ndarray, block_size: int, max_groups: int = MAX_GROUPS,
         min_saved: float = MIN_SAVED, min_rows: int = MIN_ROWS) -> Plan | None:
    """tables [B, W]: each decode row's block ids (valid up to its newest token's block); positions [B]: the
    newest token's position (the row attends over positions + 1 keys). Rows are grouped by their first block;
    a group's prefix is its members' longest run of equal leading blocks that lies wholly before every member's
    newest token. None when the groups would spare less than min_saved of the step's key reads, or B < min_rows."""
    B = len(positions)
    if B < min_rows:
        return None
    positions = np.asarray(positions, dtype=np.int64)
    whole = positions // block_size  # blocks wholly before each row's newest token
    first = np.asarray(tables[:B, 0])
    order = np.argsort(first, kind="stable")
    _, starts, counts = np.unique(first[order], return_index=True, return_counts=True)
    groups = []  # (saved key reads, member rows, prefix tokens)
    for s, c in zip(starts.tolist(), counts.tolist()):
        if c < 2:
            continue
        members = np.sort(order[s:s + c])
        k = int(whole[members].min())
        if k == 0:
            continue
        block = tables[members, :k]
        same = (block == block[0]).all(axis=0)
        k = k if same.all() else int(same.argmin())
        if k:
            groups.append(((c - 1) * k * block_size, members, k * block_size))
    groups.sort(key=lambda g: -g[0])
    groups = groups[:max_groups]
    if not groups or sum(g[0] for g in groups) < min_saved * float((positions + 1).sum()):
        return None
    rows = np.concatenate([g[1] for g in groups]).astype(np.int32)
    sizes = [len(g[1]) for g in groups] + [0] * (max_groups - len(groups))
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    plen = np.array([g[2] for g in groups] + [0] * (max_groups - len(groups)), dtype=np.int32)
    row_prefix = np.zeros(B, dtype=np.int32)
    for _, members, p in groups:
        row_prefix[members] = p
    return Plan(rows, start, plen, row_prefix)
