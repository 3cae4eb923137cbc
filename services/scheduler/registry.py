"""Which workers exist, what they last reported, and whether they may be placed on.

A worker registers when it starts and reports its load periodically; one whose reports stop for
`stale_after_s`, or that a call found dead, is stale and takes no new requests until it reports
again; one that reports DRAINING takes none until it reports SERVING. Re-registering under the
same id replaces the old entry (a restarted worker). Each worker's reports also carry its prefix
cache's changes (KVEvents), which the registry applies to the prefix index (prefix_index.py); a
gap in the reports' sequence numbers asks the worker for a snapshot. The reports' step and push
samples calibrate the worker's predictors (predictor.py).

KV stores register and report the same way (their blocks go to the same index, per layout); the
live store's address is what workers are told to fill and fetch from. Each report's answer also
names the KV listeners the worker may push to (kv_peers), so that it connects to them before a
request needs the connection.

The channel to each worker is built here, from the scheduler's ChannelConfig (TLS and limits); a
simulated worker (pdmesh sim) has none. Time is the registry's `clock`: the simulator's virtual one
there.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from engine.kv_layout import KVLayout
from pdmesh.channel import channel
from pdmesh.config import ChannelConfig
from pdmesh.enums import WorkerHealth, WorkerRole
from services.scheduler.predictor import Calibration, CalibrationSettings, WorkerPredictors
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.reports import LoadReport, StoreInfo, StoreReport, WorkerInfo

_PEERS_TTL_S = 0.25  # how long kv_peers may keep naming a decode worker that fell silent


@dataclass(eq=False)
class Worker:
    info: WorkerInfo
    channel: grpc.aio.Channel | None  # None: a simulated worker, never called
    predictors: WorkerPredictors
    registered_at: float = 0.0
    last_seen: float = 0.0
    load: LoadReport | None = None
    draining: bool = False
    dead: bool = False  # a call found it unreachable; cleared by its next report
    assigned: int = 0  # requests this scheduler has on it now
    queued_prefill_tokens: int = 0  # prompt tokens it computes for requests placed here, not yet prefilled

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> WorkerRole | None:
        return self.info.role

    @property
    def busy(self) -> int:
        """Requests on it: its last report's running and waiting, or what this scheduler placed since."""
        reported = self.load.num_running_requests + self.load.num_waiting_requests if self.load else 0
        return max(reported, self.assigned)

    @property
    def free_fraction(self) -> float:
        """Its KV pool's free share at the last report (0 before any)."""
        if self.load is None:
            return 0.0
        return self.load.num_kv_blocks_free / max(1, self.load.num_kv_blocks_total)


@dataclass(eq=False)
class Store:
    info: StoreInfo
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    report: StoreReport | None = None

    @property
    def store_id(self) -> str:
        return self.info.store_id

    @property
    def draining(self) -> bool:
        return self.report is not None and self.report.health is WorkerHealth.DRAINING


class Registry:
    def __init__(
        self, stale_after_s: float, channel_config: ChannelConfig | None, calibration: Calibration | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.stale_after_s = stale_after_s
        self.channel_config = channel_config  # None: workers get no channel (the simulator)
        self.calibration = calibration or Calibration(CalibrationSettings())
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self.stores: dict[str, Store] = {}
        self.index = PrefixIndex(clock)
        self.on_add: list[Callable[[Worker], None]] = []  # told of every worker added (the ledger)
        self._layouts: Counter[KVLayout] = Counter()
        # kv_peers' decode listeners per layout, asked in every prefill worker's report: rebuilt when a
        # worker joins, drains, dies or comes back (`_changes`), else at most every _PEERS_TTL_S (a
        # worker that falls silent leaves the list that much later), not a scan of every worker per
        # report — with 1,000 workers reporting every 500 ms that scan was ~2M checks a second.
        self._changes = 0
        self._devices: dict[str, set[str]] = {}  # device_id -> the workers on it (WorkerInfo.device_id)
        self._decode_listeners: dict[KVLayout, tuple[int, float, list[str]]] = {}

    async def register(self, info: WorkerInfo) -> Worker:
        """A new or restarted worker. At the same address the old channel is kept: a worker
        re-registers after any lost report, and its streams in flight must not be cut."""
        old = self.workers.get(info.worker_id)
        if old is not None and old.info.address == info.address and old.channel is not None:
            return self.add(info, old.channel)
        if old is not None and old.channel is not None:
            await old.channel.close()
        config = self.channel_config
        return self.add(info, None if config is None else channel(info.address, config))

    def add(self, info: WorkerInfo, worker_channel: grpc.aio.Channel | None) -> Worker:
        """Put a worker in the registry (replacing one of the same id). At the same address (the
        same machine) its predictors are kept: its calibration holds. The counts of requests
        assigned and of queued prefill tokens start again at zero: the flows in flight hold the old
        entry and settle their counts on it, and the worker's own reports say how busy it is
        (carried over, those counts would never come down)."""
        old = self.workers.pop(info.worker_id, None)
        if old is not None:
            self._devices.get(old.info.device_id, set()).discard(info.worker_id)
            self._layouts[old.info.kv_layout] -= 1
            if not self._layouts[old.info.kv_layout]:
                del self._layouts[old.info.kv_layout]
        now = self.clock()
        if old is not None and old.info.address == info.address:
            worker = Worker(info, worker_channel, old.predictors, now, now)
        else:
            worker = Worker(info, worker_channel, self.calibration.for_worker(info.device, info.model), now, now)
        self.workers[info.worker_id] = worker
        if info.device_id:
            self._devices.setdefault(info.device_id, set()).add(info.worker_id)
        self.index.forget(info.worker_id)  # its first report is a snapshot
        self._layouts[info.kv_layout] += 1
        self._changes += 1
        for listener in self.on_add:
            listener(worker)
        return worker

    @property
    def layouts(self) -> list[KVLayout]:
        """The KV layouts of the registered workers (usually one)."""
        return list(self._layouts)

    def report(self, load: LoadReport) -> tuple[bool, bool]:
        """Record a report: (known, snapshot_wanted). Unknown: it must register again. A snapshot
        is wanted when reports went missing, so the cached hashes may be wrong."""
        worker = self.workers.get(load.worker_id)
        if worker is None:
            return False, False
        missed = worker.load is not None and load.report_seq != worker.load.report_seq + 1
        was_live = not worker.draining and not self.is_stale(worker)
        worker.load = load
        worker.last_seen = self.clock()
        worker.draining = load.health is WorkerHealth.DRAINING
        worker.dead = False
        if was_live == worker.draining:  # it drained, or came back (from draining, silence or death)
            self._changes += 1
        worker.predictors.observe(load.step_samples, load.transfer_samples)
        if missed and not load.kv_events.snapshot:
            return True, True  # these changes follow ones never seen: wait for a snapshot
        self.index.apply(worker.worker_id, worker.info.kv_layout, load.kv_events)
        return True, False

    def register_store(self, info: StoreInfo) -> Store:
        """A new or restarted store; what the index knew of it is dropped (a snapshot follows)."""
        store = self.stores[info.store_id] = Store(info, self.clock(), self.clock())
        self._changes += 1
        self.index.forget(info.store_id)
        return store

    def report_store(self, report: StoreReport) -> tuple[bool, bool]:
        """Record a store's report: (known, snapshot_wanted), as for a worker's."""
        store = self.stores.get(report.store_id)
        if store is None:
            return False, False
        missed = store.report is not None and report.report_seq != store.report.report_seq + 1
        store.report, store.last_seen = report, self.clock()
        if missed and not all(events.snapshot for _, events in report.events):
            return True, True
        for layout, events in report.events:
            self.index.apply(store.store_id, layout, events)
        return True, False

    def live_store_ids(self) -> list[str]:
        store = self.live_store()
        return [store.store_id] if store is not None else []

    def live_store(self) -> Store | None:
        """The KV store workers should use: the most recently registered one that reports."""
        live = [s for s in self.stores.values() if not s.draining and not self._silent(s.last_seen)]
        return max(live, key=lambda s: s.registered_at, default=None)

    def store_health(self, store: Store) -> WorkerHealth:
        if self._silent(store.last_seen):
            return WorkerHealth.STALE
        return WorkerHealth.DRAINING if store.draining else WorkerHealth.SERVING

    def _silent(self, last_seen: float) -> bool:
        return self.clock() - last_seen > self.stale_after_s

    def is_stale(self, worker: Worker) -> bool:
        return worker.dead or self._silent(worker.last_seen)

    def health(self, worker: Worker) -> WorkerHealth:
        if self.is_stale(worker):
            return WorkerHealth.STALE
        return WorkerHealth.DRAINING if worker.draining else WorkerHealth.SERVING

    def live(self, role: WorkerRole, exclude: Iterable[Worker] = ()) -> list[Worker]:
        """Workers of `role` that may take a new request now."""
        skip = set(map(id, exclude))
        return [
            w for w in self.workers.values()
            if w.role is role and not w.draining and not self.is_stale(w) and id(w) not in skip
        ]  # fmt: skip

    def sharing(self, worker: Worker) -> list[Worker]:
        """The other workers on `worker`'s device (it time-slices them), dead ones left out; none for
        a worker that names no device. Sorted by id: forecasts never depend on registration order."""
        ids = self._devices.get(worker.info.device_id) if worker.info.device_id else None
        if not ids or len(ids) < 2:
            return []
        others = (self.workers[i] for i in sorted(ids) if i != worker.worker_id and i in self.workers)
        return [w for w in others if not w.dead]

    def kv_peers(self, worker_id: str) -> list[str]:
        """The KV listeners a worker may push to, which it connects to ahead of any ticket: for a
        prefill worker the live decode workers' of its layout (another layout would refuse it), for
        every worker the live store's (its offers). Empty for a worker this registry does not know."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return []
        peers = self._decode_listeners_of(worker.info.kv_layout) if worker.role is WorkerRole.PREFILL else []
        store = self.live_store()
        if store is not None and store.info.kv_transfer_address:
            peers.append(store.info.kv_transfer_address)
        return sorted(set(peers))

    def _decode_listeners_of(self, layout: KVLayout) -> list[str]:
        now = self.clock()
        cached = self._decode_listeners.get(layout)
        if cached is not None and cached[0] == self._changes and now - cached[1] < _PEERS_TTL_S:
            return list(cached[2])
        live = [w.info.kv_transfer_address for w in self.live(WorkerRole.DECODE) if w.info.kv_layout == layout]
        self._decode_listeners[layout] = (self._changes, now, live)
        return list(live)

    def mark_dead(self, worker: Worker) -> None:
        worker.dead = True
        self._changes += 1

    @property
    def max_model_len(self) -> int | None:
        lens = [w.info.capacity.max_model_len_tokens for w in self.workers.values() if not self.is_stale(w)]
        return min(lens) if lens else None

    async def close(self) -> None:
        for worker in self.workers.values():
            if worker.channel is not None:
                await worker.channel.close()

