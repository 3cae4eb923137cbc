"""Which blocks each request holds: allocation, prefix-cache hits, caching of full blocks.

Owns the mapping request → block ids on top of the BlockPool (which knows only blocks). Knows
tokens and hashes, not tensors: the KV bytes live in engine.kv_cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import chain_hashes
from engine.block_pool import BlockPool
from engine.ids import BlockHash, BlockId
from engine.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVManager:
    def __init__(self, pool: BlockPool, block_size: int, model_fingerprint: str, prefix_caching: bool) -> None:
        self.pool = pool
        self.block_size = block_size
        self.fingerprint = model_fingerprint
        self.prefix_caching = prefix_caching

    def _update_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its tokens."""
        done = len(request.block_hashes)
        parent = request.block_hashes[-1] if done else None
        request.block_hashes += chain_hashes(
            request.token_ids, self.block_size, self.fingerprint, start=done, parent=parent
        )

    def take_cached_prefix(self, request: Request) -> int:
        """On first admission: hold the longest cached prefix and skip computing it.

        At least one token is always left to compute, because sampling needs its logits.
        Returns the number of tokens whose KV came from the cache.
        """
        assert not request.block_ids and request.num_computed_tokens == 0
        if not self.prefix_caching:
            return 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.cached_blocks(request.block_hashes[:max_blocks])
        self.pool.touch(hits)
        request.block_ids = hits
        request.num_published_blocks = len(hits)
        request.num_computed_tokens = len(hits) * self.block_size
        return request.num_computed_tokens

    def cached_blocks(self, hashes: Sequence[BlockHash]) -> list[BlockId]:
        """The blocks caching the leading run of `hashes` (not held: touch them to keep them)."""
        hits: list[BlockId] = []
        for h in hashes if self.prefix_caching else ():
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_grow(self, request: Request, num_new_tokens: int) -> bool:
        need = blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        return need - len(request.block_ids) <= self.pool.num_free

    def grow(self, request: Request, num_new_tokens: int) -> None:
        """Make request's blocks cover its computed tokens plus num_new_tokens (raises OutOfBlocks)."""
        need = blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        missing = need - len(request.block_ids)
        if missing > 0:
            request.block_ids += self.pool.allocate(missing)

    def try_grow(self, request: Request, num_new_tokens: int) -> bool:
        """grow() when can_grow(); whether it did (the batcher's per-row check and growth in one)."""
        missing = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size) - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            return False
        request.block_ids += self.pool.allocate(missing)
        return True

    def reserve(self, request: Request, num_tokens: int) -> list[BlockId]:
        """Blocks for the first num_tokens tokens, which someone else will write (a KV import)."""
        assert not request.block_ids
        request.block_ids = self.pool.allocate(blocks_for(num_tokens, self.block_size))
        return list(request.block_ids)

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish every full block whose tokens all have KV, so later requests can reuse it."""
        if not self.prefix_caching:
            return
        self._update_hashes(request)
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        # Only the blocks filled since the last call: this runs for every request on every step.
        for i in range(request.num_published_blocks, full):
            self.pool.cache(request.block_ids[i], request.block_hashes[i])
        request.num_published_blocks = max(request.num_published_blocks, full)

    def release(self, request: Request) -> None:
        """Give back every block; cached ones stay reusable until evicted."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_published_blocks = 0
