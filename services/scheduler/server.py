"""The scheduler process: tokenizer, registry (with the predictors' calibration), ledger, policy,
the door into the core, the two gRPC servicers on one server and the OpenAI HTTP door beside them
(one event loop)."""

from __future__ import annotations

import asyncio

import structlog

from engine.tokenizer import Tokenizer
from pdmesh.config import SchedulerConfig, SloConfig
from pdmesh.enums import WorkerRole
from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.auth import ApiKeys
from services.bearer import BearerAuth
from services.bootstrap import ServicerBinding, serve
from services.scheduler.door import Door
from services.scheduler.ledger import Ledger
from services.scheduler.openai_api.server import HttpServer
from services.scheduler.placer import Placer, make_policy
from services.scheduler.predictor import Calibration, CalibrationSettings
from services.scheduler.profile import load_profile
from services.scheduler.registry import Registry
from services.scheduler.servicer import RegistryServicer, SchedulerServicer
from services.telemetry.metrics import MetricsEndpoint

log = structlog.get_logger(__name__)
_ABORT_MARGIN_S = 2.0  # before the grace is over: time for the ABORT chunks and ticket releases


async def serve_scheduler(config: SchedulerConfig) -> None:
    tokenizer = Tokenizer.from_model(config.model)
    registry = Registry(config.stale_after_ms / 1000, config.channel, calibration(config.slo))
    ledger = Ledger(registry.clock)
    policy = make_policy(config.policy, registry, ledger, config.slo, config.local_prefill_max_tokens)
    door = Door(config, tokenizer, Placer(policy, registry, ledger, config.slo))
    metrics = MetricsEndpoint.start(door.metrics.registry, config.telemetry)
    bindings = [
        ServicerBinding(
            SchedulerServicer(door, registry, policy),
            scheduler_pb2_grpc.add_SchedulerServicer_to_server,
            scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
            # Honest health: a request can be served only while some decode worker is live (it
            # prefills itself when no prefill worker is).
            ready=lambda: bool(registry.live(WorkerRole.DECODE)),
        ),
        ServicerBinding(
            RegistryServicer(registry, config.report_interval_ms),
            worker_pb2_grpc.add_RegistryServicer_to_server,
            worker_pb2.DESCRIPTOR.services_by_name["Registry"],
            open_while_draining=True,  # workers keep reporting while the scheduler drains its streams
        ),
    ]
    keys = ApiKeys(config.door_keys.grpc)
    guard = [BearerAuth(keys, (bindings[0].name,))] if keys.required else []
    log.info("scheduler starting", model=config.model, policy=config.policy.value, profile=config.slo.profile,
             auth=f"{len(config.door_keys.grpc)} bearer keys" if keys.required else "none")  # fmt: skip
    http = HttpServer.for_scheduler(config, door, tokenizer)
    if http is not None:
        http.bind()  # before the gRPC server: a port in use fails the start at once, naming the port

    def abort_streams() -> None:
        if count := door.streams.abort_all():
            log.warning("grace period nearly over; ending streams with finish reason abort", streams=count)

    async def ready(_: object) -> None:
        if http is not None:
            await http.start()

    async def drain() -> None:
        if http is not None:  # with the gRPC server's: no new requests through either door
            http.drain()
        # Streams (either door's) get the grace to finish; those that would outlast it end with an
        # ABORT chunk shortly before, so that no client sees its stream cut.
        grace = config.server.shutdown_grace_s
        asyncio.get_running_loop().call_later(max(grace / 2, grace - _ABORT_MARGIN_S), abort_streams)

    async def shutdown() -> None:
        if http is not None:
            await http.stop()  # its requests still need the workers' channels
        await registry.close()
        if metrics is not None:
            metrics.close()

    try:
        await serve(bindings, config.server, on_ready=ready, on_drain=drain, on_shutdown=shutdown, interceptors=guard)
    finally:
        if http is not None:  # serve() failed before its shutdown (a gRPC port in use)
            await http.stop()


def calibration(slo: SloConfig) -> Calibration:
    """The predictors' calibration, its prior the configured profile (a ValueError names a bad one)."""
    settings = CalibrationSettings(slo.calibration_prior_weight, slo.calibration_forget)
    if slo.profile is None:
        return Calibration(settings)
    profile = load_profile(slo.profile)
    return Calibration(settings, profile.step, profile.transfer)
