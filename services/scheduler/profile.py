"""Performance profiles: what a kind of worker's steps and KV pushes cost, as one JSON file.

A profile is the prior of the scheduler's predictors (services/scheduler/predictor.py: what it
assumes before the workers' own samples arrive) and the truth of the simulator's workers
(pdmesh/sim). Profiles come from two places: built in (below, with the figures they rest on), or
recorded from a live mesh by `pdmesh bench profile`, which writes the models the scheduler
calibrated from its workers' reports.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.scheduler.predictor import StepModel, TransferModel


@dataclass(frozen=True)
class RoleProfile:
    """One role's workers: the engine limits that shape their batches."""

    kv_capacity_tokens: int  # KV the pool holds
    max_batched_tokens: int = 2048  # per-step token budget (prompt chunks)
    max_running: int = 64  # requests in one batch


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # where the figures come from, for a reader
    model: str
    step: StepModel  # one engine, one device: both roles' steps follow it
    prefill: RoleProfile
    decode: RoleProfile
    transfer: TransferModel
    kv_bytes_per_token: int  # what a prompt's KV weighs on the wire
    step_noise: float = 0.0  # relative standard deviation of a step's time (the simulator draws it)
    # What the step model leaves out, for the simulator (pdmesh bench profile measures them on a live
    # mesh; 0 for a GPU profile whose figures hold without them):
    shared_cores: float = 0.0  # >0: every worker's steps share this many cores (a CPU mesh on one host)
    step_gap_ms: float = 0.0  # a busy engine's time between its steps, beyond the steps it times
    request_overhead_ms: float = 0.0  # per request, before its prompt reaches a worker: the calls to get there
    handoff_ms: float = 0.0  # per hand-off, from its first token to joining the decode batch (Decode.Generate)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Profile:
        try:
            return cls(
                name=doc["name"], source=doc["source"], model=doc["model"], step=StepModel(**doc["step"]),
                prefill=RoleProfile(**doc["prefill"]), decode=RoleProfile(**doc["decode"]),
                transfer=TransferModel(**doc["transfer"]), kv_bytes_per_token=doc["kv_bytes_per_token"],
                step_noise=doc.get("step_noise", 0.0), shared_cores=doc.get("shared_cores", 0.0),
                step_gap_ms=doc.get("step_gap_ms", 0.0), request_overhead_ms=doc.get("request_overhead_ms", 0.0),
                handoff_ms=doc.get("handoff_ms", 0.0),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ValueError(f"profile: not a pdmesh profile ({e!r}); record one with `pdmesh bench profile`") from None


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a JSON file; ValueError names what is available."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"profile: {name_or_path!r} is neither a built-in profile ({', '.join(BUILTIN)}) nor a file; "
            "record one with `pdmesh bench profile`"
        )
    return Profile.from_json(json.loads(path.read_text()))


def save_profile(profile: Profile, path: Path) -> None:
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")


# Llama-3.1-8B in bf16 on one H100 80GB, from the figures in BENCHMARKS.md (2026-11-25, two H100s):
# - a step's fixed cost: TPOT p50 16-20 ms at light load (graphs) less its context share: ~12 ms of
#   weight reads and launches.
# - prompt tokens: the disaggregated Mooncake replay ran ~16.4k prompt tokens/s on one H100 (888k
#   tokens in 439 steps of 123 ms, ~2k tokens a step, prompts ~2.9k long): 0.05 ms a token after
#   the fixed cost and the attention share; attention pairs at the same effective rate as the
#   matmuls (4 * hidden * layers = 0.52 MFLOP a pair against 16 GFLOP a token: 1.8 ns a pair).
# - decode rows: the paged-attention figures (batch 64 x 2048 context: ~0.2 ms a layer, 32 layers)
#   give ~0.047 us per context token (a token's K/V is 128 KiB: ~2.8 TB/s, the copy rate).
# - transfer: GPU1 -> GPU0 fixed 3.2 ms a ticket, 84 GB/s with the default 32 MiB messages; with
#   layer-wise push only the last layer group (1/32 of the bytes) is exposed after compute.
# - KV: 131,072 bytes a token; ~60 GB of the 80 left after weights and activations: 450k tokens.
H100_LLAMA_8B = Profile(
    name="h100-llama-3.1-8b",
    source="BENCHMARKS.md 2026-11-25: disaggregated trace replay, paged-attention kernels, GPU1->GPU0 KV",
    model="Llama-3.1-8B (bf16)",
    step=StepModel(fixed_ms=12.0, ms_per_prefill_token=0.05, ns_per_attention_pair=1.8, ms_per_decode_request=0.05,
                   us_per_decode_context_token=0.047),  # fmt: skip
    prefill=RoleProfile(kv_capacity_tokens=450_000, max_batched_tokens=8192, max_running=256),
    decode=RoleProfile(kv_capacity_tokens=450_000, max_batched_tokens=2048, max_running=256),
    transfer=TransferModel(fixed_ms=3.2, ms_per_mib=1.048576 / 84 / 32),  # MiB at 84 GB/s in ms, 1/32 exposed
    kv_bytes_per_token=131_072,
    step_noise=0.05,
)

BUILTIN: dict[str, Profile] = {H100_LLAMA_8B.name: H100_LLAMA_8B}
