"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference counts, and a prefix cache.

A full block is named by the hash of its tokens and of the block before it, so equal prefixes share blocks.
Freed blocks keep their hash and stay findable until the pool hands them out again (least recently freed first).
The tensors themselves live in the runner; this module only deals in block ids.
"""

from __future__ import annotations

from collections import OrderedDict

from moeserve.engine.request import Request


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError("BlockPool.allocate beyond the free blocks")  # callers check first
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict its cached contents
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_cnt[b] == 0:
                self.free_queue.pop(b)
            self.ref_cnt[b] += 1

    def free(self, blocks) -> None:
        for b in blocks:
            self.ref_cnt[b] -= 1
            assert self.ref_cnt[b] >= 0, f"block {b} freed twice"
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None

    def register(self, block: int, h: int) -> None:
        if h not in self.cached:
            self.cached[h] = block
            self.block_hash[block] = h


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else 0
            req.block_hashes.append(hash((parent, tuple(req.all_token_ids[i * bs:(i + 1) * bs]))))

    def computed_blocks(self, req: Request) -> list[int]:
        """Blocks of the cache that already hold a prefix of req (always leaving >= 1 token to compute)."""
        if not self.prefix_caching:
            return []
        self._update_hashes(req)
        blocks = []
        for h in req.block_hashes:
            b = self.pool.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        if blocks and len(blocks) * self.block_size >= req.num_tokens:
            blocks.pop()
        return blocks

    def allocate(self, req: Request, num_new_tokens: int, computed: list[int] = ()) -> bool:
        """Give req room for num_new_tokens more tokens (after `computed` prefix blocks); False if the pool is short."""
        if not computed and req.num_computed_tokens and \
                req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * self.block_size:
            return True  # a running request whose last block still has room (most decode steps)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        new = self.blocks_needed(total) - len(req.block_ids) - len(computed)
        revived = sum(1 for b in computed if self.pool.ref_cnt[b] == 0)
        if new > self.pool.num_free - revived:
            return False
        if computed or req.num_computed_tokens == 0:
            self.prefix_queries += req.num_tokens
            self.prefix_hits += len(computed) * self.block_size
        if computed:
            self.pool.touch(computed)
            req.block_ids.extend(computed)
            req.num_registered_blocks = len(req.block_ids)
        if new > 0:
            req.block_ids.extend(self.pool.allocate(new))
        return True

    def register_full_blocks(self, req: Request) -> None:
        """Enter req's newly completed blocks into the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(req.num_computed_tokens, req.num_tokens) // self.block_size  # pending tokens are not hashable yet
        if full <= req.num_registered_blocks:
            return
        self._update_hashes(req)
        for i in range(req.num_registered_blocks, full):
            self.pool.register(req.block_ids[i], req.block_hashes[i])
        req.num_registered_blocks = full

    def free(self, req: Request) -> None:
        # Tail first: the pool evicts the least recently freed, so shared prefixes outlive their tails.
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        req.num_registered_blocks = 0
