"""What a prefill or decode worker tells about itself: Prometheus metrics, the spans of the
phases it runs, and the KV transport's figures (it is the transport's TransferObserver).

The servicers measure; this turns their measurements into metrics and spans, so they stay thin.
Spans are recorded when a phase ends, with its real start and end (services/telemetry/spans.py).
A transfer into this worker (direction recv) happens on the transport's thread, outside any
call: its span's parent is the trace context its ticket carries (Ticket.traceparent, set when the
ticket was reserved), so it still joins the request's trace.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.engine import EngineStats
from kvtransfer.errors import TransferFailed
from kvtransfer.telemetry import Direction, TransferStats
from kvtransfer.ticket import Ticket
from services.telemetry.metrics import PREFIX, REQUEST_BUCKETS, counter, gauge, histogram
from services.telemetry.spans import Attr, Attributes, SpanName, context_of, record
from services.telemetry.transfers import TransferMetrics
from services.worker.store_client import StoreCounters

if TYPE_CHECKING:
    from kvtransfer.transport import KVTransport

log = structlog.get_logger(__name__)
_EXPECTED_MEMORY = 4096  # tickets whose trace context is kept until their transfer ends


@dataclass(frozen=True)
class PrefillTimes:
    """One prompt computed here, as time.monotonic() readings: the call arrived, compute began,
    the first token came out."""

    arrived: float
    computing: float
    first_token: float


@dataclass(frozen=True)
class DecodeTimes:
    """One decode stream here: the call arrived, the ticket's KV had landed (None: this worker
    prefilled the prompt itself), the first token and the last came out."""

    arrived: float
    kv_landed: float | None
    first_token: float
    last_token: float


class WorkerTelemetry:
    def __init__(self, worker_id: str, transport_name: str, num_layers: int) -> None:
        self.worker_id = worker_id
        self.transport_name = transport_name  # the UCX transports allowed (tcp, cuda_ipc, ...)
        self.num_layers = num_layers
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = gauge(r, "num_requests_running", "Requests in the engine's running batch")
        self.waiting = gauge(r, "num_requests_waiting", "Requests waiting in the engine (KV imports included)")
        self.kv_usage = gauge(r, "kv_cache_usage_perc", "Fraction of KV blocks in use, 1 = full")
        self.cache_queries = counter(r, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.cache_hits = counter(r, "prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.queue_time = histogram(r, "request_queue_time_seconds", "Time in the engine's queue", REQUEST_BUCKETS)
        self.prefill_time = histogram(r, "request_prefill_time_seconds", "Prompt compute time", REQUEST_BUCKETS)
        self.transfers = TransferMetrics(r)
        self._expected: OrderedDict[str, str] = OrderedDict()  # ticket id -> traceparent
        self._lock = threading.Lock()  # the transport's thread and the event loop both use _expected

    # -- load and requests (the event loop) -------------------------------------------------------

    def load(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(1 - stats.num_free_blocks / stats.num_blocks if stats.num_blocks else 0.0)

    def prefilled(self, times: PrefillTimes, prompt_tokens: int, cached_tokens: int, request_id: str) -> None:
        """A prompt this worker computed (a prefill worker's, or a decode worker's local prefill)."""
        self.cache_queries.inc(prompt_tokens)
        self.cache_hits.inc(cached_tokens)
        self.queue_time.observe(times.computing - times.arrived)
        self.prefill_time.observe(times.first_token - times.computing)
        common = {Attr.REQUEST_ID: request_id, Attr.WORKER_ID: self.worker_id}
        record(SpanName.PREFILL_QUEUE, times.arrived, times.computing, common)
        computed = {Attr.COMPUTED_TOKENS: prompt_tokens - cached_tokens, Attr.CACHED_TOKENS: cached_tokens}
        record(SpanName.PREFILL_COMPUTE, times.computing, times.first_token, {**common, **computed})
        log.debug("prefilled", prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                  ms=round((times.first_token - times.computing) * 1000, 2))  # fmt: skip

    def pushed(self, stats: TransferStats, computed: float, done: float, request_id: str) -> None:
        """The push of a prefill's KV ended at `done`; compute had ended at `computed`."""
        exposed = max(0.0, done - computed)
        log.debug("kv pushed", bytes=stats.bytes, gbps=round(stats.gbps, 3), exposed_ms=round(exposed * 1000, 2))
        record(SpanName.KV_TRANSFER, done - stats.seconds, done, {
            **self._transfer_attributes(stats), Attr.REQUEST_ID: request_id,
            Attr.KV_EXPOSED_MS: exposed * 1000, Attr.KV_HIDDEN_MS: max(0.0, stats.seconds - exposed) * 1000,
        })  # fmt: skip

    def decoded(self, times: DecodeTimes, num_tokens: int, request_id: str) -> None:
        """A decode stream ended; num_tokens: the tokens this worker generated for it."""
        common = {Attr.REQUEST_ID: request_id, Attr.WORKER_ID: self.worker_id}
        if times.kv_landed is not None:
            ready = min(max(times.arrived, times.kv_landed), times.first_token)
            record(SpanName.DECODE_WAIT_KV, times.arrived, ready, common)
            record(SpanName.DECODE_FIRST_STEP, ready, times.first_token, common)
        tpot_ms = (times.last_token - times.first_token) / (num_tokens - 1) * 1000 if num_tokens > 1 else 0.0
        attributes: Attributes = {**common, Attr.DECODE_TOKENS: num_tokens, Attr.TPOT_MS: tpot_ms}
        record(SpanName.DECODE_STREAM, times.first_token, times.last_token, attributes)
        log.debug("stream finished", tokens=num_tokens, tpot_ms=round(tpot_ms, 2))

    def expecting(self, ticket: Ticket) -> None:
        """A ticket was reserved here: its transfer's span will join the trace it names."""
        with self._lock:
            self._expected[ticket.ticket_id] = ticket.traceparent
            while len(self._expected) > _EXPECTED_MEMORY:
                self._expected.popitem(last=False)

    # -- the KV transport (its thread): TransferObserver ------------------------------------------

    def on_complete(self, stats: TransferStats) -> None:
        self.transfers.on_complete(stats)
        if stats.direction is Direction.RECV:
            with self._lock:
                parent = self._expected.pop(stats.ticket, "")
            now = time.monotonic()
            record(SpanName.KV_TRANSFER, now - stats.seconds, now, self._transfer_attributes(stats), context_of(parent))

    def on_failure(self, error: TransferFailed, direction: Direction) -> None:
        self.transfers.on_failure(error, direction)
        if direction is Direction.RECV:
            with self._lock:
                self._expected.pop(error.ticket, None)

    def _transfer_attributes(self, stats: TransferStats) -> dict[str, str | int | float]:
        return {
            Attr.KV_DIRECTION: stats.direction.value, Attr.KV_TICKET: stats.ticket, Attr.KV_PEER: stats.peer,
            Attr.KV_BYTES: stats.bytes, Attr.KV_SECONDS: stats.seconds, Attr.KV_GBPS: stats.gbps,
            Attr.KV_TRANSPORT: self.transport_name, Attr.KV_LAYERS: self.num_layers, Attr.WORKER_ID: self.worker_id,
        }  # fmt: skip


class LandingClock:
    """When a ticket's KV had all landed: the moment its import's future resolved."""

    def __init__(self, landed: concurrent.futures.Future[TransferStats]) -> None:
        self.at: float | None = time.monotonic() if landed.done() else None
        if self.at is None:
            landed.add_done_callback(self._landed)

    def _landed(self, _future: concurrent.futures.Future[TransferStats]) -> None:
        self.at = time.monotonic()


_STORE_COUNTERS = {  # StoreCounters field -> what it counts
    "fetches": "Prefix fetches from the KV store that landed",
    "fetched_blocks": "Blocks fetched from the KV store",
    "fetch_failures": "Prefix fetches that failed or timed out (the tokens were computed)",
    "fetches_skipped": "Store hits computed instead: the fetch was predicted slower than computing",
    "fetch_skipped_blocks": "Blocks the store held of the prompts computed instead",
    "fetch_probes": "Small fetches from a store judged slower, to measure it again",
    "offered_blocks": "Blocks this worker pushed to the KV store",
    "offer_dropped_blocks": "Finished blocks not offered to the store: its backlog of offers was full",
}


class StoreUseMetrics(Collector):
    """This worker's use of the KV store (StoreCounters, plain ints the event loop counts), read at
    scrape time."""

    def __init__(self, counters: StoreCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for name, doc in _STORE_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}worker_kvstore_{name}", doc, value=getattr(self._counters, name))


class KVConnectionMetrics(Collector):
    """The KV connections this worker dialed (to the peers it pushes to), read at scrape time: how
    many are open now, how many were ever dialed, and how many of those were opened ahead of any
    ticket (a dial a ticket made instead is one its request waited for)."""

    def __init__(self, transport: KVTransport) -> None:
        self._transport = transport

    def collect(self) -> Iterator[Metric]:
        transport = self._transport
        yield GaugeMetricFamily(
            f"{PREFIX}worker_kv_peer_connections", "KV connections this worker dialed that are open now",
            value=len(transport.peers),
        )
        dials = transport.dials
        yield CounterMetricFamily(f"{PREFIX}worker_kv_dials", "KV connections this worker dialed", value=dials)
        yield CounterMetricFamily(
            f"{PREFIX}worker_kv_preconnects", "KV connections opened ahead of any ticket (kv_peers)",
            value=transport.preconnected,
        )
