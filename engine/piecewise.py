"""CUDA graphs for the steps a whole-model graph cannot take: prefill chunks in the batch.

Attention in such a step depends on each chunk's length and cached prefix, so the step cannot be
captured once for all steps; everything else in a layer (norms, projections, rotary, MLP,
residuals) depends only on the number of tokens. So each token-count bucket (up to 768 tokens:
larger steps keep the device busy op by op) gets num_layers + 1 captured pieces — embedding to
the first layer's q/k/v, then from each layer's attention output to the next layer's q/k/v (the
last to the final norm) — and attention runs eagerly between them on the bucket's static buffers.
The host launches a few ops a layer instead of ~40: launched op by op, a step of 64 decodes and a
256-token chunk took ~47 ms of host time on an H100, about twice the device's. Rows past the
step's tokens are padding: the pieces compute on them, attention and the KV cache never see them.

Like DecodeGraphs, every piece is captured at construction, before any other thread exists.
Owns the buckets' static buffers and pieces; knows nothing of requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import torch

from engine.attention import AttentionMetadata, paged_attention
from engine.cuda_graphs import CaptureReport
from engine.model import DecoderLayer, LlamaModel
from kernels.layer_ops import use_fused

# Up to 768 tokens only. Measured on an H100 (8B shapes, 64 decodes plus one new prompt chunk,
# BENCHMARKS.md): with a 256- or 512-token chunk the pieces took 20 and 26 ms against 47 and 48 ms
# op by op; with a 1024- or 2048-token chunk op by op took 42 and 75 ms against 45 and 100 ms in
# pieces padded to 1280 and 3072 tokens: so many tokens keep the device busy on their own, and a
# bucket's padding then costs more than the launches it saves.
_TOKEN_BUCKETS = (64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 576, 640, 768)


@dataclass
class _Bucket:
    """Static buffers of one token count, and its pieces."""

    size: int
    input_ids: torch.Tensor  # (size,) int64
    positions: torch.Tensor  # (size,) int64
    h: torch.Tensor  # (size, hidden): the residual stream
    cos: torch.Tensor  # (size, head_dim)
    sin: torch.Tensor  # (size, head_dim)
    q: torch.Tensor  # (size, heads, head_dim), rotary applied
    k: torch.Tensor  # (size, kv_heads, head_dim), rotary applied
    v: torch.Tensor  # (size, kv_heads, head_dim)
    slots: torch.Tensor  # (size,) int64: each row's KV cache slot, -1 for padding (not written)
    attn: torch.Tensor  # (size, heads * head_dim): attention's output, written eagerly
    final: torch.Tensor  # (size, hidden): after the final norm
    pieces: list[Callable[[], None]] = field(default_factory=list)  # each replays its graph


class PiecewiseGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], max_tokens: int) -> None:
        self.model = model
        self.layers = cast(list[DecoderLayer], list(model.layers))
        self.kv_caches = kv_caches
        cover = [b for b in _TOKEN_BUCKETS if b >= max_tokens][:1]
        self.sizes = tuple(b for b in _TOKEN_BUCKETS if b < max_tokens) + tuple(cover)  # larger steps: op by op
        self.buckets: dict[int, _Bucket] = {}
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self.pool = torch.cuda.graph_pool_handle() if kv_caches[0].is_cuda else None
        # The pieces write each layer's K/V into the cache (the rotary kernel) where the layer-op
        # kernels run; elsewhere attention writes them, as the model's own forward does.
        self.kv_in_pieces = use_fused(kv_caches[0])

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1] and bool(self.buckets)

    @torch.inference_mode()
    def capture_all(self) -> CaptureReport:
        """Capture every piece of every bucket; call before any other thread touches the device."""
        assert not self.buckets, "capture_all runs once, before the engine serves"
        device = self.kv_caches[0].device
        cuda = device.type == "cuda"
        start, before = time.monotonic(), torch.cuda.memory_reserved(device) if cuda else 0
        for size in reversed(self.sizes):
            bucket = self._allocate(size)
            bucket.pieces = [self._capture(partial(self._head, bucket))]
            for i in range(len(self.layers)):
                bucket.pieces.append(self._capture(partial(self._tail, bucket, i)))
            self.buckets[size] = bucket
        if not cuda:
            return CaptureReport(0, time.monotonic() - start, 0)
        torch.cuda.synchronize(device)
        return CaptureReport(len(self._graphs), time.monotonic() - start, torch.cuda.memory_reserved(device) - before)

    def run(
        self,
        input_ids: torch.Tensor,  # (tokens,)
        positions: torch.Tensor,  # (tokens,)
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None,
    ) -> torch.Tensor:  # (tokens, hidden) after the final norm, valid until the next run
        n = input_ids.numel()
        b = self.buckets[next(s for s in self.sizes if s >= n)]
        b.input_ids[:n].copy_(input_ids)
        b.positions[:n].copy_(positions)
        b.slots[:n].copy_(meta.slot_mapping)
        if n < b.size:
            b.slots[n:].fill_(-1)
        b.pieces[0]()
        attn = b.attn[:n].view(n, *b.q.shape[1:])  # attention writes its output here, in place
        for i, layer in enumerate(self.layers):
            q, k, v, kv = b.q[:n], b.k[:n], b.v[:n], self.kv_caches[i]
            paged_attention(q, k, v, kv, meta, layer.self_attn.scale, out=attn, kv_written=self.kv_in_pieces)
            if on_layer_done is not None:
                on_layer_done(i)
            b.pieces[i + 1]()
        return b.final[:n]

    # -- the pieces ----------------------------------------------------------------------------

    def _head(self, b: _Bucket) -> None:
        h = self.model.embed_tokens(b.input_ids)
        cos, sin = self.model.rotary(b.positions, h.dtype)
        b.h.copy_(h)
        b.cos.copy_(cos)
        b.sin.copy_(sin)
        self._project(b, 0, self.layers[0].input_layernorm(b.h))

    def _tail(self, b: _Bucket, i: int) -> None:
        """Layer i from its attention output on, as DecoderLayer.forward does it, then layer i+1's
        q/k/v (or, after the last layer, the final norm). Each residual add is fused into the norm
        after it and updates b.h in place (one kernel on CUDA)."""
        layer = self.layers[i]
        normed, _ = layer.post_attention_layernorm.add(layer.self_attn.o_proj(b.attn), b.h, residual_out=b.h)
        mlp = layer.mlp(normed)
        if i + 1 < len(self.layers):
            normed, _ = self.layers[i + 1].input_layernorm.add(mlp, b.h, residual_out=b.h)
            self._project(b, i + 1, normed)
        else:
            self.model.norm.add(mlp, b.h, out=b.final, residual_out=b.h)

    def _project(self, b: _Bucket, i: int, normed: torch.Tensor) -> None:
        """Layer i's q, k, v, written straight into the bucket's buffers (and k, v into the cache
        where the layer-op kernels run: kv_in_pieces)."""
        cache = (self.kv_caches[i], b.slots) if self.kv_in_pieces else None
        self.layers[i].self_attn.project(normed, b.cos, b.sin, out=(b.q, b.k, b.v), cache=cache)

    def _allocate(self, size: int) -> _Bucket:
        cfg, emb = self.model.config, self.model.embed_tokens.weight
        dev, dtype = emb.device, emb.dtype

        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dt, device=dev)

        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return _Bucket(
            size, zeros(size, dt=torch.int64), zeros(size, dt=torch.int64), zeros(size, cfg.hidden_size),
            zeros(size, hd), zeros(size, hd), zeros(size, heads, hd), zeros(size, kv_heads, hd),
            zeros(size, kv_heads, hd), torch.full((size,), -1, dtype=torch.int64, device=dev),
            zeros(size, heads * hd), zeros(size, cfg.hidden_size),
        )  # fmt: skip

    def _capture(self, piece: Callable[[], None]) -> Callable[[], None]:
        """The piece's graph's replay; on a CPU (tests of the decomposition) the piece itself."""
        if not self.kv_caches[0].is_cuda:
            return piece
        stream = torch.cuda.Stream(self.kv_caches[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: pick the kernels, settle the allocator
            piece()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            piece()
        self._graphs.append(graph)
        return graph.replay
