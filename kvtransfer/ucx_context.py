"""The process-wide ucxx context: claimed by one transport at a time, started on the transport's
loop, and reset quietly when it stops.

ucxx keeps its context global, so a process runs one KVTransport at a time (claim/release); the
quirks of starting and stopping it cleanly live here so the transport reads as its own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import Any

import structlog
import ucxx

from kvtransfer.config import TransportConfig

log = structlog.get_logger(__name__)

_process_lock = threading.Lock()  # ucxx has one context per process, so one transport at a time
_process_owner: object | None = None


def claim(owner: object) -> None:
    """Make `owner` the process's one transport; RuntimeError when another runs."""
    global _process_owner
    with _process_lock:
        if _process_owner is not None:
            raise RuntimeError("a KVTransport is already running in this process (ucxx allows one context)")
        _process_owner = owner


def release(owner: object) -> None:
    global _process_owner
    with _process_lock:
        if _process_owner is owner:
            _process_owner = None


def init(config: TransportConfig) -> None:
    """Start ucxx on the running loop (its notifier binds to the loop running at init)."""
    _drop_stale_ucx_variable()
    ucxx.init(
        options=config.ucx_init_options,
        progress_mode=config.progress_mode.value,
        enable_delayed_submission=config.delayed_submission_on,
        enable_python_future=True,
    )


async def reset() -> None:
    """Stop ucxx once every endpoint and the listener are closed; the process can start it again."""
    with contextlib.suppress(Exception):  # private ucxx API, only a speed-up and quiet: see below
        _stop_notifier(ucxx.core._ctx)
    for _ in range(3):  # the notifier's last wake-ups were posted to this loop: run them before it closes
        await asyncio.sleep(0)
    try:
        ucxx.reset()
    except Exception as e:  # a reference still held somewhere; the process can go on
        log.warning("ucxx reset incomplete", error=str(e))


def _drop_stale_ucx_variable() -> None:
    """ucxx sets UCX_MEMTYPE_CACHE=n in this process's environment when imported, for the UCX
    releases that had that option; UCX 1.20 has none and warns about the unknown variable at every
    start. The value has no effect there, so it goes before UCX reads the environment."""
    if ucxx.get_ucx_version() >= (1, 20) and os.environ.get("UCX_MEMTYPE_CACHE") == "n":
        del os.environ["UCX_MEMTYPE_CACHE"]


def _stop_notifier(ctx: Any) -> None:
    """Stop ucxx's notifier thread now, and leave it marked stopped.

    ucxx.reset() stops the thread too, but only at the thread's next 1 s poll, and the thread
    consumes the stop request on its way out, which leaves the C++ notifier marked running: the
    worker's destructor then warns at process exit ("The notifier thread should be explicitly
    stopped"). So: wake it, join it, mark it stopped again."""
    if ctx is None:
        return
    ctx.worker.stop_request_notifier_thread()
    ctx.stop_notifier_thread()
    ctx.worker.stop_request_notifier_thread()
