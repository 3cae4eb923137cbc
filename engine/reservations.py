"""Blocks held for requests whose KV an import writes, from the reservation until the request is
added with its import (Engine.add_request takes them) or the reservation is aborted.

Two kinds. A hand-off reservation (`hold`) is a prompt's first tokens, all of which another worker
pushes; if that import fails, so does the request. A prefix reservation (`hold_prefix`) starts
with the leading blocks this engine's own prefix cache holds and adds blocks for the tokens a KV
store can bring; that import is optional: if it fails, the request computes those tokens.

While anything else holds blocks, a reservation leaves `reserve_watermark` of the pool free, so a
burst of them cannot starve running requests of the blocks they grow into (a deadlock otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import chain_hashes
from engine.config import CacheConfig
from engine.errors import OutOfBlocks
from engine.ids import BlockId, RequestId
from engine.kv_manager import KVManager, blocks_for


@dataclass(frozen=True)
class PrefixReservation:
    """What hold_prefix held: the engine's own cached blocks, then `block_ids` for the
    `num_import_tokens` tokens an import writes."""

    num_cached_tokens: int  # from this engine's prefix cache: held, not imported
    block_ids: list[BlockId]  # where tokens [num_cached_tokens, num_cached_tokens + num_import_tokens) go
    num_import_tokens: int  # 0: nothing to import (nothing was held)


@dataclass(slots=True)
class Reserved:
    """One reservation: every block it holds, in token order."""

    block_ids: list[BlockId]
    num_cached_tokens: int  # leading tokens whose KV the blocks already hold (the engine's own cache)
    num_import_tokens: int  # the tokens after those, written by the import
    optional: bool  # a prefix import: when it fails the request computes those tokens instead


class Reservations:
    def __init__(self, kv: KVManager, cache: CacheConfig, fingerprint: str) -> None:
        self.kv = kv
        self.cache = cache
        self.fingerprint = fingerprint
        self._held: dict[RequestId, Reserved] = {}

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self._held

    def __len__(self) -> int:
        return len(self._held)

    @property
    def num_blocks(self) -> int:
        return sum(len(r.block_ids) for r in self._held.values())

    def hold(self, rid: RequestId, num_tokens: int, busy: bool) -> list[BlockId]:
        """Blocks for a prompt's first num_tokens tokens; OutOfBlocks when they cannot be spared."""
        pool = self.kv.pool
        need = blocks_for(num_tokens, self.cache.block_size)
        keep = self._keep(busy)
        if need > pool.num_free - keep:
            raise OutOfBlocks(
                f"a reservation of {need} blocks would leave fewer than {keep} of {pool.num_blocks} "
                f"free ({pool.num_free} are); retry when requests finish"
            )
        blocks = pool.allocate(need)
        self._held[rid] = Reserved(blocks, 0, num_tokens, optional=False)
        return list(blocks)

    def hold_prefix(self, rid: RequestId, prompt: Sequence[int], num_tokens: int, busy: bool) -> PrefixReservation:
        """The engine's cached leading blocks plus blocks for the rest of the first num_tokens
        (cut to whole blocks short of the prompt's last token, whose logits must be computed).
        Nothing is held when the cache covers it all or the blocks cannot be spared."""
        bs, pool = self.cache.block_size, self.kv.pool
        num_tokens = min(num_tokens, (len(prompt) - 1) // bs * bs) // bs * bs
        hits = self.kv.cached_blocks(chain_hashes(prompt[:num_tokens], bs, self.fingerprint))
        need = num_tokens // bs - len(hits)
        if need <= 0 or need > pool.num_free - len(hits) - self._keep(busy):
            return PrefixReservation(len(hits) * bs, [], 0)
        pool.touch(hits)
        blocks = pool.allocate(need)
        self._held[rid] = Reserved(hits + blocks, len(hits) * bs, need * bs, optional=True)
        return PrefixReservation(len(hits) * bs, list(blocks), need * bs)

    def take(self, rid: RequestId) -> Reserved:
        """The reservation, handed to its request (which now owns the blocks)."""
        return self._held.pop(rid)

    def release(self, rid: RequestId) -> bool:
        """Free an unclaimed reservation's blocks; False when there is none."""
        reserved = self._held.pop(rid, None)
        if reserved is None:
            return False
        self.kv.pool.free(reserved.block_ids)
        return True

    def _keep(self, busy: bool) -> int:
        """Blocks a reservation must leave free: none when the engine is idle (no one could starve)."""
        return int(self.kv.pool.num_blocks * self.cache.reserve_watermark) if busy else 0
