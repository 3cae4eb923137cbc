"""A prefill or decode worker process: engine, KV transport, gRPC service, load reports, and its
use of the KV store (prefixes fetched before prefill, finished blocks offered after).

Both roles run the same engine; they differ in which servicer they expose. Both transports
receive: a decode worker's tickets from prefill workers, either's prefixes from the KV store.
Told to stop (SIGTERM), a worker
first reports DRAINING, so the scheduler places nothing new on it, then finishes its calls in
flight and stops. A worker whose engine loses its device stops the same way by itself — its
requests have already failed with DeviceLost (UNAVAILABLE: the scheduler moves them) — and
serve_worker then raises DeviceLost, so that the process exits non-zero and its supervisor
starts a fresh one.

The KV listener closes last, and only once the prefill workers have heard that this one drains:
they dial the decode listeners the scheduler's answers to their load reports name, which keep
naming this worker until their first report after its DRAINING. A dial that reaches a UCX listener
while it is destroyed can crash the listening process (openucx/ucx#11087), so the transport
closes one report interval after the DRAINING report (no later than the drain itself when that
took longer). A worker whose device is lost does not tear UCX down at all: its process ends at
once with its exit code (pdmesh/cli.py), and the kernel closes the listener, which no dial can
race.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import structlog

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import DeviceLost
from kvtransfer.transport import KVTransport
from pdmesh.config import ENGINE_STOP_S, KV_CLOSE_S
from pdmesh.enums import WorkerRole
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, worker_pb2
from services.bootstrap import Server, ServicerBinding, serve
from services.decode.reservations import Reservations
from services.decode.servicer import DecodeServicer
from services.prefill.servicer import PrefillServicer
from services.telemetry.metrics import MetricsEndpoint
from services.worker.config import WorkerConfig
from services.worker.convert import load_report_to_pb, worker_info_to_pb
from services.worker.fetch_policy import FetchPolicy
from services.worker.load import SAMPLES_PER_REPORT, LoadSampler
from services.worker.offers import Offerer
from services.worker.prefix_fetch import PrefixFetcher
from services.worker.registry_client import Reporter
from services.worker.shared_memory import SharedMemoryLink
from services.worker.store_client import StoreClient
from services.worker.telemetry import KVConnectionMetrics, StoreUseMetrics, WorkerTelemetry

log = structlog.get_logger(__name__)

# Beyond one report interval after this worker's DRAINING report: a prefill worker's report
# answered after it is on its way back (a report's round trip, a loaded machine included).
_PEER_REPORT_SLACK_S = 0.25


async def serve_worker(config: WorkerConfig) -> None:
    engine_config = config.engine
    if config.gil_switch_interval_ms > 0:
        sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
    log.info("loading model", model=engine_config.model, device=engine_config.device, role=config.role.value)
    engine = await load_engine(engine_config)
    loop, device_lost = asyncio.get_running_loop(), asyncio.Event()

    def on_device_lost(_: DeviceLost) -> None:  # on the engine's step thread
        loop.call_soon_threadsafe(device_lost.set)

    async_engine = AsyncEngine(engine, on_device_lost, stream_interval=config.stream_interval)
    kv_config = config.transport()
    telemetry = WorkerTelemetry(config.id, kv_config.ucx_tls or "ucx default", engine.kv_layout.num_layers)
    metrics = MetricsEndpoint.start(telemetry.registry, config.telemetry)
    # Both roles receive: a decode worker its hand-offs, either one the prefixes it fetches.
    transport = KVTransport(engine.kv_layout, kv_config, engine.kv_caches, telemetry)
    await asyncio.to_thread(transport.start)
    store = StoreClient(
        engine.kv_layout, config.kvstore_lookup_timeout_ms / 1000, config.kvstore_offer_timeout_ms / 1000,
        config.channel,
    )  # fmt: skip
    layout = engine.kv_layout
    policy = FetchPolicy(config.fetch_settings(), layout.bytes_per_token * layout.block_size, layout.block_size)
    link = SharedMemoryLink(store, engine.kv_caches) if config.kvstore_shared_memory else None
    fetch_timeout_s = config.kvstore_fetch_timeout_ms / 1000
    fetcher = PrefixFetcher(async_engine, transport, store, layout, fetch_timeout_s, policy, link)
    offerer = Offerer(async_engine, transport, store, config.kvstore_offer_backlog_mib << 20, link)
    telemetry.registry.register(StoreUseMetrics(store.counters))
    telemetry.registry.register(KVConnectionMetrics(transport))
    decoding = config.role is WorkerRole.DECODE
    reservations = Reservations(async_engine, transport, config.id, config.lease_ms) if decoding else None
    reporter: Reporter | None = None

    def registered() -> bool:  # health SERVING: engine, KV listener and registration all done
        return reporter is not None and reporter.has_registered

    if reservations is not None:
        binding = ServicerBinding(
            DecodeServicer(async_engine, reservations, fetcher, config.id, telemetry),
            decode_pb2_grpc.add_DecodeServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["Decode"],
            ready=registered,
        )
    else:
        binding = ServicerBinding(
            PrefillServicer(async_engine, transport, fetcher, config.id, telemetry),
            prefill_pb2_grpc.add_PrefillServicer_to_server,
            prefill_pb2.DESCRIPTOR.services_by_name["Prefill"],
            ready=registered,
        )
    pushes = binding.servicer.pushes if isinstance(binding.servicer, PrefillServicer) else None

    sampler = LoadSampler(async_engine)

    async def load(snapshot: bool) -> worker_pb2.ReportLoadRequest:
        stats, events = await sampler.sample(snapshot)
        steps = sampler.take_steps()
        policy.compute.observe(steps)  # what computing a prompt costs here, against a fetch's time
        reserved = len(reservations) if reservations is not None else 0
        telemetry.load(stats)
        taken = pushes.take(SAMPLES_PER_REPORT) if pushes is not None else []
        return load_report_to_pb(stats, events, reserved, transport.num_in_flight, steps, taken)

    def on_store(address: str) -> None:  # from the reporter's task: on the loop
        store.point_at(address)
        if link is not None:
            link.prepare()  # mapped before the first fetch needs it

    async def on_ready(server: Server) -> None:
        nonlocal reporter
        info = worker_info_to_pb(config, engine, transport.address, server.port)
        on_peers = transport.preconnect if config.kv_preconnect else None
        reporter = Reporter(config.scheduler, info, load, config.channel, on_store=on_store, on_peers=on_peers)
        reporter.start()
        offerer.start()
        log.info("worker ready", worker_id=config.id, port=server.port, kv=transport.address)

    peers_told_at: float | None = None  # loop time when the prefill workers have all heard DRAINING

    async def on_drain() -> None:
        nonlocal peers_told_at
        if reporter is not None:
            reporter.draining = True
            await reporter.report_now()
            peers_told_at = loop.time() + reporter.interval + _PEER_REPORT_SLACK_S

    async def on_shutdown() -> None:
        if reporter is not None:
            await reporter.stop()
        await offerer.stop()
        await fetcher.close()
        if link is not None:
            await link.close()
        await store.close()
        if reservations is not None:
            await reservations.close()
        # A hung step: pdmesh up SIGKILLs STOP_MARGIN_S past the grace. A step thread still running
        # may still push layers, so its transport stays up until the process ends, as on a lost device.
        stopped = async_engine.shutdown(ENGINE_STOP_S)
        if async_engine.lost is None and stopped:  # a lost device leaves UCX to the process's end (module docstring)
            if peers_told_at is not None:
                await asyncio.sleep(max(0.0, peers_told_at - loop.time()))
            # A transport's thread that does not stop by then is left to the process's end (a daemon).
            await asyncio.to_thread(transport.close, KV_CLOSE_S)
        if metrics is not None:
            metrics.close()

    await serve(
        [binding], config.server, on_ready=on_ready, on_drain=on_drain, on_shutdown=on_shutdown, stop=device_lost
    )
    if async_engine.lost is not None:
        raise async_engine.lost


async def load_engine(config: EngineConfig) -> Engine:
    """Engine.from_config on a thread of its own that then ends, taking the OpenMP pool its
    loading started with it: a loader thread left in asyncio's executor would keep that pool
    beside the step thread's (engine.cpu_threads.one_thread_here says why that matters)."""
    with ThreadPoolExecutor(1, thread_name_prefix="engine-load") as loader:
        return await asyncio.get_running_loop().run_in_executor(loader, Engine.from_config, config)
