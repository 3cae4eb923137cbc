"""AsyncEngine: the Engine on its own thread, with an asyncio face.

Every engine mutation runs on the step thread: callers submit small commands (add, abort,
reserve, stats) and the thread runs them between steps, so the Engine itself needs no locks.
Outputs travel back to each caller's event loop through call_soon_threadsafe. A step that raises
fails the requests in it, and the loop carries on with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from engine.engine import Engine, EngineStats
from engine.errors import InvalidRequest, RequestNotFound
from engine.handoff import KVExportSink, KVImport
from engine.ids import BlockId
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_POLL_S = 0.002  # how often an engine with only KV-import waiters looks again


class _Stream:
    """Where one request's outputs go: a queue on the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[Engine], object], Future[object]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the step thread between steps."""
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        future: Future[T] = Future()
        self._commands.put((fn, future))  # type: ignore[arg-type]
        self._wake.set()
        return future

    async def call(self, fn: Callable[[Engine], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prior_output_ids: Sequence[int] = (),
        kv_import: KVImport | None = None,
        kv_export: KVExportSink | None = None,
        prefill_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; leaving early (cancel, break) aborts it."""
        if request_id in self._streams:
            raise InvalidRequest("request_id", f"{request_id!r} is already streaming", "use a unique request id")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream

        def add(engine: Engine) -> None:
            engine.add_request(
                request_id, prompt_token_ids, params,
                prior_output_ids=prior_output_ids, kv_import=kv_import, kv_export=kv_export,
                prefill_only=prefill_only,
            )

        finished = False
        try:
            await self.call(add)  # validation errors surface here, in the caller
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stop.is_set():
                self.submit(lambda e: _abort_quietly(e, request_id))

    async def abort(self, request_id: str) -> None:
        await self.call(lambda e: _abort_quietly(e, request_id))

    async def reserve(self, request_id: str, num_tokens: int) -> list[BlockId]:
        return await self.call(lambda e: e.reserve(request_id, num_tokens))

    async def stats(self) -> EngineStats:
        return await self.call(lambda e: e.stats())

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the step thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a model bug or OOM must not take the other requests down
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
                continue
            if outputs:
                self._dispatch(outputs)
            elif self.engine.batcher.waiting and not self.engine.batcher.running:
                self._wake.wait(_IDLE_POLL_S)  # only KV imports in flight: don't spin
                self._wake.clear()
        self._fail_all(RuntimeError("the engine shut down"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:
                future.set_exception(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self.engine.requests):
            _abort_quietly(self.engine, request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(exc)


def _abort_quietly(engine: Engine, request_id: str) -> None:
    with contextlib.suppress(RequestNotFound):  # it finished on its own first
        engine.abort(request_id)

