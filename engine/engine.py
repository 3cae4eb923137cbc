"""The Engine: one model, one KV pool, one batcher; add requests, step, abort.

Synchronous and single-threaded on purpose: engine.async_engine runs it on a thread for asyncio
callers. The step is: form a batch, run the model, sample, account for the new tokens.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.batcher import Batch, Batcher, step_shape
from engine.block_exchange import BlockExchange
from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.cpu_linear import packing_supported
from engine.cpu_threads import CpuThreads
from engine.cuda_graphs import CaptureReport
from engine.device_identity import device_identity
from engine.errors import DeviceLost, EngineError, InvalidRequest, RequestNotFound
from engine.handoff import KVExportSink, KVImport
from engine.ids import BlockHash, BlockId, RequestId
from engine.kv_cache import allocate_kv_cache, plan_num_blocks
from engine.kv_layout import KVLayout
from engine.kv_manager import KVManager, blocks_for
from engine.model import LlamaModel, build_model
from engine.model_config import ModelConfig
from engine.output import HeldOutputs, OutputProcessor, request_output
from engine.request import FinishReason, Request, RequestOutput, RequestStatus
from engine.reservations import PrefixReservation, Reservations
from engine.runner import ModelRunner
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.step_samples import StepRecorder
from engine.step_timer import Phase, StepTimes, Stopwatch
from engine.tokenizer import Tokenizer
from engine.validation import RequestLimits, check_request, check_request_id
from engine.weights import load_checkpoint
from kernels.cpu_native import native_attention_for
from kernels.cpu_norm import native_rms_norm


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_reserved_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int  # since start


class Engine:
    def __init__(
        self, config: EngineConfig, model: LlamaModel, tokenizer: Tokenizer | None, fingerprint: str
    ) -> None:
        self.config = config
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.device = torch.device(config.device)
        self.device_id = device_identity(self.device)  # what co-resident workers share (the scheduler's)
        self.dtype = getattr(torch, config.resolved_dtype)
        cache = config.cache
        num_blocks = plan_num_blocks(self.model_config, cache, self.dtype, self.device)
        # One block more than the pool hands out: padding rows of captured decode graphs write there.
        self.kv_caches = allocate_kv_cache(
            self.model_config, num_blocks + 1, cache.block_size, self.dtype, self.device
        )
        self.pool = BlockPool(num_blocks)
        # What every request is checked against (engine.validation): fixed for the engine's life.
        self.limits = RequestLimits(
            self.model_config.vocab_size, tokenizer is not None, self.model_config.max_position_embeddings,
            cache.block_size, num_blocks,
        )  # fmt: skip
        self.kv = KVManager(self.pool, cache.block_size, fingerprint, cache.enable_prefix_caching)
        self.batcher = Batcher(config.batcher, self.kv)
        if self.device.type == "cpu" and config.cpu_packed_linears and packing_supported(self.dtype):
            model.pack_for_cpu()
        self.runner = ModelRunner(model, self.kv_caches, cache.block_size)
        if self.device.type == "cpu" and config.cpu_native_attention:
            self.runner.cpu_attention = native_attention_for(self.kv_caches[0], self.model_config.num_heads)
        if self.device.type == "cpu" and config.cpu_native_norm:
            model.use_native_norms(native_rms_norm())
        self.cpu_threads = CpuThreads.for_device(self.device, config.cpu_small_step_max_tokens)
        self.graph_capture: list[CaptureReport] = []
        if self.device.type == "cuda":  # every graph now, before any other thread touches the device
            max_batch = min(config.cuda_graph_max_batch, config.batcher.max_running)
            max_width = min(blocks_for(self.model_config.max_position_embeddings, cache.block_size), num_blocks)
            pieces = config.batcher.max_batched_tokens if config.piecewise_cuda_graphs else None
            self.graph_capture = self.runner.capture_graphs(num_blocks, max_batch, max_width, pieces)
        self.num_steps = 0  # steps that ran a batch
        self.step_times = StepTimes()
        self._lost: str | None = None  # why the device is unusable, once known
        self.sampler = Sampler()
        self.steps = StepRecorder()  # what steps cost, for the scheduler's predictors
        self.requests: dict[RequestId, Request] = {}
        self._outputs: dict[RequestId, OutputProcessor] = {}
        self._held: HeldOutputs | None = None  # the latest step_held's outputs, maybe still owing text
        self.reservations = Reservations(self.kv, cache, fingerprint)
        self.exchange = BlockExchange(
            self.kv_caches, self.pool, self.kv, self.reservations, self.requests, cache.block_size
        )
        self._seeds = random.Random(config.seed)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or (
            tokenizer.eos_token_ids if tokenizer is not None else ()
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the configured checkpoint (a local HF directory, a GGUF file or "smollm2")."""
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        checkpoint = load_checkpoint(config.model)
        model = build_model(checkpoint.config, config)
        model.load_weights(checkpoint.tensors(model.embed_tokens.weight.dtype, config.device))
        return cls(config, model, checkpoint.tokenizer(), checkpoint.fingerprint)

    @classmethod
    def with_random_weights(cls, model_config: ModelConfig, config: EngineConfig, seed: int = 0) -> Engine:
        """An engine on random weights in a real model's shapes (benchmarks); no tokenizer, no text."""
        model = build_model(model_config, config)
        model.init_random(seed)
        return cls(config, model, None, model_config.fingerprint(f"random:{seed}"))

    @property
    def kv_layout(self) -> KVLayout:
        m = self.model_config
        return KVLayout(
            model_fingerprint=self.fingerprint,
            dtype=self.config.resolved_dtype,
            block_size=self.config.cache.block_size,
            num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
        )

    # -- requests ----------------------------------------------------------------------------

    def add_request(
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
    ) -> None:
        """Queue a request. `prior_output_ids` are outputs some other worker already produced
        (they count toward max_tokens and are not emitted again). With `kv_import` the request's
        blocks must have been reserved under the same id. A `prefill_only` request ends after its
        first token, with no finish reason unless the generation itself ended there: another
        worker continues it (its KV goes there through `kv_export`). A higher `priority` is
        scheduled before lower ones (engine.batcher)."""
        rid = RequestId(request_id)
        try:
            check_request_id(
                rid, running=rid in self.requests, reserved=rid in self.reservations, importing=kv_import is not None
            )
            check_request(prompt_token_ids, prior_output_ids, params, prefill_only, self.limits)
        except EngineError:
            if kv_import is not None and rid in self.reservations:  # refused: its blocks go back now
                kv_import.cancel("the request was refused")
                self.reservations.release(rid)
            raise
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        request = Request(
            request_id=rid,
            token_ids=list(prompt_token_ids) + list(prior_output_ids),
            num_prompt_tokens=len(prompt_token_ids),
            params=params,
            seed=seed,
            kv_import=kv_import,
            kv_export=kv_export,
            num_prior_output_tokens=len(prior_output_ids),
            prefill_only=prefill_only,
            priority=priority,
        )
        if kv_import is not None:
            reserved = self.reservations.take(rid)
            request.block_ids = reserved.block_ids
            request.num_cached_tokens = reserved.num_cached_tokens
            request.num_published_blocks = reserved.num_cached_tokens // self.config.cache.block_size
            request.num_imported_tokens = reserved.num_import_tokens
            request.import_optional = reserved.optional
            request.status = RequestStatus.WAITING_FOR_KV
        self._outputs[rid] = OutputProcessor(
            self.tokenizer, params, request.token_ids, self.eos_token_ids, self.max_model_len
        )
        self.requests[rid] = request
        self.batcher.add(request)

    def reserve(self, request_id: str, num_tokens: int) -> list[BlockId]:
        """Hold blocks for a request's first num_tokens tokens, to be written by a KV import (a
        hand-off: the request fails if the import does)."""
        rid = self._new_id(request_id)
        if num_tokens < 1:
            raise InvalidRequest("num_tokens", f"is {num_tokens}", "reserve at least one token")
        return self.reservations.hold(rid, num_tokens, busy=bool(self.requests or self.reservations))

    def reserve_prefix(self, request_id: str, prompt_token_ids: Sequence[int], num_tokens: int) -> PrefixReservation:
        """Hold what a request needs to start with its first num_tokens prompt tokens imported (from a
        KV store): its cached leading blocks and blocks for the rest (engine.reservations). Add the
        request with the import, or abort the reservation. Nothing is held when there is nothing
        to import."""
        rid = self._new_id(request_id)
        return self.reservations.hold_prefix(rid, prompt_token_ids, num_tokens, busy=bool(self.requests))

    def _new_id(self, request_id: str) -> RequestId:
        rid = RequestId(request_id)
        if rid in self.requests or rid in self.reservations:
            raise InvalidRequest("request_id", f"{rid!r} is already in use", "use a unique request id")
        return rid

    def take_finished_chains(self) -> list[tuple[BlockHash, ...]]:
        """The full-block hash chains of the requests finished since the last take, oldest first."""
        return self.exchange.take_finished_chains()

    def export_blocks(self, hashes: Sequence[BlockHash], sink: KVExportSink) -> int:
        """Push cached blocks through `sink` between steps (engine.block_exchange); the blocks pushed."""
        return self.exchange.export_blocks(hashes, sink)

    def release_exported(self) -> None:
        """Give back the blocks of exports whose copies have run (engine.block_exchange)."""
        self.exchange.release_exported()

    @property
    def exports_pending(self) -> bool:
        """Exports whose blocks are still held for their copies."""
        return self.exchange.exports_pending

    def import_blocks(
        self, request_id: str, block_ids: Sequence[int], slabs: Sequence[torch.Tensor], slots: Sequence[int]
    ) -> tuple[bool, torch.cuda.Event | None]:
        """Copy a KV store's mapped slots into a pending import's blocks between steps
        (engine.block_exchange); (copied, the CUDA event after the copies)."""
        return self.exchange.import_blocks(request_id, block_ids, slabs, slots)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request or a reservation at any moment; every block it held is released."""
        rid = RequestId(request_id)
        if self.reservations.release(rid):
            return None
        request = self.requests.get(rid)
        if request is None:
            raise RequestNotFound(f"request {rid!r} is not known (finished, aborted or never added)")
        return self._finish(request, FinishReason.ABORT, text="")

    def has_work(self) -> bool:
        return self.batcher.has_work

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_position_embeddings

    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.pool.num_blocks,
            num_free_blocks=self.pool.num_free,
            num_cached_blocks=self.pool.num_cached,
            num_reserved_blocks=self.reservations.num_blocks,
            num_running=len(self.batcher.running),
            num_waiting=len(self.batcher.waiting),
            num_preemptions=self.batcher.num_preemptions,
        )

    # -- the step ----------------------------------------------------------------------------

    def step(self, while_device_runs: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One step of the batch. `while_device_runs` is called once the step's work is queued on
        the device, before waiting for it: host work done there overlaps the device's instead of
        delaying the next launch (the async engine hands over the previous step's outputs)."""
        return self.step_held(while_device_runs, defer_text=False).build()

    def step_held(self, while_device_runs: Callable[[], None] | None = None, defer_text: bool = True) -> HeldOutputs:
        """step(), its outputs built later: with `defer_text` the text of each request that goes on
        with no stop string is decoded by HeldOutputs.build() — call it during the next step's
        `while_device_runs`, where the host's work overlaps the device's (engine.output). A later
        step builds what is still owed before it accepts new tokens, so deltas stay in order."""
        held = HeldOutputs()
        watch = Stopwatch(self.step_times)
        self.exchange.release_exported()  # before the schedule allocates: exported blocks back to the pool
        batch = self.batcher.schedule()
        for output in self._fail_imports(batch):
            held.add(output)
        watch.lap(Phase.SCHEDULE)
        if not batch.chunks:
            return held
        self.num_steps += 1
        if self.num_steps == self.config.inject_device_loss_at_step:
            self._lost = f"device loss injected at step {self.num_steps} (inject_device_loss_at_step)"
            raise DeviceLost(self._lost)
        inputs = self.runner.prepare(batch.chunks)
        self.cpu_threads.fit(batch.num_tokens)
        watch.lap(Phase.PREPARE)
        logits = self.runner.execute(inputs)  # (completing chunks, vocab)
        watch.lap(Phase.LAUNCH)
        if while_device_runs is not None:
            while_device_runs()
            watch.lap(Phase.DISPATCH)
        shape = step_shape(batch)  # while the device runs: the counts are still the step's own
        if self._held is not None:  # the previous step's texts first: a detokenizer takes tokens in order
            self._held.build()
        sampled: list[Request] = []
        for chunk in inputs.order:
            request, completes = chunk.request, chunk.completes
            request.num_computed_tokens += chunk.num_new_tokens
            self.kv.cache_computed_blocks(request)
            if completes:
                sampled.append(request)
                if request.kv_export is not None:
                    request.kv_export.close()
                    request.kv_export = None
        rows = [SamplingRow(r.params, r.seed, r.num_tokens, r.token_ids) for r in sampled]
        result = self.sampler.sample(logits, rows)
        watch.lap(Phase.SAMPLE)
        for i, request in enumerate(sampled):
            logprob = result.logprobs[i] if result.logprobs is not None else None
            self._accept_token(request, result.token_ids[i], logprob, held, defer_text)
        self._held = held if defer_text else None
        watch.lap(Phase.OUTPUT)
        self.step_times.add_step(self.runner.last_kind, watch.elapsed, batch.num_tokens, len(sampled))
        self.steps.record(shape, watch.elapsed * 1000)
        return held

    def device_problem(self) -> str | None:
        """After a failed step: why the device can no longer run steps, or None when it still can
        (a tiny kernel runs and the device synchronises)."""
        if self._lost is None and self.device.type == "cuda":
            try:
                probe = torch.ones(1, device=self.device)
                probe.add_(1)
                torch.cuda.synchronize(self.device)
            except Exception as e:  # a sticky CUDA error fails every call from now on
                self._lost = f"the device no longer runs kernels: {e}"
        return self._lost

    def _accept_token(
        self, request: Request, token_id: int, logprob: float | None, held: HeldOutputs, defer_text: bool
    ) -> None:
        request.token_ids.append(token_id)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        processor = self._outputs[request.request_id]
        logprobs = [logprob] if request.params.logprobs and logprob is not None else None
        if defer_text and not request.prefill_only and processor.ends_without_text(request, token_id) is False:
            held.owe(request, processor, token_id, logprobs)
            return
        text, finish = processor.on_token(request, token_id)
        if finish is None and request.prefill_only:
            # Handed on: the worker that continues starts its stop checks afresh, so nothing stays held.
            text += processor.flush()
        if finish is not None or request.prefill_only:
            out = self._finish(request, finish, text)
            out.new_token_ids, out.new_logprobs, out.stop = [token_id], logprobs, processor.stop
            held.add(out)
            return
        held.add(request_output(request, [token_id], logprobs, text))

    def _finish(
        self, request: Request, reason: FinishReason | None, text: str, error: str | None = None
    ) -> RequestOutput:
        """End the request; reason None: a prefill_only request handed on, its generation not over."""
        if request.kv_export is not None:
            request.kv_export.cancel(error or (reason.value if reason is not None else "ended"))
            request.kv_export = None
        if request.kv_import is not None:  # still arriving: nothing may write the blocks once freed
            request.kv_import.cancel(error or "the request ended")
            request.kv_import = None
        self.batcher.remove(request)
        self.exchange.keep_chain(request)
        self.kv.release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        del self._outputs[request.request_id]
        out = request_output(request, [], None, text)
        out.error = error
        return out

    def _fail_imports(self, batch: Batch) -> list[RequestOutput]:
        return [self._finish(r, FinishReason.ERROR, "", error="KV import failed") for r in batch.failed_imports]
