"""KV blocks that leave or enter the engine between steps, outside any request's own step: the
chains a worker may offer to a KV store, the export of cached blocks, the copy of a store's mapped
slots into a pending prefix import (engine.handoff: Offering, Shared memory).

It owns the record of finished requests' hash chains; the blocks themselves stay the pool's and
the requests' (it only reads them, or writes blocks an import still holds). An export holds a
reference on the blocks it reads until its copies have run (an event on the engine's stream, polled
between steps and commands, never waited for): a cached block is otherwise free to be evicted,
and its next owner may be written by another stream (a received ticket's unpack, a peer's direct
write) before the export's copies, queued on the engine's stream, have read it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import torch

from engine.block_copy import copy_in, record_event
from engine.block_pool import BlockPool
from engine.handoff import KVExportSink
from engine.ids import BlockHash, BlockId, RequestId
from engine.kv_manager import KVManager
from engine.request import Request
from engine.reservations import Reservations

_FINISHED_CHAINS_KEPT = 1024  # finished requests' block chains kept for a worker to offer; older ones go


class BlockExchange:
    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        pool: BlockPool,
        kv: KVManager,
        reservations: Reservations,
        requests: Mapping[RequestId, Request],
        block_size: int,
    ) -> None:
        self.kv_caches = kv_caches
        self.pool = pool
        self.kv = kv
        self.reservations = reservations
        self.requests = requests  # the engine's live requests (read only)
        self.block_size = block_size
        # Hash chains of the full blocks finished requests computed or imported, newest last: what a
        # worker may offer to a KV store (take_finished_chains, export_blocks).
        self.finished_chains: deque[tuple[BlockHash, ...]] = deque(maxlen=_FINISHED_CHAINS_KEPT)
        # Exports whose copies may still be queued: their blocks, held, and the event after them.
        self._exporting: deque[tuple[list[BlockId], torch.cuda.Event | None]] = deque()

    def keep_chain(self, request: Request) -> None:
        """Remember the hashes of the full blocks the request leaves in the prefix cache."""
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        if self.kv.prefix_caching and full:
            self.finished_chains.append(tuple(request.block_hashes[:full]))

    def take_finished_chains(self) -> list[tuple[BlockHash, ...]]:
        """The full-block hash chains of the requests finished since the last take, oldest first."""
        chains = list(self.finished_chains)
        self.finished_chains.clear()
        return chains

    def export_blocks(self, hashes: Sequence[BlockHash], sink: KVExportSink) -> int:
        """Push the KV of the cached blocks `hashes` through `sink`, every layer, then close it;
        returns the blocks pushed. Call between steps (the async engine's commands are): on CUDA
        the copies are queued on the current stream, so later writes to those blocks come after
        them. A block evicted since it was cached cancels the sink instead (0)."""
        block_ids = [self.pool.lookup(h) for h in hashes]
        if not block_ids or any(b is None for b in block_ids):
            sink.cancel("a block left the prefix cache before it was exported")
            return 0
        ids = [b for b in block_ids if b is not None]
        self.pool.touch(ids)
        try:
            for layer, kv in enumerate(self.kv_caches):
                sink.push_layer(layer, kv, ids, len(ids) * self.block_size)
            sink.close()
        finally:
            self._exporting.append((ids, record_event(self.kv_caches[0].device)))
            self.release_exported()
        return len(ids)

    @property
    def exports_pending(self) -> bool:
        return bool(self._exporting)

    def release_exported(self) -> None:
        """Drop the exports' holds whose copies have run (in order: one stream ran them)."""
        while self._exporting:
            ids, copied = self._exporting[0]
            if copied is not None and not copied.query():
                return
            self._exporting.popleft()
            self.pool.free(ids)

    def import_blocks(
        self, request_id: str, block_ids: Sequence[int], slabs: Sequence[torch.Tensor], slots: Sequence[int]
    ) -> tuple[bool, torch.cuda.Event | None]:
        """Copy host slots (a KV store's, mapped: kvtransfer/shm.py) into blocks a request holds for
        its pending import; (copied, the CUDA event after the copies, None off CUDA). Not copied
        when the request no longer waits for its import (ended, aborted, import failed): its
        blocks may be another's by now. Call between steps, as export_blocks."""
        rid = RequestId(request_id)
        request = self.requests.get(rid)
        if rid not in self.reservations and (request is None or request.kv_import is None):
            return False, None
        return True, copy_in(self.kv_caches, block_ids, slabs, slots)
