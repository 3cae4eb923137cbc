"""The `pdmesh` command line: one subcommand per job, each a thin call into its module.

    pdmesh up                       the whole mesh as local processes (scheduler, prefill, decode)
    pdmesh serve ROLE               one service: scheduler, prefill, decode or kvstore (what compose runs)
    pdmesh generate PROMPT          stream a completion from a running mesh
    pdmesh status                   workers' health and load, the KV store's capacity and hit counts
    pdmesh demo                     the engine alone in this process, one chat answer
    pdmesh bench serve              load a running mesh: concurrency/rate sweeps, trace replay
    pdmesh sim                      simulate a mesh under a trace, placing with the scheduler's policies

Flags override PDMESH_* environment variables, which override defaults (pdmesh/config/).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pdmesh.config import PolicyName

if TYPE_CHECKING:
    from pdmesh.config import TelemetryConfig


def _demo(args: argparse.Namespace) -> int:
    from pdmesh.demo import run_demo

    run_demo(args.model, args.device, args.prompt, args.max_tokens, args.threads)
    return 0


EX_TEMPFAIL = 75  # sysexits.h: a temporary failure; `pdmesh serve` exits with it when its device is lost


def _serve(args: argparse.Namespace) -> int:
    """Run one service; settings it cannot use end it with EX_CONFIG, which `pdmesh up` does not
    restart (a restart cannot fix them), after one log line saying what is wrong. A worker whose
    device was lost ends with EX_TEMPFAIL, which a supervisor restarts: a fresh process gets a
    fresh device context."""
    import logging

    import structlog

    from pdmesh.config.openmp import set_openmp_defaults

    set_openmp_defaults()  # before anything imports torch
    from engine.errors import DeviceLost, ModelLoadError
    from pdmesh.config import ConfigError, TelemetryConfig, from_env
    from pdmesh.supervisor import EX_CONFIG
    from services.logging import configure_logging

    try:
        logs_and_metrics = _given(log_level=args.log_level, metrics_port=args.metrics_port)
        telemetry = from_env(TelemetryConfig, "telemetry", **logs_and_metrics)
        configure_logging(args.role, telemetry.log_level, telemetry.log_format)
        _run_service(args, telemetry)
    except (ConfigError, ModelLoadError) as e:
        if not logging.getLogger().handlers:  # the logging settings themselves were unusable
            configure_logging(args.role)
        structlog.get_logger("pdmesh.serve").error("cannot start: unusable settings", role=args.role, error=str(e))
        return EX_CONFIG
    except DeviceLost as e:
        structlog.get_logger("pdmesh.serve").error("stopped: the device is lost", role=args.role, error=str(e))
        _end_now(EX_TEMPFAIL)
    return 0


def _end_now(code: int) -> NoReturn:
    """End the process with `code` once the logs are out, running no destructors: a worker whose
    device is lost leaves its UCX transport and its device context as they are, since tearing down
    either can crash (a UCX listener that a peer dials while it is destroyed: openucx/ucx#11087; a
    lost device's memory), and its supervisor must see EX_TEMPFAIL, not a signal. Its requests
    have failed and its gRPC server has drained already (services/worker/server.py)."""
    import logging
    import os

    logging.shutdown()  # flushes every handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_service(args: argparse.Namespace, telemetry: TelemetryConfig) -> None:
    from pdmesh.config import from_env, otel_export
    from services.telemetry.otel import ServiceName, start_otel

    server = _given(port=args.port, host=args.host, shutdown_grace_s=args.shutdown_grace_s)
    if args.role == "scheduler":
        from pdmesh.config import SchedulerConfig
        from services.scheduler.server import serve_scheduler

        policy = PolicyName(args.policy) if args.policy else None
        scheduler = from_env(
            SchedulerConfig, "scheduler", server=server, telemetry=telemetry,
            http=_given(port=args.http_port, host=args.http_host), **_given(model=args.model, policy=policy),
        )  # fmt: skip
        _warn_deprecated(SchedulerConfig, "scheduler")
        otel = start_otel(ServiceName.SCHEDULER, f"scheduler-{scheduler.server.port}", otel_export())
        try:
            asyncio.run(serve_scheduler(scheduler))
        finally:
            otel.shutdown()
        return
    if args.role == "kvstore":
        _serve_kvstore(args, server, telemetry)
        return
    from pdmesh.enums import WorkerRole
    from services.worker.config import WorkerConfig
    from services.worker.server import serve_worker

    kv_cache_bytes = args.kv_cache_mib << 20 if args.kv_cache_mib else None
    cache = _given(num_blocks=args.kv_blocks, block_size=args.block_size, capacity_bytes=kv_cache_bytes)
    batcher = _given(max_batched_tokens=args.max_batched_tokens, max_prefill_chunk=args.max_batched_tokens)
    engine = _given(model=args.model, device=args.device, dtype=args.dtype, torch_threads=args.threads)
    flags = _given(
        scheduler=args.scheduler, kv_port=args.kv_port, worker_id=args.worker_id,
        advertise_host=args.advertise_host, lease_ms=args.lease_ms, stream_interval=args.stream_interval,
    )  # fmt: skip
    worker = from_env(
        WorkerConfig, "worker", role=WorkerRole(args.role), server=server, telemetry=telemetry,
        engine={**engine, "cache": cache, "batcher": batcher}, **flags,
    )  # fmt: skip
    otel = start_otel(ServiceName(f"pdmesh-{args.role}"), worker.id, otel_export())
    try:
        asyncio.run(serve_worker(worker))
    finally:
        otel.shutdown()


def _warn_deprecated(cls: type, section: str) -> None:
    """One warning at start per deprecated setting in use: it still works, but not for long."""
    import structlog

    from pdmesh.config import deprecated_settings

    for variable, replacement in deprecated_settings(cls, section):
        structlog.get_logger("pdmesh.serve").warning(
            "deprecated setting: it still works for now; set its replacement", setting=variable, use=replacement
        )


def _given(**flags: Any) -> dict[str, Any]:
    """The flags given on the command line (argparse leaves the others None)."""
    return {name: value for name, value in flags.items() if value is not None}


def _serve_kvstore(args: argparse.Namespace, server: dict[str, Any], telemetry: TelemetryConfig) -> None:
    from pdmesh.config import from_env, otel_export
    from services.kvstore.config import KVStoreConfig
    from services.kvstore.server import serve_kvstore
    from services.telemetry.otel import ServiceName, start_otel

    flags = _given(
        scheduler=args.scheduler, kv_port=args.kv_port, store_id=args.worker_id, advertise_host=args.advertise_host,
        disk_path=Path(args.disk_path) if args.disk_path else None,
        memory_bytes=args.memory_mib << 20 if args.memory_mib else None,
        disk_bytes=args.disk_mib << 20 if args.disk_mib else None,
    )  # fmt: skip
    store = from_env(KVStoreConfig, "kvstore", server=server, telemetry=telemetry, **flags)
    otel = start_otel(ServiceName.KVSTORE, store.id, otel_export())
    try:
        asyncio.run(serve_kvstore(store))
    finally:
        otel.shutdown()


def _up(args: argparse.Namespace) -> int:
    from pdmesh.up import MeshSpec, UpOptions, run_up

    extra: list[str] = []
    if args.kv_blocks:
        extra += ["--kv-blocks", str(args.kv_blocks)]
    if args.dtype:
        extra += ["--dtype", args.dtype]
    if args.stream_interval is not None:
        extra += ["--stream-interval", str(args.stream_interval)]
    store: list[str] = []
    if args.kvstore_memory_mib:
        store += ["--memory-mib", str(args.kvstore_memory_mib)]
    if args.kvstore_disk:
        store += ["--disk-path", str(args.kvstore_disk)]
    spec = MeshSpec(
        port=args.port, prefill=args.prefill, decode=args.decode, model=args.model, device=args.device,
        threads=args.threads, host=args.host, grace_s=args.grace_s, extra_worker_args=tuple(extra),
        kvstore=not args.no_kvstore, kvstore_args=tuple(store), http_port=args.http_port,
    )  # fmt: skip
    options = UpOptions(
        demo_prompt=args.demo, exit_after_demo=args.exit_after_demo, verbose=args.verbose, log_dir=args.log_dir,
        restart=not args.no_restart,
    )  # fmt: skip
    return asyncio.run(run_up(spec, options))


def _status(args: argparse.Namespace) -> int:
    from pdmesh.status import run_status

    return asyncio.run(run_status(args))


def _generate(args: argparse.Namespace) -> int:
    from pdmesh.generate import run_generate

    return asyncio.run(run_generate(args))


_STREAM_INTERVAL_HELP = (
    "workers: stream each request's tokens every N (its first token and its end at once); default 1, every token"
)


def _stream_interval(text: str) -> int:
    """--stream-interval's value, refused at once when no worker could use it (WorkerConfig checks
    PDMESH_WORKER_STREAM_INTERVAL the same way)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"is {text!r}; use a whole number of tokens, 1 (every token) or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description="LLM serving with prefill and decode disaggregated")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole mesh as local processes")
    up.add_argument("--port", type=int, default=50051, help="the scheduler's port (workers take the next ones)")
    up.add_argument("--http-port", type=int, default=8000, help="the OpenAI-compatible HTTP API's port")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--model", default="smollm2", help="smollm2, a Hugging Face directory or a GGUF file")
    up.add_argument("--device", default="cpu", help="cpu or cuda (workers spread over the GPUs)")
    up.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    up.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights and KV cache (default: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    up.add_argument("--kv-blocks", type=int, default=None, help="KV blocks per worker (default: sized by memory)")
    up.add_argument("--stream-interval", type=_stream_interval, default=None, help=_STREAM_INTERVAL_HELP)
    up.add_argument("--demo", nargs="?", const="What is the capital of France?", default=None,
                    help="send one chat request once the mesh is up")  # fmt: skip
    up.add_argument("--exit-after-demo", action="store_true", help="stop the mesh after the demo request")
    up.add_argument("--host", default="127.0.0.1",
                    help="the address every listener binds (default loopback only; 0.0.0.0 opens the mesh)")
    up.add_argument("--grace-s", type=float, default=30.0,
                    help="on stop, how long streams in flight get to finish before they are cut")
    up.add_argument("--log-dir", type=Path, default=None, help="each process's log file (default: a new temp dir)")
    up.add_argument("--verbose", action="store_true", help="show every log line, not only warnings and errors")
    up.add_argument("--no-restart", action="store_true", help="leave a process that exits down")
    up.add_argument("--no-kvstore", action="store_true", help="run without the KV store (prefixes not shared)")
    up.add_argument("--kvstore-memory-mib", type=int, default=None, help="the KV store's memory per KV layout")
    up.add_argument("--kvstore-disk", type=Path, default=None, help="a directory for the KV store's disk tier")
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("role", choices=["scheduler", "prefill", "decode", "kvstore"])
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--host", default=None, help="the interface to listen on (default 0.0.0.0)")
    serve.add_argument("--model", default=None)
    serve.add_argument("--http-port", type=int, default=None, help="scheduler: the OpenAI HTTP API's port (8000)")
    serve.add_argument("--http-host", default=None, help="scheduler: its interface (default: --host)")
    serve.add_argument("--policy", default=None, choices=[p.value for p in PolicyName], help="scheduler's placement")
    serve.add_argument("--scheduler", default=None, help="workers: the scheduler's host:port")
    serve.add_argument("--advertise-host", default=None, help="workers: the host others reach this worker at")
    serve.add_argument("--worker-id", default=None, help="workers and the KV store: the id in the mesh")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--kv-port", type=int, default=None, help="workers: the UCX listener's port")
    serve.add_argument("--kv-blocks", type=int, default=None)
    serve.add_argument("--kv-cache-mib", type=int, default=None)
    serve.add_argument("--block-size", type=int, default=None)
    serve.add_argument("--lease-ms", type=int, default=None)
    serve.add_argument("--stream-interval", type=_stream_interval, default=None, help=_STREAM_INTERVAL_HELP)
    serve.add_argument("--max-batched-tokens", type=int, default=None, help="workers: per-step token budget")
    serve.add_argument("--shutdown-grace-s", type=float, default=None,
                       help="on SIGTERM, how long calls in flight get to finish")
    serve.add_argument("--memory-mib", type=int, default=None, help="kvstore: host memory for blocks, per KV layout")
    serve.add_argument("--disk-path", default=None, help="kvstore: a directory for blocks evicted from memory")
    serve.add_argument("--disk-mib", type=int, default=None, help="kvstore: the disk tier's size, per KV layout")
    serve.add_argument("--log-level", default=None, help="debug, info (default), warning, error")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: none)")
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="stream a completion from a running mesh")
    gen.add_argument("prompt")
    gen.add_argument("--target", default="127.0.0.1:50051")
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ttft-ms", type=float, default=None)
    gen.add_argument("--tpot-ms", type=float, default=None)
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    gen.add_argument("--explain", action="store_true", help="show where the time to first token went")
    gen.set_defaults(func=_generate)

    status = sub.add_parser("status", help="the mesh as the scheduler sees it: workers and the KV store")
    status.add_argument("--target", default="127.0.0.1:50051", help="the scheduler's host:port")
    status.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    status.set_defaults(func=_status)

    demo = sub.add_parser("demo", help="run the engine in this process and stream one chat answer")
    demo.add_argument("prompt", nargs="?", default="What is the capital of France?")
    demo.add_argument("--model", default="smollm2", help="smollm2, a Hugging Face directory or a GGUF file")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(func=_demo)

    from pdmesh.bench.cli import add_bench_parser
    from pdmesh.sim.cli import add_sim_parser

    add_bench_parser(sub)
    add_sim_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
