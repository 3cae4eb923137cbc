"""Decoding requests' block tables kept as numpy rows between steps, so a step's table is one gather.

Building a batch's (rows, width) int32 table from each request's block_ids list every step
converted every block id of every row from a Python int again (~75 µs a step at batch 64 and 1k
tokens of context, on the host while the device waits). Here each request keeps a row of a
persistent store; a step writes only the ids appended since the last step (a decode adds a block
every block_size steps) and gathers its rows with one fancy index.

A request's block_ids list only ever grows in place (KVManager.grow) or is replaced by another
list (admission, release, a reservation taken), never changes an id in place: a row remembers the
list it copied (holding it, so its identity cannot be reused) and how much of it, and is rewritten
whole when the list is another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.ids import BlockId
from engine.request import Request

_MIN_ROWS = 64
_MIN_WIDTH = 64


@dataclass(slots=True)
class _Row:
    index: int  # the row of the store
    source: list[BlockId]  # the block_ids list copied (the same object, so identity tells a new list)
    filled: int  # how many of its ids are in the row


class BlockTables:
    def __init__(self) -> None:
        self._store = np.zeros((_MIN_ROWS, _MIN_WIDTH), dtype=np.int32)
        self._rows: dict[Request, _Row] = {}
        self._free: list[int] = list(range(_MIN_ROWS - 1, -1, -1))

    def table(self, requests: list[Request]) -> tuple[np.ndarray, int]:
        """((len(requests), width) int32 rows of block ids, zero-padded; width): the widest row's length."""
        rows = self._rows
        index: list[int] = []
        width = 1
        for r in requests:
            blocks = r.block_ids
            n = len(blocks)
            row = rows.get(r)
            if row is None:
                row = self._add(r)
            if row.source is not blocks or row.filled > n:
                self._rewrite(row, blocks)
            elif row.filled < n:
                self._extend(row, blocks)
            index.append(row.index)
            width = max(width, n)
        if len(rows) > 2 * len(requests) + _MIN_ROWS:
            self._forget_all_but(requests)
        return self._store[index, :width], width

    def _add(self, request: Request) -> _Row:
        if not self._free:
            self._grow_rows()
        row = _Row(self._free.pop(), [], 0)
        self._rows[request] = row
        return row

    def _rewrite(self, row: _Row, blocks: list[BlockId]) -> None:
        self._fit_width(len(blocks))
        line = self._store[row.index]
        line[: len(blocks)] = blocks
        line[len(blocks) : max(row.filled, len(blocks))] = 0
        row.source, row.filled = blocks, len(blocks)

    def _extend(self, row: _Row, blocks: list[BlockId]) -> None:
        n = len(blocks)
        self._fit_width(n)
        if n - row.filled == 1:
            self._store[row.index, row.filled] = blocks[-1]
        else:
            self._store[row.index, row.filled : n] = blocks[row.filled :]
        row.filled = n

    def _fit_width(self, width: int) -> None:
        if width > self._store.shape[1]:
            wider = np.zeros((self._store.shape[0], max(width, 2 * self._store.shape[1])), dtype=np.int32)
            wider[:, : self._store.shape[1]] = self._store
            self._store = wider

    def _grow_rows(self) -> None:
        old = self._store.shape[0]
        taller = np.zeros((2 * old, self._store.shape[1]), dtype=np.int32)
        taller[:old] = self._store
        self._store = taller
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def _forget_all_but(self, keep: list[Request]) -> None:
        """Rows of requests that no longer decode go back (they may have finished long ago)."""
        kept = {r: self._rows[r] for r in keep}
        for request, row in self._rows.items():
            if request not in kept:
                self._store[row.index, : row.filled] = 0
                self._free.append(row.index)
        self._rows = kept
