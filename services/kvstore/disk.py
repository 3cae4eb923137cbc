"""The disk tier of one KV layout: one file per block, under a directory of the namespace's own.

A file is a 32-byte header (magic, the block's chain hash, payload bytes, xxh3 of the payload)
and the block as the slab holds it. Writes go to a temporary name and are renamed into place, so
a crash never leaves a torn block under a real name; a payload whose checksum fails on reading is
refused (and dropped), never served. All file work runs on the store's one I/O thread, in the
order it was asked for: a block's read or removal always follows its write.

The shelf keeps its files' bytes within `capacity_bytes`; choosing what to evict is the
namespace's business (it knows which blocks are being read).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import xxhash

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from services.kvstore.slab import block_bytes

_MAGIC = b"PDMESHKV"
_HEADER = struct.Struct("<8sQQQ")  # magic, block hash, payload bytes, xxh3-64 of the payload
_SUFFIX = ".kv"


class CorruptBlock(Exception):
    """A block file does not hold what its name says: wrong header, size or checksum."""


def namespace_dir(root: Path, layout: KVLayout) -> Path:
    key = json.dumps(asdict(layout), sort_keys=True).encode()
    return root / f"ns-{xxhash.xxh3_64_hexdigest(key)}"


class DiskShelf:
    def __init__(
        self, root: Path, layout: KVLayout, capacity_bytes: int, io: concurrent.futures.ThreadPoolExecutor
    ) -> None:
        self.layout = layout
        self.directory = namespace_dir(root, layout)
        self.capacity_bytes = capacity_bytes
        self.payload_bytes = block_bytes(layout)
        self.file_bytes = _HEADER.size + self.payload_bytes
        self.used_bytes = 0
        self._io = io
        self._order: OrderedDict[BlockHash, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._order

    @property
    def room_for_one(self) -> bool:
        return self.used_bytes + self.file_bytes <= self.capacity_bytes

    def oldest(self) -> Iterator[BlockHash]:
        return iter(list(self._order))

    def put(self, block_hash: BlockHash, block: torch.Tensor) -> None:
        """Write a block (a copy the caller no longer touches) in the background."""
        assert block_hash not in self._order and self.room_for_one
        self._order[block_hash] = None
        self.used_bytes += self.file_bytes
        self._io.submit(self._write, block_hash, block)

    async def read(self, block_hash: BlockHash) -> torch.Tensor:
        """The block, (num_layers, 2, block_size, kv_heads, head_dim); CorruptBlock if it is not."""
        return await asyncio.get_running_loop().run_in_executor(self._io, self._read, block_hash)

    def remove(self, block_hash: BlockHash) -> None:
        del self._order[block_hash]
        self.used_bytes -= self.file_bytes
        self._io.submit(self._path(block_hash).unlink, missing_ok=True)

    def restore(self) -> list[BlockHash]:
        """Take the files a previous run left (oldest first), dropping torn or foreign ones and the
        oldest beyond capacity. Runs before the store serves."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "layout.json").write_text(json.dumps(asdict(self.layout), sort_keys=True))
        found: list[tuple[float, BlockHash]] = []
        for path in self.directory.iterdir():
            if path.suffix != _SUFFIX:
                if path.name != "layout.json":
                    path.unlink(missing_ok=True)  # a write the crash interrupted
                continue
            block_hash = _hash_of(path)
            stat = path.stat()
            if block_hash is None or stat.st_size != self.file_bytes:
                path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime, block_hash))
        found.sort()
        excess = max(0, len(found) - self.capacity_bytes // self.file_bytes)
        for _, block_hash in found[:excess]:
            self._path(block_hash).unlink(missing_ok=True)
        kept = [h for _, h in found[excess:]]
        for block_hash in kept:
            self._order[block_hash] = None
        self.used_bytes = len(kept) * self.file_bytes
        return kept

    # ---- the I/O thread
    def _path(self, block_hash: BlockHash) -> Path:
        return self.directory / f"{block_hash:016x}{_SUFFIX}"

    def _write(self, block_hash: BlockHash, block: torch.Tensor) -> None:
        payload = block.contiguous().view(torch.uint8).numpy().tobytes()
        header = _HEADER.pack(_MAGIC, block_hash, len(payload), xxhash.xxh3_64_intdigest(payload))
        path = self._path(block_hash)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)

    def _read(self, block_hash: BlockHash) -> torch.Tensor:
        try:
            raw = self._path(block_hash).read_bytes()
        except OSError as e:
            raise CorruptBlock(f"block {block_hash:016x}: {e}") from None
        if len(raw) != self.file_bytes:
            raise CorruptBlock(f"block {block_hash:016x}: {len(raw)} bytes, expected {self.file_bytes}")
        magic, stored_hash, nbytes, digest = _HEADER.unpack_from(raw)
        payload = memoryview(raw)[_HEADER.size :]
        if magic != _MAGIC or stored_hash != block_hash or nbytes != self.payload_bytes:
            raise CorruptBlock(f"block {block_hash:016x}: the header names another block")
        if xxhash.xxh3_64_intdigest(payload) != digest:
            raise CorruptBlock(f"block {block_hash:016x}: the payload's checksum does not match")
        layout = self.layout
        shape = (layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return data.view(getattr(torch, layout.dtype)).view(shape)


def _hash_of(path: Path) -> BlockHash | None:
    try:
        return BlockHash(int(path.stem, 16))
    except ValueError:
        return None


def known_namespaces(root: Path) -> Iterator[KVLayout]:
    """The layouts a previous run left blocks of under root."""
    if not root.is_dir():
        return
    for directory in sorted(root.glob("ns-*")):
        try:
            layout = KVLayout(**json.loads((directory / "layout.json").read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if namespace_dir(root, layout) == directory:
            yield layout
