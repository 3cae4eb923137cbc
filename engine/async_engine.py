"""AsyncEngine: the Engine on its own thread, with an asyncio face.

Every engine mutation runs on the step thread: callers submit small commands (add, abort,
reserve, stats) and the thread runs them between steps, so the Engine itself needs no locks.
Outputs travel back to each caller's event loop in one call_soon_threadsafe per loop per step
(not one per request: each is a wake-up of that loop, paid under the GIL the step thread needs
next). A caller that falls behind gets the outputs queued meanwhile merged into one. Outputs go to
the stream of the request that made them, fixed on the step thread as the step ends, never looked
up by request id when handed over: by then (on a GPU, during the next step, after the commands run
between) that request may have been aborted and a new one added under its id. With a stream
interval N, a caller is woken for its first token, then once N tokens wait, and at once for its
last output or an error (vLLM's and SGLang's --stream-interval): its per-message work runs N times
less, under the GIL the step thread needs.

A step that raises fails the requests in it, and the loop carries on with the rest — unless the
device is lost (the engine says so, or steps keep failing): then every request fails with
DeviceLost, later calls are refused with it, the thread ends and `on_device_lost` is called, so
that the service can stop serving and exit for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from engine.engine import Engine, EngineStats
from engine.errors import DeviceLost, InvalidRequest, RequestNotFound
from engine.handoff import KVExportSink, KVImport
from engine.ids import BlockId
from engine.output import HeldOutputs
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from engine.step_timer import Phase, Stopwatch

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_POLL_S = 0.002  # how often an engine with only KV-import waiters looks again
_MAX_FAILED_STEPS = 3  # failed steps in a row that mean the engine cannot run, whatever the probe says
_SLOW_COMMAND_S = 0.005  # a command that holds the steps back longer is logged (debug)

Item = RequestOutput | BaseException


class _Stream:
    """Where one request's outputs go: a queue read on the caller's event loop.

    With an interval N > 1 the reader is woken only once N tokens wait (its first output, a
    finished one and an error at once, whatever waits with them), so the caller's work per
    message (a protobuf, a gRPC write) runs about N times less. Nothing is dropped or reordered:
    next() merges what waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: int = 1) -> None:
        self.loop = loop
        self.interval = interval
        self.items: deque[Item] = deque()
        self.ready = asyncio.Event()
        self._num_waiting_tokens = 0  # in the queued outputs, since the reader last took them
        # The first output has woken the reader. It wakes it at once on every stream, a resumed one
        # (a prefill worker's hand-off, a failover) too: the servicer times the stream's first
        # token (the decode's first step, a local prefill's end) from when it is read.
        self._woken = False

    def put(self, item: Item) -> None:  # on self.loop
        self.items.append(item)
        if isinstance(item, RequestOutput) and not item.finished:
            self._num_waiting_tokens += len(item.new_token_ids)
            if self._woken and self._num_waiting_tokens < self.interval:
                return
        self._woken = True
        self.ready.set()

    async def next(self) -> RequestOutput:
        """The next output, merged with every output already queued behind it; raises a queued error."""
        await self.ready.wait()
        item = self.items.popleft()
        if not isinstance(item, BaseException):
            while not item.finished and self.items and not isinstance(self.items[0], BaseException):
                later = self.items.popleft()
                assert not isinstance(later, BaseException)
                item = merge(item, later)
        if not self.items:  # else an error waits, due at once
            self.ready.clear()
            self._num_waiting_tokens = 0
        if isinstance(item, BaseException):
            raise item
        return item


def _deliver(batch: list[tuple[_Stream, Item]]) -> None:
    """On the caller's loop: one step's items for the streams of that loop."""
    for stream, item in batch:
        stream.put(item)


def merge(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request (deltas joined, totals the later's)."""
    logprobs = None
    if first.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (first.new_logprobs or []) + (later.new_logprobs or [])
    later.new_token_ids = first.new_token_ids + later.new_token_ids
    later.new_logprobs = logprobs
    later.text_delta = first.text_delta + later.text_delta
    later.queue_s = first.queue_s if first.queue_s is not None else later.queue_s
    return later


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        on_device_lost: Callable[[DeviceLost], None] | None = None,
        hold_outputs: bool | None = None,
        stream_interval: int = 1,
    ) -> None:
        assert stream_interval >= 1, stream_interval  # WorkerConfig refuses less, naming the setting
        self.engine = engine
        self.stream_interval = stream_interval  # each stream wakes its reader once this many tokens wait
        self.on_device_lost = on_device_lost
        self.lost: DeviceLost | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[Engine], object], Future[object]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # submit()'s check and hand-over, and the step thread's last look at the queue, one at a
        # time: a command is run or refused, never left queued behind a thread that has ended
        self._submitting = threading.Lock()
        self._ended = False
        self._streams: dict[str, _Stream] = {}  # the callers' side: ids being streamed
        self._bound: dict[str, _Stream] = {}  # the step thread's: each engine request's stream
        self._failed_steps = 0
        # the latest step's outputs and the stream each goes to, handed over during the next step
        self._pending: tuple[HeldOutputs, list[_Stream | None]] | None = None
        # Only a device that runs the step while the host waits (CUDA) has a "meanwhile" to hand the
        # previous step's outputs over in. On CPU the forward pass is done by the time the step would
        # hand them over: holding them would delay every token by a whole step (on a busy CPU worker,
        # tens of seconds of TTFT while a batch of long prefills ran, and leases ticking meanwhile).
        self._hold_outputs = engine.device.type == "cuda" if hold_outputs is None else hold_outputs  # tests hold on CPU
        if engine.graph_capture:
            log.info("CUDA graphs captured before serving: %s", engine.graph_capture)
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the step thread between steps."""
        future: Future[T] = Future()
        with self._submitting:
            if self.lost is not None:
                raise self.lost
            if self._stop.is_set() or self._ended:
                raise RuntimeError("the engine is shut down")
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
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs until it finishes; leaving early (cancel, break) aborts it."""
        if request_id in self._streams:
            raise InvalidRequest("request_id", f"{request_id!r} is already streaming", "use a unique request id")
        stream = _Stream(asyncio.get_running_loop(), self.stream_interval)
        self._streams[request_id] = stream

        def add(engine: Engine) -> None:
            engine.add_request(
                request_id, prompt_token_ids, params,
                prior_output_ids=prior_output_ids, kv_import=kv_import, kv_export=kv_export,
                prefill_only=prefill_only, priority=priority,
            )  # fmt: skip
            self._bound[request_id] = stream

        finished = False
        try:
            await self.call(add)  # validation errors surface here, in the caller
            while not finished:
                out = await stream.next()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stop.is_set():
                with contextlib.suppress(DeviceLost):
                    self.submit(lambda e: self._abort_stream(request_id, stream))

    async def abort(self, request_id: str) -> None:
        await self.call(lambda e: self._abort(request_id))

    async def reserve(self, request_id: str, num_tokens: int) -> list[BlockId]:
        return await self.call(lambda e: e.reserve(request_id, num_tokens))

    async def stats(self) -> EngineStats:
        return await self.call(lambda e: e.stats())

    def shutdown(self, join_timeout_s: float = 30.0) -> bool:
        """Stop the step thread; wait for it at most join_timeout_s (a service passes what its
        supervisor's stop margin leaves). False, with an error logged, when a step still runs:
        the thread is a daemon, it goes with the process."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=join_timeout_s)
        if self._thread.is_alive():
            log.error("the engine's step thread did not end within %.1f s (a step still runs); stopping without it",
                      join_timeout_s)  # fmt: skip
            return False
        log.info("engine step loop: %s", self.engine.step_times.summary())
        return True

    # -- the step thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._steps()
        finally:  # commands queued since the last look (the stop came mid-step) are refused
            with self._submitting:
                self._ended = True
                self._refuse_commands(self.lost or RuntimeError("the engine shut down"))

    def _steps(self) -> None:
        times = self.engine.step_times
        while not self._stop.is_set():
            watch = Stopwatch(times)
            self._run_commands()
            watch.lap(Phase.COMMANDS)
            if not self.engine.has_work():
                self._flush()
                # Exports' blocks go back once their copies have run: poll for that while idle.
                self.engine.release_exported()
                self._wake.wait(_IDLE_POLL_S if self.engine.exports_pending else None)
                self._wake.clear()
                watch.lap(Phase.IDLE)
                continue
            try:
                # The previous step's outputs go to their callers while this step runs on the device.
                outputs = self.engine.step_held(while_device_runs=self._flush, defer_text=self._hold_outputs)
            except Exception as exc:  # a model bug or OOM must not take the other requests down
                self._flush()
                if self._step_failed(exc):
                    return
                continue
            self._failed_steps = 0
            watch = Stopwatch(times)
            self._flush()  # a step that launched nothing (only KV imports in flight) called no one
            self._pending = self._address(outputs)
            if not self._hold_outputs:
                self._flush()
            watch.lap(Phase.DISPATCH)
            if not outputs and self.engine.batcher.waiting and not self.engine.batcher.running:
                self._wake.wait(_IDLE_POLL_S)  # only KV imports in flight: don't spin
                self._wake.clear()
                watch.lap(Phase.IDLE)
        self._flush()
        self._fail_all(RuntimeError("the engine shut down"))

    def _flush(self) -> None:
        """Hand the held outputs to their callers."""
        if self._pending is not None:
            (held, streams), self._pending = self._pending, None
            self._dispatch(list(zip(streams, held.build(), strict=True)))

    def _address(self, held: HeldOutputs) -> tuple[HeldOutputs, list[_Stream | None]]:
        """A step's outputs with the stream each goes to, fixed as the step ends; a request's last
        output unbinds its stream, so its id is free for a new request's."""
        return held, [self._bound.pop(rid, None) if ends else self._bound.get(rid) for rid, ends in held.request_ends()]

    def _step_failed(self, exc: Exception) -> bool:
        """Fail the requests in flight; True when the device is lost and the loop must end."""
        self._failed_steps += 1
        problem = self.engine.device_problem()
        if problem is None and self._failed_steps >= _MAX_FAILED_STEPS:
            problem = f"{self._failed_steps} steps in a row failed, the last with {type(exc).__name__}: {exc}"
        if problem is None:
            log.error("engine step failed; failing the requests in flight", exc_info=exc)
            self._fail_all(exc)
            return False
        log.critical("the engine's device is lost; failing every request and stopping: %s", problem, exc_info=exc)
        self.lost = DeviceLost(problem)
        self._stop.set()
        if self.on_device_lost is not None:  # first: the owner stops serving before callers hear of it
            self.on_device_lost(self.lost)
        self._fail_all(self.lost)
        self._refuse_commands(self.lost)
        return True

    def _run_commands(self) -> None:
        times = self.engine.step_times
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:
                future.set_exception(exc)
            seconds = time.perf_counter() - start
            times.add_command(command_name(fn), seconds, time.thread_time() - start_cpu)
            if seconds > _SLOW_COMMAND_S:
                log.debug("slow engine command: %s took %.1f ms", command_name(fn), seconds * 1000)

    def _refuse_commands(self, exc: BaseException) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def _dispatch(self, items: Sequence[tuple[_Stream | None, Item]]) -> None:
        by_loop: defaultdict[asyncio.AbstractEventLoop, list[tuple[_Stream, Item]]] = defaultdict(list)
        for stream, item in items:
            if stream is not None:  # None: a request no caller streams (added by a command)
                by_loop[stream.loop].append((stream, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: its caller is gone
                loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, exc: BaseException) -> None:
        """End every request; each stream still bound hears `exc` (one whose request a failed step
        ended too, its last output never made, as well)."""
        failed: list[tuple[_Stream | None, Item]] = [(stream, exc) for stream in self._bound.values()]
        for request_id in list(self.engine.requests):
            self._abort(request_id)
        self._bound.clear()
        self._dispatch(failed)

    def _abort(self, request_id: str) -> None:  # on the step thread
        self._bound.pop(request_id, None)
        with contextlib.suppress(RequestNotFound):  # it finished on its own first
            self.engine.abort(request_id)

    def _abort_stream(self, request_id: str, stream: _Stream) -> None:  # on the step thread
        """Its caller left `stream`: abort the request, unless it has ended and the id is another's."""
        if self._bound.get(request_id) is stream:
            self._abort(request_id)


def command_name(fn: Callable[..., object]) -> str:
    """Who asked, for the step loop's summary: "Offerer._offer_shared" for a lambda made there."""
    qualname = getattr(fn, "__qualname__", type(fn).__name__)
    return ".".join(part for part in qualname.split(".") if part not in ("<locals>", "<lambda>"))
