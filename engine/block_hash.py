"""Chain hashes of full KV blocks, stable across processes and machines.

A block's hash covers every token up to the block's end: hash(parent_hash, block_tokens), and the
chain's root is the model fingerprint, so two models never share a prefix. xxh3 over bytes (not
Python's hash(), which is salted per process) lets the scheduler and every worker compute the same
numbers. Torch-free: the scheduler service imports it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

from engine.ids import BlockHash


def root_hash(model_fingerprint: str) -> BlockHash:
    return BlockHash(xxhash.xxh3_64_intdigest(model_fingerprint.encode()))


def block_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    payload = parent.to_bytes(8, "little") + array("q", token_ids).tobytes()
    return BlockHash(xxhash.xxh3_64_intdigest(payload))


def chain_hashes(
    token_ids: Sequence[int], block_size: int, model_fingerprint: str, start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from block index `start` on.

    `parent` is the hash of block `start - 1` (None when start is 0). A trailing partial block has
    no hash: it can still change.
    """
    h = root_hash(model_fingerprint) if parent is None else parent
    out: list[BlockHash] = []
    for begin in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        h = block_hash(h, token_ids[begin : begin + block_size])
        out.append(h)
    return out
