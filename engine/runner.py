"""The model runner: turns a BatchPlan into tensors, runs the model, returns the rows to sample.

Owns the model and the KV cache tensors. Knows nothing of sampling parameters or finishing.
Export hooks fire here: a request whose last prompt chunk is in this step hands each layer to its
KVExportSink right after the model finishes that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.batcher import ScheduledChunk
from engine.cuda_graphs import DecodeGraphs
from engine.model import LlamaModel


@dataclass(slots=True)
class ForwardInputs:
    input_ids: torch.Tensor  # (tokens,) int64
    positions: torch.Tensor  # (tokens,) int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # (sampled,) int64: the last row of each completing chunk
    order: list[ScheduledChunk]  # chunks in row order (decodes first)


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_caches: list[torch.Tensor], block_size: int, graphs: DecodeGraphs | None = None
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = kv_caches[0].device
        self.graphs = graphs

    def prepare(self, chunks: list[ScheduledChunk]) -> ForwardInputs:
        order = [c for c in chunks if c.num_new_tokens == 1] + [c for c in chunks if c.num_new_tokens > 1]
        num_decodes = sum(1 for c in order if c.num_new_tokens == 1)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        prefills: list[PrefillSpan] = []
        bs = self.block_size
        for chunk in order:
            r, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_new_tokens
            row0 = len(ids)
            ids += r.token_ids[start:end]
            positions += range(start, end)
            slots += [r.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            if chunk.completes:
                logits_rows.append(len(ids) - 1)
            if chunk.num_new_tokens > 1:
                blocks = torch.tensor(r.block_ids[: -(-end // bs)], dtype=torch.int64, device=self.device)
                prefills.append(PrefillSpan(row0, chunk.num_new_tokens, end, blocks))
        tables, lens = self._decode_tables(order[:num_decodes])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=num_decodes,
            decode_block_tables=tables,
            decode_context_lens=lens,
            prefills=prefills,
        )
        return ForwardInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            order=order,
        )

    def _decode_tables(self, decodes: list[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not decodes:
            return None, None
        width = max(len(c.request.block_ids) for c in decodes)
        table = [c.request.block_ids + [0] * (width - len(c.request.block_ids)) for c in decodes]
        lens = [c.request.num_computed_tokens + 1 for c in decodes]
        return (
            torch.tensor(table, dtype=torch.int32, device=self.device),
            torch.tensor(lens, dtype=torch.int32, device=self.device),
        )

    @torch.inference_mode()
    def execute(self, inputs: ForwardInputs) -> torch.Tensor:
        """Run one step; returns logits (sampled rows, vocab) float32 in inputs.order's completing order."""
        exporting = [c for c in inputs.order if c.completes and c.request.kv_export is not None]
        meta = inputs.meta
        decode_only = not meta.prefills and len(inputs.logits_rows) == meta.num_decodes
        if self.graphs is not None and decode_only and not exporting and self.graphs.can_run(meta.num_decodes):
            assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
            return self.graphs.run(
                inputs.input_ids, inputs.positions, meta.slot_mapping, meta.decode_block_tables,
                meta.decode_context_lens,
            )

        def on_layer_done(layer: int) -> None:
            for chunk in exporting:
                r = chunk.request
                assert r.kv_export is not None
                r.kv_export.push_layer(layer, self.kv_caches[layer], list(r.block_ids), r.num_tokens)

        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, on_layer_done if exporting else None
        )
        return self.model.logits(hidden[inputs.logits_rows])
