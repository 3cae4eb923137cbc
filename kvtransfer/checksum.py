"""Sampled checksums: xxh3 over a few blocks of each message, to catch corruption in transit.

A chunk is one block's K or V of one layer in a packed message (staging[l, kv, i], contiguous).
The sender hashes a seeded sample of chunks after packing; the receiver hashes the same chunks of
what arrived before unpacking it, so a bad payload never reaches the cache unnoticed.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

import torch
import xxhash


def sample_chunks(num_chunks: int, samples: int, key: str) -> list[int]:
    """`samples` distinct chunk indices, the same on both sides for the same key."""
    rng = random.Random(zlib.crc32(key.encode()))
    return sorted(rng.sample(range(num_chunks), min(samples, num_chunks)))


def digest_chunks(data: torch.Tensor, chunk_bytes: int, chunks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(chunk, xxh3-64) for each chunk of data, a (nbytes,) uint8 tensor on any device."""
    if not chunks:
        return ()
    # one device-to-host copy of the sampled chunks; (len(chunks), chunk_bytes) uint8
    host = torch.stack([data[c * chunk_bytes : (c + 1) * chunk_bytes] for c in chunks]).cpu().numpy()
    return tuple((c, xxhash.xxh3_64_intdigest(row.tobytes())) for c, row in zip(chunks, host, strict=True))


def first_mismatch(data: torch.Tensor, chunk_bytes: int, expected: Sequence[tuple[int, int]]) -> int | None:
    """The first chunk whose digest differs from the sender's, or None."""
    got = digest_chunks(data, chunk_bytes, [c for c, _ in expected])
    for (chunk, want), (_, have) in zip(expected, got, strict=True):
        if want != have:
            return chunk
    return None


def digest_rows(rows: torch.Tensor, chunks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(chunk, xxh3-64) for chunks already gathered as rows of a (k, chunk_bytes) uint8 host tensor."""
    host = rows.numpy()
    return tuple((c, xxhash.xxh3_64_intdigest(row.tobytes())) for c, row in zip(chunks, host, strict=True))
