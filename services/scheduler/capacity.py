"""Getting a ticket when decode caches are full: try the other decode workers a prefill worker can
push to, then wait for blocks to free, backing off, until the request's queue budget runs out (the
door's one budget, of which admission may have spent part) or the client's deadline. A request no
decode worker could ever hold never gets here: the servicer refuses it at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pdmesh.enums import WorkerRole
from services.scheduler import worker_client
from services.scheduler.errors import DownstreamFailed
from services.scheduler.policy import Placement
from services.scheduler.registry import Registry, Worker
from services.scheduler.request import Deadline, SchedulerRequest, TicketHandle
from services.scheduler.retry import Verdict, classify

_RESERVE_TIMEOUT_S = 10.0
_BACKOFF_S = (0.01, 0.25)  # the first and the longest pause


async def reserve(
    registry: Registry,
    request: SchedulerRequest,
    placement: Placement,
    lease_ms: int,
    give_up: float,
    deadline: Deadline,
    waiting: Callable[[bool], None],
) -> tuple[Placement, TicketHandle]:
    """A ticket on the placement's decode worker or, when its cache is full, on another. Failures
    other than a full cache are raised as they are; `waiting` hears when the request queues.
    `give_up`: time.monotonic() when its queue budget runs out."""
    delay = _BACKOFF_S[0]
    while True:
        for worker in _candidates(registry, placement):
            try:
                ticket = await worker_client.reserve(worker, request, lease_ms, deadline.left(_RESERVE_TIMEOUT_S))
            except DownstreamFailed as failure:
                if classify(failure.code, failure.phase) is not Verdict.BUSY:
                    raise
                full = failure
                continue
            waiting(False)
            return Placement(worker, placement.prefill), ticket
        left = deadline.left()
        if time.monotonic() + delay > give_up or (left is not None and left < delay):
            waiting(False)
            raise full.client_error()
        waiting(True)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _BACKOFF_S[1])


def _candidates(registry: Registry, placement: Placement) -> list[Worker]:
    assert placement.prefill is not None
    layout = placement.prefill.info.kv_layout
    others = registry.live(WorkerRole.DECODE, exclude=(placement.decode,))
    return [placement.decode, *(w for w in others if w.info.kv_layout == layout)]
