"""How much of a prompt a worker holds in its prefix cache, as the scheduler can tell.

The scheduler hashes the prompt into the engine's chain of block hashes (engine.block_hash,
torch-free: each hash covers every token up to its block's end, rooted at the model fingerprint)
and looks them up in the hashes each worker reported (Registry). Hashes depend on the worker's
KV layout (fingerprint and block size), so they are computed once per layout met.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import chain_hashes
from engine.ids import BlockHash
from services.scheduler.registry import Worker


class PromptBlocks:
    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[tuple[str, int], list[BlockHash]] = {}

    def hashes(self, fingerprint: str, block_size: int) -> list[BlockHash]:
        """The hashes of the prompt's full blocks that a worker could reuse: never the block of its
        last token, whose logits the worker must compute anyway."""
        key = (fingerprint, block_size)
        if key not in self._hashes:
            reusable = (len(self.token_ids) - 1) // block_size * block_size
            self._hashes[key] = chain_hashes(self.token_ids[:reusable], block_size, fingerprint)
        return self._hashes[key]

    def cached_tokens(self, worker: Worker) -> int:
        """Prompt tokens whose KV the worker's cache held at its last report: the longest run of
        leading blocks it has."""
        layout = worker.info.kv_layout
        found = 0
        for block_hash in self.hashes(layout.model_fingerprint, layout.block_size):
            if block_hash not in worker.cached:
                break
            found += 1
        return found * layout.block_size
