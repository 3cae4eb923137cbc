"""Who is next for a decode worker's free blocks when a hand-off does not fit.

Without a line, a large prompt's Reserve (say 75 of 96 free blocks) is refused again and again
while smaller ones keep taking the blocks that finishing requests free, until its deadline passes.
So a request refused for want of blocks twice in a row (the scheduler tried the other decode
workers in between and came back: it has nowhere else to go) takes a claim: from then on another
request's Reserve is granted only if it leaves the claimant's blocks free beside the engine's
watermark, and blocks build up for the claimant as requests finish — first come, first served,
as a batcher's waiting queue would be.

Nothing waits forever behind a claim. It ends when its request is granted; when the request stops
asking for `idle_s` (it found blocks elsewhere or gave up: a waiting scheduler asks again every
0.25 s at most); or after `max_s`, the scheduler's default queue timeout, after which that request
may not claim again here. One claim at a time: others refused meanwhile wait their turn.

The line knows request ids, block counts and a clock; it refuses to know the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

IDLE_S = 1.5  # a claimant silent this long has stopped waiting here
MAX_S = 30.0  # the longest smaller requests wait behind one claim (the scheduler's default queue timeout)
_MEMORY = 1024  # refused and barred request ids remembered


@dataclass(slots=True)
class Claim:
    request_id: str
    num_blocks: int
    since: float  # on the line's clock
    asked: float  # the claimant's last Reserve


class Line:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, idle_s: float = IDLE_S, max_s: float = MAX_S
    ) -> None:
        self.clock = clock
        self.idle_s = idle_s
        self.max_s = max_s
        self.claim: Claim | None = None
        self._refused: dict[str, None] = {}  # refused once, no claim yet; ordered sets, oldest first
        self._barred: dict[str, None] = {}  # their claim ran out: they may not claim again

    def set_aside(self, request_id: str) -> int:
        """Blocks a reservation for request_id must leave free for the claimant (0: none)."""
        now = self.clock()
        claim = self._current(now)
        if claim is None:
            return 0
        if claim.request_id == request_id:
            claim.asked = now
            return 0
        return claim.num_blocks

    def refused(self, request_id: str, num_blocks: int) -> None:
        """request_id's Reserve found too few blocks: the second time in a row, it claims them."""
        now = self.clock()
        if self._current(now) is not None or request_id in self._barred:
            return
        if request_id not in self._refused:
            _remember(self._refused, request_id)
            return
        del self._refused[request_id]
        self.claim = Claim(request_id, num_blocks, since=now, asked=now)

    def granted(self, request_id: str) -> None:
        self._refused.pop(request_id, None)
        if self.claim is not None and self.claim.request_id == request_id:
            self.claim = None

    def _current(self, now: float) -> Claim | None:
        claim = self.claim
        if claim is not None and now - claim.since > self.max_s:
            _remember(self._barred, claim.request_id)
            self.claim = None
        elif claim is not None and now - claim.asked > self.idle_s:
            self.claim = None
        return self.claim


def _remember(ids: dict[str, None], request_id: str) -> None:
    ids[request_id] = None
    while len(ids) > _MEMORY:
        ids.pop(next(iter(ids)))
