"""Sort (token, expert) pairs by expert, each expert's run padded to a multiple of BLOCK_M, on the device.

Outputs, for pairs p = t * K + k with expert ids[p]:
  sorted_pairs [num_blocks * BLOCK_M] int32: pair ids grouped by expert (stable), padding slots = num_pairs;
  block_expert [num_blocks] int32: the expert of each BLOCK_M block, -1 for blocks past the end;
  num_post_pad [1] int32: the used length of sorted_pairs (a multiple of BLOCK_M).
num_blocks = cdiv(M + min(E, M) * (BLOCK_M - 1), BLOCK_M) bounds the blocks any routing can need, so every grid
depends on shapes only (CUDA-graph safe). Ids outside [0, E) are dropped (their pairs get no output row).

Up to SORT_MAX pairs one program does everything as a sort (one launch: decode and small prefills); beyond it,
three launches: count per chunk of pairs, plan (prefix sums, block experts), scatter, with one-hot [CHUNK, E] tiles.
Both keep the pair order inside an expert, so the result is deterministic and the two paths agree exactly.
On an H200 (results/kernels/2026-11-27-session12-h200x4) the sort took 1.7-7.8 us up to 1,024 pairs (E=128) where
the tiles' one-program chain took 5.4-18 us; at 2,048 pairs 17.1 against the three launches' 19.7, at 4,096 65
against 22.7.
The counts that change with every step's tokens are not specialised (do_not_specialize): otherwise the first eager
step whose counts are not multiples of 16, next to constexprs only powers of two had set at warm-up, compiles a new
variant while serving (DP=2+EP on 2xH200: _align_plan_kernel, 0.8-1.1 s inside a 2,146-token step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin

SORT_MAX = 2048  # pairs sorted in one program; beyond, three launches (a batch of 256 tokens at top-8)


@triton.jit
def _count_pairs(ids_ptr, lo, hi, E_P: tl.constexpr, CHUNK: tl.constexpr):
    e_r = tl.arange(0, E_P)
    counts = tl.zeros([E_P], tl.int32)
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < hi, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == e_r[None, :]).to(tl.int32), 0)
    return counts


@triton.jit
def _scatter_pairs(ids_ptr, sorted_ptr, lo, hi, running, E_P: tl.constexpr, CHUNK: tl.constexpr):
    """running[e] = the slot of expert e's next pair; each pair goes to running[e] + its rank in the chunk."""
    e_r = tl.arange(0, E_P)
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < hi, other=-1).to(tl.int32)
        onehot = (ids[:, None] == e_r[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - 1
        dest = tl.sum(onehot * (rank + running[None, :]), 1)
        ok = (offs < hi) & (tl.sum(onehot, 1) > 0)
        tl.store(sorted_ptr + dest, offs, mask=ok)
        running += tl.sum(onehot, 0)


@triton.jit
def _plan_blocks(counts, sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs, num_experts, num_blocks,
                 BLOCK_M: tl.constexpr, E_P: tl.constexpr, CHUNK_B: tl.constexpr):
    """Padded offsets per expert; writes num_post_pad, the padding slots and block_expert. Returns the starts."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(num_post_ptr, tl.sum(padded, 0))
    slot = (starts + counts)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ptr + slot, tl.zeros([E_P, BLOCK_M], tl.int32) + num_pairs, mask=slot < ends[:, None])
    for bc in range(0, num_blocks, CHUNK_B):
        blk = bc + tl.arange(0, CHUNK_B)
        expert = tl.sum((ends[None, :] <= (blk * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blk, tl.where(expert < num_experts, expert, -1), mask=blk < num_blocks)
    return starts


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
def _align_sorted_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, delta_ptr, num_pairs, num_experts,
                         num_blocks, BLOCK_M: tl.constexpr, M_P: tl.constexpr, E_P: tl.constexpr,
                         CHUNK_B: tl.constexpr, PDL: tl.constexpr = 0):
    """A histogram of the experts, the padded starts from one cumsum over E, then one sort of the keys
    expert * M_P + pair. Sorted position i of expert e goes to slot i + (padded start of e - pairs before e): four
    steps, where the same work in one-hot tiles was eleven dependent tile reductions and scans. Stable (keys are
    unique and ordered by pair id within an expert)."""
    pdl_begin(PDL)
    p = tl.arange(0, M_P)
    ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
    ok = (p < num_pairs) & (ids >= 0) & (ids < num_experts)
    b = tl.arange(0, E_P)
    dropped = tl.sum((~ok).to(tl.int32), 0)  # lanes past the pairs and ids out of range: counted in bin 0, taken off
    counts = tl.histogram(tl.where(ok, ids, 0), E_P) - tl.where(b == 0, dropped, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    pstarts = ends - padded
    tl.store(delta_ptr + b, pstarts - (tl.cumsum(counts, 0) - counts))
    total = tl.sum(padded, 0)
    tl.store(num_post_ptr, total)
    slot = (pstarts + counts)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ptr + slot, tl.zeros([E_P, BLOCK_M], tl.int32) + num_pairs, mask=slot < ends[:, None])
    for bc in range(0, num_blocks, CHUNK_B):  # blocks past the used ones; the used ones get their expert below
        blk = bc + tl.arange(0, CHUNK_B)
        tl.store(block_expert_ptr + blk, tl.zeros([CHUNK_B], tl.int32) - 1,
                 mask=(blk >= total // BLOCK_M) & (blk < num_blocks))
    tl.debug_barrier()  # delta is read back by other threads of this program
    key = tl.sort(tl.where(ok, ids, E_P) * M_P + p)  # dropped pairs sort last
    expert = key // M_P
    valid = expert < num_experts
    dest = p + tl.load(delta_ptr + expert, mask=valid, other=0)
    tl.store(sorted_ptr + dest, key % M_P, mask=valid)
    tl.store(block_expert_ptr + dest // BLOCK_M, expert, mask=valid)  # every used block holds a pair of its expert


@triton.jit(do_not_specialize=["num_pairs", "per_prog"])
def _align_count_kernel(ids_ptr, counts_ptr, num_pairs, per_prog, E_P: tl.constexpr, CHUNK: tl.constexpr,
                        PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    p = tl.program_id(0)
    lo = p * per_prog
    counts = _count_pairs(ids_ptr, lo, tl.minimum(lo + per_prog, num_pairs), E_P, CHUNK)
    tl.store(counts_ptr + p * E_P + tl.arange(0, E_P), counts)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "num_progs"])
def _align_plan_kernel(counts_ptr, base_ptr, sorted_ptr, block_expert_ptr, num_post_ptr,
                       num_pairs, num_experts, num_blocks, num_progs,
                       BLOCK_M: tl.constexpr, E_P: tl.constexpr, P_P: tl.constexpr, CHUNK_B: tl.constexpr,
                       PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    p = tl.arange(0, P_P)[:, None]
    e = tl.arange(0, E_P)[None, :]
    per_chunk = tl.load(counts_ptr + p * E_P + e, mask=p < num_progs, other=0)
    starts = _plan_blocks(tl.sum(per_chunk, 0), sorted_ptr, block_expert_ptr, num_post_ptr, num_pairs,
                          num_experts, num_blocks, BLOCK_M, E_P, CHUNK_B)
    base = starts[None, :] + tl.cumsum(per_chunk, 0) - per_chunk
    tl.store(base_ptr + p * E_P + e, base, mask=p < num_progs)


@triton.jit(do_not_specialize=["num_pairs", "per_prog"])
def _align_scatter_kernel(ids_ptr, sorted_ptr, base_ptr, num_pairs, per_prog,
                          E_P: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    p = tl.program_id(0)
    lo = p * per_prog
    running = tl.load(base_ptr + p * E_P + tl.arange(0, E_P))
    _scatter_pairs(ids_ptr, sorted_ptr, lo, tl.minimum(lo + per_prog, num_pairs), running, E_P, CHUNK)


def num_blocks_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)


def _outputs(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(ids flat and contiguous, sorted_pairs, block_expert, num_post_pad, num_blocks), outputs uninitialised."""
    ids = topk_ids.reshape(-1).contiguous()
    num_blocks = num_blocks_bound(ids.numel(), num_experts, block_m)
    return (ids, torch.empty(num_blocks * block_m, dtype=torch.int32, device=ids.device),
            torch.empty(num_blocks, dtype=torch.int32, device=ids.device),
            torch.empty(1, dtype=torch.int32, device=ids.device), num_blocks)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_pairs, block_expert, num_post_pad, num_blocks) for topk_ids [T, K]; see the module docstring."""
    if topk_ids.numel() > SORT_MAX:
        return align_pairs_in_three_launches(topk_ids, num_experts, block_m)
    ids, sorted_pairs, block_expert, num_post, num_blocks = _outputs(topk_ids, num_experts, block_m)
    e_p = runtime.next_pow2(num_experts)
    m_p = max(16, runtime.next_pow2(ids.numel()))
    delta = torch.empty(e_p, dtype=torch.int32, device=ids.device)
    _align_sorted_kernel[(1,)](
        ids, sorted_pairs, block_expert, num_post, delta, ids.numel(), num_experts, num_blocks,
        BLOCK_M=block_m, M_P=m_p, E_P=e_p, CHUNK_B=max(16, min(64, 8192 // e_p)), num_warps=4 if m_p <= 1024 else 8,
        **pdl.launch(ids.device, topk_ids.shape[0]),
    )
    return sorted_pairs, block_expert, num_post, num_blocks


def align_pairs_in_three_launches(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """align_pairs' outputs through count (per chunk of pairs), plan, scatter: any number of pairs, spread over up to
    128 programs. align_pairs takes it past SORT_MAX pairs; tests and bench_kernels compare the two at any size."""
    ids, sorted_pairs, block_expert, num_post, num_blocks = _outputs(topk_ids, num_experts, block_m)
    m = ids.numel()
    e_p = runtime.next_pow2(num_experts)
    chunk = max(16, min(64, 8192 // e_p))  # one-hot tiles of chunk x E_P int32 stay in registers
    per_prog = max(256, -(-m // 128))
    per_prog = -(-per_prog // chunk) * chunk
    progs = -(-m // per_prog)
    counts = torch.empty(progs, e_p, dtype=torch.int32, device=ids.device)
    base = torch.empty(progs, e_p, dtype=torch.int32, device=ids.device)
    _align_count_kernel[(progs,)](ids, counts, m, per_prog, E_P=e_p, CHUNK=chunk, num_warps=4,
                                  **pdl.launch(ids.device, topk_ids.shape[0]))
    _align_plan_kernel[(1,)](
        counts, base, sorted_pairs, block_expert, num_post, m, num_experts, num_blocks, progs,
        BLOCK_M=block_m, E_P=e_p, P_P=runtime.next_pow2(progs), CHUNK_B=chunk, num_warps=8,
        **pdl.launch(counts.device, topk_ids.shape[0]),
    )
    _align_scatter_kernel[(progs,)](ids, sorted_pairs, base, m, per_prog, E_P=e_p, CHUNK=chunk, num_warps=4,
                                    **pdl.launch(ids.device, topk_ids.shape[0]))
    return sorted_pairs, block_expert, num_post, num_blocks
