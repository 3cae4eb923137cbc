"""A hand-built cluster for the `slo` policy's tests: workers that never report load, the ledger,
and the policy over them, on a clock the test sets.

Every worker runs one step model with round numbers, so each expected plan can be worked out by
hand: a step costs 10 ms, plus 0.1 ms per prompt token and 0.1 ms per decode row (attention and
context free); a KV push costs 5 ms. Prompts of up to 2048 tokens take one step (the budget).
"""

from __future__ import annotations

from engine.block_pool import KVEvents
from engine.kv_layout import KVLayout
from pdmesh.config import SloConfig
from pdmesh.enums import Priority, WorkerHealth, WorkerRole
from services.scheduler.ledger import Booking, Ledger
from services.scheduler.placer import Placer
from services.scheduler.policy import Placement, RequestShape
from services.scheduler.predictor import Calibration, CalibrationSettings, StepModel, TransferModel
from services.scheduler.prefix import PromptBlocks
from services.scheduler.registry import Registry
from services.scheduler.reports import Capacity, LoadReport, WorkerInfo
from services.scheduler.slo import SloPolicy, SloSettings

MODEL = StepModel(fixed_ms=10.0, ms_per_prefill_token=0.1, ms_per_decode_request=0.1)
PUSH = TransferModel(fixed_ms=5.0)
LAYOUT = KVLayout("fp", "float16", 16, 2, 2, 8)


class Cluster:
    """A registry of workers that never report load, the ledger, and the slo policy over them, on
    a clock the test sets; `device_id`: every worker on that one device (a shared GPU), "": each on
    its own."""

    def __init__(
        self,
        prefill: int,
        decode: int,
        kv_tokens: int = 1 << 20,
        profile: bool = True,
        wait_weight: float = SloSettings.wait_weight,
        device_id: str = "",
    ) -> None:
        self.now = 100.0
        # Without the profile the workers' models start from nothing and learn from their reports.
        calibration = Calibration(CalibrationSettings(), *((MODEL, PUSH) if profile else (None, None)))
        self.registry = Registry(3600.0, None, calibration, clock=lambda: self.now)
        self.ledger = Ledger(self.registry.clock)
        policy = SloPolicy(self.registry, self.ledger, SloSettings(wait_weight=wait_weight))
        self.placer = Placer(policy, self.registry, self.ledger, SloConfig())
        capacity = Capacity(kv_tokens // LAYOUT.block_size, 256, 2048, 1 << 20)
        for role, count in ((WorkerRole.PREFILL, prefill), (WorkerRole.DECODE, decode)):
            for i in range(count):
                name = f"{role.value}-{i}"
                info = WorkerInfo(name, role, f"test://{name}", "", "m", LAYOUT, capacity, "dev", device_id=device_id)
                self.registry.add(info, None)

    def running(self, decode: str, count: int, tpot_ms: float, prompt: int = 1000, max_tokens: int = 100) -> None:
        """`count` requests decoding on `decode` since now, each with its TPOT target."""
        for i in range(count):
            booking = Booking(f"{decode}/r{i}", 1, prompt, max_tokens, tpot_ms, 0.0, None, decode, self.now)
            self.ledger.book(booking)

    def queued(self, worker: str, work_ms: float, priority: Priority = Priority.NORMAL) -> None:
        """Prompt work already on a worker's queue (bound for decode-0)."""
        rid = f"{worker}/q{len(self.ledger.bookings)}"
        self.ledger.book(Booking(rid, priority.rank, 10, 1, 0.0, work_ms, worker, "decode-0"))

    def caches(self, worker: str, prompt: list[int], tokens: int) -> None:
        """The worker reports the prompt's first `tokens` cached."""
        hashes = PromptBlocks(prompt).hashes(LAYOUT.model_fingerprint, LAYOUT.block_size)[: tokens // LAYOUT.block_size]
        events = KVEvents(snapshot=True, stored=tuple(hashes))
        self.registry.report(LoadReport(worker, 1, health=WorkerHealth.SERVING, kv_events=events))

    def shape(self, prompt: int | list[int], *, ttft_ms: float = 10_000, tpot_ms: float = 0, max_tokens: int = 10,
              priority: Priority = Priority.NORMAL, waited_s: float = 0.0) -> RequestShape:  # fmt: skip
        """A request that arrived `waited_s` ago."""
        tokens = list(range(prompt)) if isinstance(prompt, int) else prompt
        blocks = PromptBlocks(tokens, self.registry.index)
        return RequestShape(f"new{len(self.ledger.bookings)}", blocks, max_tokens, ttft_ms, tpot_ms, priority,
                            received_at=self.now - waited_s)  # fmt: skip

    def place(self, prompt: int | list[int], **options: object) -> Placement:
        return self.placer.place(self.shape(prompt, **options))  # type: ignore[arg-type]
