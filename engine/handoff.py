"""The two hand-off hooks between the engine and whoever moves KV (DESIGN §4).

Sender side — a prefill engine is given a `KVExportSink` with a request. As soon as the last
prompt chunk of that request has written layer i's KV, the engine calls
`sink.push_layer(i, kv_cache[i], block_ids, num_tokens)` on its step thread, *before* computing
layer i+1, so the transport can move layer i while layer i+1 is computed. `push_layer` must not
wait on the network: it copies (packs) what it needs — on CUDA by work queued on the current
stream, so later writes to those blocks are ordered after the copy — and returns. After the last
layer the engine calls `sink.close()`; if the request is aborted first, `sink.cancel(reason)`.

Receiver side — a decode engine reserves blocks for a request's first N tokens
(`Engine.reserve`), someone writes those blocks, and the request is added with a `KVImport`
whose `done()` turns true when the last layer has landed. The batcher keeps the request out of
every batch until then; at that moment its computed-token count jumps to N. `error()` returning
an exception fails the request and frees its blocks; a request that ends while its import is
still pending cancels the import before its blocks are freed.

Prefix import — a worker that can get a leading part of a prompt's KV from elsewhere (a KV store)
holds the blocks its own prefix cache has for that part, plus blocks for the rest of it
(`Engine.reserve_prefix`); someone writes those, and the request is added with the KVImport as
above. Its computed-token count then jumps past the imported tokens and the request computes only
what follows. Unlike a hand-off the import is optional: if `error()` reports a failure, the
request gives its blocks back and is admitted as though it had none (its own cached prefix taken
again, the rest computed): it loses nothing but time, and holds no blocks it is not using.

Offering — `Engine.take_finished_chains()` names the full blocks finished requests left in the
prefix cache, and `Engine.export_blocks(hashes, sink)` pushes them through any KVExportSink while
they are still cached (between steps), so a worker can copy them to a KV store off the TTFT path.

Shared memory — a worker on its KV store's host maps the store's memory tier (kvtransfer/shm.py)
and moves blocks by copying, not over UCX: `Engine.import_blocks(request_id, block_ids, slabs,
slots)` copies host slots into the blocks a pending prefix import holds (between steps, queued on
the current stream on CUDA), and an offer's sink (kvtransfer.shm.SlabSink) copies exported blocks
into the store's slots (on a GPU at close(), all layers in one launch: a sink may copy a pushed
layer whenever it likes before close() returns, since the engine writes none of those blocks
until then). The KVImport protocol above is unchanged: the import is done once the
copy has completed and the store confirmed its slots were held all along.

The engine knows nothing of tickets, peers or UCX: kvtransfer implements these protocols.
`engine.inprocess_link` is the in-process implementation the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: engine.request (and the client library through it) stays torch-free
    import torch


class KVExportSink(Protocol):
    def push_layer(
        self,
        layer: int,
        kv_layer: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        block_ids: Sequence[int],
        num_tokens: int,
    ) -> None:
        """Layer `layer` of the request's first `num_tokens` tokens is final in `block_ids`."""
        ...

    def close(self) -> None:
        """Every layer has been pushed."""
        ...

    def cancel(self, reason: str) -> None:
        """The request ended before every layer was pushed (abort, error)."""
        ...


class KVImport(Protocol):
    def done(self) -> bool:
        """True once every layer has landed in the reserved blocks."""
        ...

    def error(self) -> BaseException | None:
        """The failure that ended the import, or None while it is pending or done."""
        ...

    def cancel(self, reason: str) -> None:
        """The request ended before the import did (abort, refusal): stop it. Once this returns,
        nothing writes the reserved blocks, so the engine may free them."""
        ...
