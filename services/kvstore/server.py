"""The KV store process: the block store, a KV transport of any layout, the KVStore service, and
reports to the scheduler.

Start-up: the server binds with health NOT_SERVING; the memory tier is allocated (pinned when a
GPU is present: seconds for GiBs) and the disk restored on a thread; only then is the KVStore
service SERVING and the store registered with the scheduler, which is what points workers at it.
So no worker's call ever waits for the allocation (memory.py says why it must not)."""

from __future__ import annotations

import asyncio
import os

import structlog

from kvtransfer.transport import KVTransport
from pdmesh.config import KV_CLOSE_S
from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc, worker_pb2
from services.bootstrap import Server, ServicerBinding, serve
from services.kvstore.config import KVStoreConfig
from services.kvstore.registry_client import StoreReporter, scheduler_grace_s
from services.kvstore.servicer import KVStoreServicer
from services.kvstore.shared import SharedTransfers
from services.kvstore.store import BlockStore
from services.kvstore.telemetry import StoreMetrics
from services.kvstore.transfers import StoreTransfers
from services.telemetry.metrics import MetricsEndpoint

log = structlog.get_logger(__name__)
_METRICS_REFRESH_S = 1.0  # how fresh the /metrics figures are


async def serve_kvstore(config: KVStoreConfig) -> None:
    # Its memory files are named by the store, which a port picked at bind (0) does not fix: then
    # by the process too, so two such stores of one host never remove each other's files.
    store = BlockStore(config.tiers(config.id if config.server.port else f"{config.id}-{os.getpid()}"))
    metrics = StoreMetrics()
    endpoint = MetricsEndpoint.start(metrics.registry, config.telemetry)
    transport = KVTransport(None, config.transport(), observer=metrics.transfers)
    await asyncio.to_thread(transport.start)
    transfers = StoreTransfers(store, transport, config.offer_lease_ms / 1000)
    shared = SharedTransfers(store)
    binding = ServicerBinding(
        KVStoreServicer(store, transfers, shared),
        kvstore_pb2_grpc.add_KVStoreServicer_to_server,
        kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"],
        ready=lambda: store.ready,
    )
    reporter: StoreReporter | None = None

    async def refresh_metrics() -> None:
        while True:
            metrics.refresh(store.status())
            await asyncio.sleep(_METRICS_REFRESH_S)

    refreshing = asyncio.get_running_loop().create_task(refresh_metrics())

    async def on_ready(server: Server) -> None:
        nonlocal reporter
        await asyncio.to_thread(store.start)
        status = store.status()
        log.info(
            "kvstore ready", port=server.port, kv=transport.address, pinned=store.pin,
            shared_memory=status.shared_memory,
            memory_bytes=status.memory_capacity_bytes, disk_bytes=status.disk_capacity_bytes,
            restored_blocks=status.counters.restored_blocks,
        )  # fmt: skip
        if config.scheduler:
            info = worker_pb2.KVStoreInfo(
                store_id=config.id, address=f"{config.advertise_host}:{server.port}",
                kv_transfer_address=transport.address, version="0.1.0",
            )  # fmt: skip
            reporter = StoreReporter(config.scheduler, info, store, config.channel, scheduler_grace_s(config.server))
            reporter.start()

    async def on_drain() -> None:
        if reporter is not None:
            reporter.draining = True

    async def on_shutdown() -> None:
        refreshing.cancel()
        if endpoint is not None:
            endpoint.close()
        if reporter is not None:
            await reporter.stop()
        await transfers.close()
        shared.close()
        await asyncio.to_thread(transport.close, KV_CLOSE_S)  # a thread not stopped by then ends with the process
        await asyncio.to_thread(store.close)

    await serve([binding], config.server, on_ready=on_ready, on_drain=on_drain, on_shutdown=on_shutdown)
