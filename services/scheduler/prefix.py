"""How much of a prompt each worker, and the KV store, holds, as the scheduler can tell.

The scheduler hashes the prompt into the engine's chain of block hashes (engine.block_hash,
torch-free: each hash covers every token up to its block's end, rooted at the model fingerprint)
and matches them against the prefix index (prefix_index.py), which the workers' and stores'
reports keep. Hashes depend on the KV layout (fingerprint and block size), so they are computed
once per layout met; a match is kept until the index changes. A prompt whose block hashes are known
without its tokens (a simulated request: pdmesh sim) overrides `hashes`.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import chain_hashes
from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from services.scheduler.prefix_index import PrefixIndex, PrefixMatch
from services.scheduler.registry import Worker


class PromptBlocks:
    def __init__(self, token_ids: Sequence[int], index: PrefixIndex | None = None) -> None:
        self.token_ids = token_ids
        self.index = index or PrefixIndex()
        self._hashes: dict[tuple[str, int], list[BlockHash]] = {}
        self._matches: dict[KVLayout, tuple[int, PrefixMatch]] = {}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def hashes(self, fingerprint: str, block_size: int) -> list[BlockHash]:
        """The hashes of the prompt's full blocks that a worker could reuse: never the block of its
        last token, whose logits the worker must compute anyway."""
        key = (fingerprint, block_size)
        if key not in self._hashes:
            reusable = (len(self.token_ids) - 1) // block_size * block_size
            self._hashes[key] = chain_hashes(self.token_ids[:reusable], block_size, fingerprint)
        return self._hashes[key]

    def match(self, layout: KVLayout) -> PrefixMatch:
        """Where the prompt's leading blocks live (workers and stores) at the index's latest reports."""
        known = self._matches.get(layout)
        if known is not None and known[0] == self.index.version:
            return known[1]
        match = self.index.match(layout, self.hashes(layout.model_fingerprint, layout.block_size))
        self._matches[layout] = (self.index.version, match)
        return match

    def cached_tokens(self, worker: Worker) -> int:
        """Prompt tokens whose KV the worker's prefix cache held at its last report."""
        return self.match(worker.info.kv_layout).tokens(worker.worker_id)

    def stored_tokens(self, layout: KVLayout, store_ids: Sequence[str]) -> int:
        """Prompt tokens of this layout a KV store held at its last report."""
        return self.match(layout).best(store_ids)
