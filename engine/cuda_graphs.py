"""CUDA graphs for decode-only steps, every one captured before the engine serves.

A decode step of an 8B model is ~1,300 small kernel launches; launched one by one from Python
they take longer than reading the weights. Capturing the step once per (batch size, block-table
width) bucket and replaying it removes that overhead. Rows past the real batch are padding: they
read and write only a scratch block that the block pool never hands out.

Why all at once, at construction (`capture_all`): a capture in CUDA's global mode fails if any
other thread of the process makes an unsafe CUDA call meanwhile — a worker's KV transport unpacks
arriving blocks and checks checksums on its own threads — and a capture that fails leaves the
caching allocator recording into the graph pool, so every later step fails too. Captured before
the worker starts its transport, no capture can ever overlap another thread's device work; a
batch without a graph (larger than the largest bucket) runs eagerly instead. The graphs share one
memory pool and are captured largest first, so the smaller ones reuse the larger ones' scratch.

Owns the static input buffers and the captured graphs; knows nothing of requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.model import LlamaModel

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_MIN_WIDTH = 16


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def _width_bucket(width: int) -> int:
    return max(_MIN_WIDTH, 1 << (width - 1).bit_length())


def width_buckets(max_width: int) -> tuple[int, ...]:
    """Every table width a graph is captured for: powers of two from 16 up to cover max_width."""
    widths = [_MIN_WIDTH]
    while widths[-1] < max_width:
        widths.append(widths[-1] * 2)
    return tuple(widths)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    table: torch.Tensor  # (max_batch, width) int32: the block tables this graph reads


@dataclass(frozen=True)
class CaptureReport:
    num_graphs: int
    seconds: float
    pool_bytes: int  # device memory the graphs' pool holds after capture


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[torch.Tensor],
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_width: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = tuple(b for b in _BATCH_BUCKETS if b <= max_batch)
        self.widths = width_buckets(max_width)
        dev = kv_caches[0].device
        n = self.sizes[-1] if self.sizes else 0
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=dev)  # every replay
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, batch: int, width: int) -> bool:
        return (_bucket(batch, self.sizes) or 0, _width_bucket(width)) in self.graphs

    @torch.inference_mode()
    def capture_all(self) -> CaptureReport:
        """Capture a graph for every (batch bucket, width bucket); call before any other thread
        touches the device, and only once."""
        assert not self.graphs, "capture_all runs once, before the engine serves"
        start = time.monotonic()
        before = torch.cuda.memory_reserved(self.input_ids.device)
        for width in reversed(self.widths):
            table = torch.full(
                (self.sizes[-1], width), self.scratch_block, dtype=torch.int32, device=self.input_ids.device
            )
            for size in reversed(self.sizes):
                self.graphs[(size, width)] = _Graph(self._capture(size, table), table)
        torch.cuda.synchronize(self.input_ids.device)
        pool = torch.cuda.memory_reserved(self.input_ids.device) - before
        return CaptureReport(len(self.graphs), time.monotonic() - start, pool)

    def run(
        self,
        input_ids: torch.Tensor,  # (batch,)
        positions: torch.Tensor,  # (batch,)
        slots: torch.Tensor,  # (batch,)
        tables: torch.Tensor,  # (batch, width) int32
        context_lens: torch.Tensor,  # (batch,) int32
    ) -> torch.Tensor:  # (batch, vocab) float32, valid until the next replay
        n, width = tables.shape
        size = _bucket(n, self.sizes)
        assert size is not None
        entry = self.graphs[(size, _width_bucket(width))]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.context_lens[:n].copy_(context_lens)
        entry.table[:n, :width].copy_(tables)
        if size > n:  # padding rows: one token in the scratch block
            self._pad(entry.table, n, size)
        entry.graph.replay()
        return self.logits[:n]

    def _pad(self, table: torch.Tensor, n: int, size: int) -> None:
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slots[n:size].fill_(self.scratch_block * self.block_size)
        self.context_lens[n:size].fill_(1)
        table[n:size, 0].fill_(self.scratch_block)

    def _forward(self, size: int, table: torch.Tensor) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decodes=size,
            decode_block_tables=table[:size],
            decode_context_lens=self.context_lens[:size],
            prefills=[],
        )
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        self.logits[:size].copy_(self.model.logits(hidden))

    def _capture(self, size: int, table: torch.Tensor) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream(self.input_ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: compile this launch's kernels, settle the allocator
            self._forward(size, table)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(size, table)
        return graph
