"""The process-wide ucxx context: claimed by one transport at a time, started on the transport's
loop, and reset quietly when it stops.

ucxx keeps its context global, so a process runs one KVTransport at a time (claim/release); the
quirks of starting and stopping it cleanly live here so the transport reads as its own work.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import structlog
import ucxx
import ucxx._lib.libucxx as ucxx_api

from kvtransfer.config import TransportConfig

log = structlog.get_logger(__name__)

_process_lock = threading.Lock()  # ucxx has one context per process, so one transport at a time
_process_owner: object | None = None
_CANCEL_WAIT_NS = 1_000_000_000  # per attempt, for the progress thread to run the cancels
_LEFT_WAIT_NS = 1_000_000  # a pending notification is already there: no need to wait for one
_MAX_LEFT_ROUNDS = 8


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
    try:  # private ucxx API, only a speed-up and quiet: see below
        _cancel_left_requests(ucxx.core._ctx)
        for _ in range(3):  # the notifier posted the cancelled requests' wake-ups to this loop: run them
            await asyncio.sleep(0)
        _stop_notifier(ucxx.core._ctx)
    except Exception as e:  # the stop is then ucxx's own: slower, and it may warn at exit
        log.info("ucxx notifier not stopped early", error=repr(e))
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


def _cancel_left_requests(ctx: Any) -> None:
    """Cancel, now, the requests that closed endpoints left to the worker.

    Closing an endpoint only schedules its pending receives for cancelling; the progress thread
    cancels them at its next wake-up, which may come after the notifier has stopped, or only in the
    worker's destructor at process exit. Each cancelled request then marks a notification pending
    that no notifier will take, and the destructor warns ("The notifier thread should be explicitly
    stopped") however cleanly the notifier was stopped. Cancelled here (on the progress thread,
    waited for), their notifications reach the notifier while it still runs."""
    if ctx is not None:
        ctx.worker.cancel_inflight_requests(period=_CANCEL_WAIT_NS, max_attempts=3)


def _stop_notifier(ctx: Any) -> None:
    """Stop ucxx's notifier thread now, and leave it marked stopped with nothing pending.

    ucxx.reset() stops the thread too, but only at the thread's next 1 s poll, and the thread
    consumes the stop request on its way out, which leaves the C++ notifier marked running: the
    worker's destructor then warns at process exit ("The notifier thread should be explicitly
    stopped"). So: wake it, join it, deliver what it left, mark it stopped again."""
    if ctx is None:
        return
    ctx.worker.stop_request_notifier_thread()
    ctx.stop_notifier_thread()
    _deliver_left_notifications(ctx.worker)
    ctx.worker.stop_request_notifier_thread()


def _deliver_left_notifications(worker: Any) -> None:
    """Deliver what completed while the notifier thread was on its way out (on this, the loop's,
    thread, as the thread itself would): a notification left pending counts as a running notifier."""
    for _ in range(_MAX_LEFT_ROUNDS):
        state = worker.wait_request_notifier(period_ns=_LEFT_WAIT_NS)
        if state == ucxx_api.PythonRequestNotifierWaitState.Ready:
            worker.run_request_notifier()
        elif state == ucxx_api.PythonRequestNotifierWaitState.Timeout:
            return
        # Shutdown: this wait consumed the stop request the thread left; wait again
