"""One HTTP request's life in the core, on a task of its own: read, accepted, generated.

Why a task: an HTTP handler is not cancelled when its client goes away (the gRPC door's is), and
a streamed answer is read first by the route (to answer errors with their HTTP status) and then
by the response body, in different tasks. So the request's flow runs in one task, under its
deadline, and hands responses over a queue; a client that disconnects, or a route that stops
reading, cancels that task — and cancelling it cancels the request in the mesh exactly as a gRPC
client's cancel does (the flow releases its ticket, the workers' calls are cancelled and free
their blocks). The task ends by itself in every case; nothing waits on it. Reading and accepting
happen on the task too, inside the request's RequestWatch, so a refused request is counted and
traced exactly as one refused at the gRPC door.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from starlette.types import Receive

from services.scheduler.door import Door
from services.scheduler.intake import ClientRequest
from services.scheduler.request import Deadline, Response, SchedulerRequest
from services.scheduler.telemetry import RequestWatch
from services.status import DeadlineExceeded

T = TypeVar("T")
Read = tuple[ClientRequest, float | None]  # what the client asked, and its timeout in seconds (None: none)

_END = object()


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


class Generation:
    """One request through the core: read, accepted, generated, inside the request's RequestWatch
    (its span, its metrics), all on the generation's task."""

    def __init__(
        self, door: Door, read: Callable[[], Read], metadata: Sequence[tuple[str, str]], tasks: set[asyncio.Task[None]]
    ) -> None:
        """`tasks`: the door's running generations, which holds this one's task until it ends."""
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._accepted: asyncio.Future[SchedulerRequest] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(door, read, metadata), name="generate")
        tasks.add(self._task)
        self._task.add_done_callback(tasks.discard)

    async def accepted(self) -> SchedulerRequest:
        """The request as the core accepted it; raises why it was refused (a typed error)."""
        return await asyncio.shield(self._accepted)  # a route cancelled here leaves the task be

    async def _run(self, door: Door, read: Callable[[], Read], metadata: Sequence[tuple[str, str]]) -> None:
        try:
            with door.watch(metadata) as watch:
                client, timeout_s = read()
                deadline = Deadline.after(timeout_s)
                request = await door.accept(client, watch)
                self._accepted.set_result(request)
                await self._generate(door, request, deadline, watch)
        except asyncio.CancelledError:
            self._fail(ClientGone())
            raise
        except Exception as exc:  # the client gets it, mapped by errors.http_error
            self._fail(exc)
        else:
            self._queue.put_nowait(_END)

    async def _generate(self, door: Door, request: SchedulerRequest, deadline: Deadline, watch: RequestWatch) -> None:
        try:
            async with asyncio.timeout(deadline.left()) as timeout:
                async for response in door.generate(request, deadline, watch):
                    self._queue.put_nowait(response)
        except TimeoutError:
            if not timeout.expired():
                raise  # a bug's: answered 500, logged
            raise DeadlineExceeded("deadline", "the request's deadline passed", "give the request more time") from None

    def _fail(self, error: Exception) -> None:
        if not self._accepted.done():
            self._accepted.set_exception(error)
        else:
            self._queue.put_nowait(error)

    async def next(self) -> Response | None:
        """The next response; None after the last; raises the error the request ended with."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Response)
        return item

    async def responses(self) -> AsyncIterator[Response]:
        while (response := await self.next()) is not None:
            yield response

    def cancel(self) -> None:
        """Cancel the request in the mesh (a no-op once it ended). Returns at once: the task
        releases what the request held by itself."""
        self._task.cancel()


async def watching_disconnect(receive: Receive, generation: Generation, work: Awaitable[T]) -> T:
    """Await `work` (reading `generation`); a client that disconnects meanwhile cancels the
    generation, and `work` then raises ClientGone."""

    async def disconnected() -> None:
        while (await receive()).get("type") != "http.disconnect":
            pass
        generation.cancel()

    watcher = asyncio.create_task(disconnected())
    try:
        return await work
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
