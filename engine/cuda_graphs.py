"""CUDA graphs for decode-only steps.

A decode step of an 8B model is ~1,300 small kernel launches; launched one by one from Python
they take longer than reading the weights. Capturing the step once per (batch size, block-table
width) bucket and replaying it removes that overhead. Rows past the real batch are padding: they
read and write only a scratch block that the block pool never hands out.

Owns the static input buffers and the captured graphs; knows nothing of requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.model import LlamaModel

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def _width_bucket(width: int) -> int:
    return max(16, 1 << (width - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (batch, vocab) float32, written by every replay


class DecodeGraphs:
    def __init__(
        self, model: LlamaModel, kv_caches: list[torch.Tensor], block_size: int, scratch_block: int, max_batch: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = tuple(b for b in _BATCH_BUCKETS if b <= max_batch)
        dev = kv_caches[0].device
        n = self.sizes[-1] if self.sizes else 0
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables: dict[int, torch.Tensor] = {}  # width -> (max_batch, width) int32
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, batch: int) -> bool:
        return bool(self.sizes) and batch <= self.sizes[-1]

    def run(
        self,
        input_ids: torch.Tensor,  # (batch,)
        positions: torch.Tensor,  # (batch,)
        slots: torch.Tensor,  # (batch,)
        tables: torch.Tensor,  # (batch, width) int32
        context_lens: torch.Tensor,  # (batch,) int32
    ) -> torch.Tensor:  # (batch, vocab) float32
        n, width = tables.shape
        size = _bucket(n, self.sizes)
        assert size is not None
        wide = _width_bucket(width)
        table = self._table(wide)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.context_lens[:n].copy_(context_lens)
        table[:n, :width].copy_(tables)
        if size > n:  # padding rows: one token in the scratch block
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slots[n:size].fill_(self.scratch_block * self.block_size)
            self.context_lens[n:size].fill_(1)
            table[n:size, 0].fill_(self.scratch_block)
        key = (size, wide)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, table)
        entry = self.graphs[key]
        entry.graph.replay()
        return entry.logits[:n]

    def _table(self, width: int) -> torch.Tensor:
        if width not in self.tables:
            self.tables[width] = torch.full(
                (self.sizes[-1], width), self.scratch_block, dtype=torch.int32, device=self.input_ids.device
            )
        return self.tables[width]

    def _forward(self, size: int, table: torch.Tensor) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decodes=size,
            decode_block_tables=table[:size],
            decode_context_lens=self.context_lens[:size],
            prefills=[],
        )
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        return self.model.logits(hidden)

    def _capture(self, size: int, table: torch.Tensor) -> _Graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: compile kernels, settle the allocator
            for _ in range(2):
                self._forward(size, table)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, table)
        return _Graph(graph, logits)
