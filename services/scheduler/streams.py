"""The scheduler's streams in flight, so that a stop can end them with a word rather than a cut.

When the scheduler drains (SIGTERM), its streams get the grace period to finish on the workers,
which still serve. A stream still running when the grace is nearly over is ended by
`abort_all`: its flow is closed (the downstream calls are cancelled, an uncommitted ticket is
released) and the client gets a last chunk whose finish reason is ABORT, with the usage so far,
and the call ends OK — not a status UNAVAILABLE "Socket closed" halfway through a stream.

Waiting for a flow's next response is the only place a stream can be stopped without racing
the gRPC write: while the handler's task waits there, `abort_all` cancels that task and the
stream turns the cancellation into the abort chunk; a stream caught between two responses sees
the abort before it waits again. So the normal path costs no extra task per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

from services.scheduler.flow import RequestFlow
from services.scheduler.request import Response


@dataclass(eq=False)
class _Stream:
    task: asyncio.Task[object] | None
    waiting: bool = False  # in the flow, waiting for its next response
    aborting: bool = False
    cancelled_by_us: bool = False

    def abort(self) -> None:
        self.aborting = True
        if self.waiting and self.task is not None and not self.cancelled_by_us:
            self.cancelled_by_us = True
            self.task.cancel()


class Streams:
    def __init__(self) -> None:
        self._streams: set[_Stream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def abort_all(self) -> int:
        """End every stream in flight with an ABORT chunk; how many there were."""
        for stream in self._streams:
            stream.abort()
        return len(self._streams)

    async def run(self, flow: RequestFlow) -> AsyncIterator[Response]:
        """The flow's responses, ended by an ABORT chunk if abort_all comes first."""
        me = _Stream(asyncio.current_task())  # type: ignore[arg-type]
        self._streams.add(me)
        responses = cast(AsyncGenerator[Response, None], flow.run())  # an async generator
        try:
            while not me.aborting:
                me.waiting = True
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not me.cancelled_by_us:
                        raise  # the client went away, or the server's own stop
                    assert me.task is not None
                    me.task.uncancel()
                    break
                finally:
                    me.waiting = False
                yield response
                if response.usage is not None:
                    # The last chunk is out; the flow still reads its decode stream to the end,
                    # which follows at once and is where that call's trace span ends.
                    async for _ in responses:
                        pass
                    return
            await responses.aclose()  # cancels the downstream calls, releases an open ticket
            yield flow.aborted()
        finally:
            self._streams.discard(me)
            await responses.aclose()  # the client went away: the flow's own cleanup
