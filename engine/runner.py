"""The model runner: turns a Batch into tensors, runs the model, returns the rows to sample.

Owns the model and the KV cache tensors. Knows nothing of sampling parameters or finishing.
Export hooks fire here: a request whose last prompt chunk is in this step hands each layer to its
KVExportSink right after the model finishes that layer.

A step's inputs are built on the host as numpy arrays and reach the device in one copy from pinned
memory, queued without waiting (engine.uploader): a torch.tensor(list, device=...) per input would
cost a blocking copy each, and each blocking call is a point where the step thread must win the
GIL back from the service's event loop. The decodes' block tables are kept between steps
(engine.block_tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.batcher import ScheduledChunk
from engine.block_tables import BlockTables
from engine.cuda_graphs import CaptureReport, DecodeGraphs
from engine.model import LlamaModel
from engine.piecewise import PiecewiseGraphs
from engine.request import Request
from engine.step_timer import StepKind
from engine.uploader import Uploader
from kernels.cpu_native import NativeDecodeAttention


@dataclass(slots=True)
class ForwardInputs:
    input_ids: torch.Tensor  # (tokens,) int64
    positions: torch.Tensor  # (tokens,) int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # (sampled,) int64: the last row of each completing chunk
    order: list[ScheduledChunk]  # chunks in row order (decodes first)


def chunk_slots(block_ids: Sequence[int], start: int, end: int, block_size: int) -> np.ndarray:
    """(end - start,) int64: the cache slot of each position in [start, end)."""
    first, last = start // block_size, -(-end // block_size)
    blocks = np.asarray(block_ids[first:last], dtype=np.int64)
    slots = (blocks[:, None] * block_size + np.arange(block_size, dtype=np.int64)).ravel()
    offset = start - first * block_size
    return slots[offset : offset + end - start]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[torch.Tensor],
        block_size: int,
        graphs: DecodeGraphs | None = None,
        pieces: PiecewiseGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = kv_caches[0].device
        self.graphs = graphs  # decode-only steps
        self.pieces = pieces  # every other step, when it fits a bucket
        self.last_kind = StepKind.EAGER_DECODE  # how the latest execute() ran
        self.upload = Uploader(self.device)
        self.tables = BlockTables()  # the decodes' block tables, kept between steps
        self.cpu_attention: NativeDecodeAttention | None = None  # CPU decodes through the C kernel when set

    def capture_graphs(
        self, num_blocks: int, max_batch: int, max_width: int, piecewise_tokens: int | None
    ) -> list[CaptureReport]:
        """Every CUDA graph the runner will replay, now, while no other thread of the process can
        touch the device (engine/cuda_graphs.py says why): decode graphs up to `max_batch` rows of
        `max_width` blocks (none when 0), and pieces up to `piecewise_tokens` (none when None)."""
        reports = []
        if max_batch > 0:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, num_blocks, max_batch, max_width)
            reports.append(self.graphs.capture_all())
        if piecewise_tokens is not None:
            self.pieces = PiecewiseGraphs(self.model, self.kv_caches, piecewise_tokens)
            reports.append(self.pieces.capture_all())
        return reports

    def prepare(self, chunks: list[ScheduledChunk]) -> ForwardInputs:
        decodes = [c for c in chunks if c.num_new_tokens == 1]
        order = decodes + [c for c in chunks if c.num_new_tokens > 1]
        nd, bs = len(decodes), self.block_size
        # One-token rows as plain lists: numpy's per-call cost on 64 tiny arrays was ~1.5 ms a step.
        requests = [c.request for c in decodes]
        pos = [r.num_computed_tokens for r in requests]
        ids = [np.asarray([r.token_ids[p] for r, p in zip(requests, pos, strict=True)], dtype=np.int64)]
        positions = [np.asarray(pos, dtype=np.int64)]
        table, lens = self._decode_table(requests, positions[0])
        slots = [table[np.arange(nd), positions[0] // bs].astype(np.int64) * bs + positions[0] % bs]
        logits_rows = [i for i, (r, p) in enumerate(zip(requests, pos, strict=True)) if p + 1 == len(r.token_ids)]
        span_blocks: list[np.ndarray] = []
        spans: list[tuple[int, int, int]] = []  # (row0, num_new, end) of each prefill chunk
        row = nd
        for chunk in order[nd:]:
            r, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_new_tokens
            ids.append(np.asarray(r.token_ids[start:end], dtype=np.int64))
            positions.append(np.arange(start, end, dtype=np.int64))
            slots.append(chunk_slots(r.block_ids, start, end, bs))
            spans.append((row, chunk.num_new_tokens, end))
            span_blocks.append(np.asarray(r.block_ids[: -(-end // bs)], dtype=np.int64))
            row += chunk.num_new_tokens
            if chunk.completes:
                logits_rows.append(row - 1)
        # Per chunk, for the CUDA prefill kernel (kernels/paged_prefill.py): row0, n, ctx, first block entry.
        offsets = np.cumsum([0, *(len(b) for b in span_blocks)], dtype=np.int64)[:-1]
        info = np.asarray([(r0, n, end, o) for (r0, n, end), o in zip(spans, offsets, strict=True)], dtype=np.int64)
        flat = np.concatenate(
            [*ids, *positions, *slots, np.asarray(logits_rows, dtype=np.int64), info.ravel(), *span_blocks]
        )
        dev64, tables, lens_t = self.upload(flat, table, lens)
        sizes = [row, row, row, len(logits_rows), info.size]
        parts = _split(dev64, [*sizes, flat.size - sum(sizes)])
        input_ids, positions_t, slot_mapping, rows_t, info_t, all_blocks = parts
        blocks = _split(all_blocks, [len(b) for b in span_blocks])
        prefills = [PrefillSpan(r0, n, end, b) for (r0, n, end), b in zip(spans, blocks, strict=True)]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=nd,
            decode_block_tables=tables if nd else None,
            decode_context_lens=lens_t if nd else None,
            prefills=prefills,
            cpu_native=self.cpu_attention,
            prefill_info=info_t.view(-1, 4) if spans else None,
            prefill_blocks=all_blocks,
            prefill_max_new=max((n for _, n, _ in spans), default=0),
        )
        return ForwardInputs(input_ids=input_ids, positions=positions_t, meta=meta, logits_rows=rows_t, order=order)

    def _decode_table(self, requests: list[Request], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The decodes' (rows, width) block table and (rows,) context lengths (the new token's included)."""
        if not requests:
            return np.zeros((0, 1), dtype=np.int32), np.zeros(0, dtype=np.int32)
        table, _ = self.tables.table(requests)
        return table, (positions + 1).astype(np.int32)

    @torch.inference_mode()
    def execute(self, inputs: ForwardInputs) -> torch.Tensor:
        """Run one step; returns logits (sampled rows, vocab) float32 in inputs.order's completing order."""
        exporting = [c for c in inputs.order if c.request.kv_export is not None and c.completes]
        meta = inputs.meta
        decode_only = not meta.prefills and len(inputs.logits_rows) == meta.num_decodes
        self.last_kind = StepKind.EAGER_DECODE if decode_only else StepKind.MIXED
        if self.graphs is not None and decode_only and not exporting:
            tables, lens = meta.decode_block_tables, meta.decode_context_lens
            assert tables is not None and lens is not None
            if self.graphs.can_run(meta.num_decodes, tables.shape[1]):
                self.last_kind = StepKind.GRAPH
                return self.graphs.run(inputs.input_ids, inputs.positions, meta.slot_mapping, tables, lens)

        def on_layer_done(layer: int) -> None:
            for chunk in exporting:
                r = chunk.request
                assert r.kv_export is not None
                r.kv_export.push_layer(layer, self.kv_caches[layer], list(r.block_ids), r.num_tokens)

        hook = on_layer_done if exporting else None
        if self.pieces is not None and self.pieces.can_run(inputs.input_ids.numel()):
            self.last_kind = StepKind.PIECEWISE
            hidden = self.pieces.run(inputs.input_ids, inputs.positions, meta, hook)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta, hook)
        return self.model.logits(hidden[inputs.logits_rows])


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, at = [], 0
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out
