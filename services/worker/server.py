"""A prefill or decode worker process: engine, KV transport, gRPC service, load reports.

Both roles run the same engine; they differ in which servicer they expose and whether the KV
transport has a receiving side (decode) or only sends (prefill).
"""

from __future__ import annotations

import asyncio

import structlog

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from kvtransfer.config import TransportConfig
from kvtransfer.transport import KVTransport
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, worker_pb2
from services.bootstrap import Server, ServicerBinding, serve
from services.decode.reservations import Reservations
from services.decode.servicer import DecodeServicer
from services.prefill.servicer import PrefillServicer
from services.worker.config import Role, WorkerConfig
from services.worker.convert import load_report_to_pb
from services.worker.registry_client import Reporter

log = structlog.get_logger(__name__)
_ROLE = {Role.PREFILL: worker_pb2.WORKER_ROLE_PREFILL, Role.DECODE: worker_pb2.WORKER_ROLE_DECODE}


def transport_config(config: WorkerConfig) -> TransportConfig:
    cuda = config.device.startswith("cuda")
    # Same-host GPUs move KV over NVLink (cuda_ipc); hosts without GPUs use tcp and shared memory.
    tls = "cuda_ipc,cuda_copy,tcp,self" if cuda else "tcp,self"
    return TransportConfig(host=config.advertise_host, port=config.kv_port, device=config.device, ucx_tls=tls)


def worker_info(config: WorkerConfig, engine: Engine, transport: KVTransport, port: int) -> worker_pb2.WorkerInfo:
    layout = engine.kv_layout
    return worker_pb2.WorkerInfo(
        worker_id=config.id,
        role=_ROLE[config.role],
        address=f"{config.advertise_host}:{port}",
        kv_transfer_address=transport.address,
        model=config.model,
        kv_layout=common_pb2.KVLayout(
            model_fingerprint=layout.model_fingerprint,
            dtype=layout.dtype,
            block_size_tokens=layout.block_size,
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            layout_version=layout.layout_version,
        ),
        capacity=worker_pb2.WorkerCapacity(
            num_kv_blocks_total=engine.pool.num_blocks,
            max_num_running_requests=config.max_running,
            max_num_batched_tokens=config.max_batched_tokens,
            max_model_len_tokens=engine.max_model_len,
        ),
        device=config.device,
        version="0.1.0",
    )


async def serve_worker(config: WorkerConfig) -> None:
    log.info("loading model", model=config.model, device=config.device, role=config.role.value)
    engine = await asyncio.to_thread(Engine.from_config, config.engine_config())
    async_engine = AsyncEngine(engine)
    receiving = config.role is Role.DECODE
    transport = KVTransport(engine.kv_layout, transport_config(config), engine.kv_caches if receiving else None)
    await asyncio.to_thread(transport.start)
    reservations = Reservations(async_engine, transport, config.id, config.lease_ms) if receiving else None
    if reservations is not None:
        binding = ServicerBinding(
            DecodeServicer(async_engine, reservations, config.id),
            decode_pb2_grpc.add_DecodeServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["Decode"],
        )
    else:
        binding = ServicerBinding(
            PrefillServicer(async_engine, transport, config.id),
            prefill_pb2_grpc.add_PrefillServicer_to_server,
            prefill_pb2.DESCRIPTOR.services_by_name["Prefill"],
        )
    reporter: Reporter | None = None

    async def load(snapshot: bool) -> worker_pb2.ReportLoadRequest:
        stats, events = await async_engine.call(lambda e: (e.stats(), e.pool.take_events(snapshot)))
        reserved = len(reservations) if reservations is not None else 0
        return load_report_to_pb(stats, events, reserved, transport.num_in_flight)

    async def on_ready(server: Server) -> None:
        nonlocal reporter
        reporter = Reporter(config.scheduler, worker_info(config, engine, transport, server.port), load)
        reporter.start()
        log.info("worker ready", worker_id=config.id, port=server.port, kv=transport.address)

    async def on_shutdown() -> None:
        if reporter is not None:
            await reporter.stop()
        if reservations is not None:
            await reservations.close()
        async_engine.shutdown()
        await asyncio.to_thread(transport.close)

    await serve([binding], config.server, on_ready=on_ready, on_shutdown=on_shutdown)
