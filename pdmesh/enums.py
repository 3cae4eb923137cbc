"""The mesh's closed sets, one enum per concept, shared by the client library, the scheduler and
the workers. Each mirrors a proto enum member for member (WORKER_ROLE_PREFILL is
WorkerRole.PREFILL); pdmesh.convert maps between them by name. Why a generation ended is the
engine's FinishReason everywhere (engine.request), re-exported here.

Torch-free and protobuf-free: the scheduler and the client library import it.
"""

from __future__ import annotations

import enum

from engine.request import FinishReason

__all__ = ["ExecutionPlan", "FinishReason", "Priority", "WorkerHealth", "WorkerRole"]


class WorkerRole(enum.Enum):
    PREFILL = "prefill"  # computes prompts and pushes their KV to decode workers
    DECODE = "decode"  # receives KV (or prefills itself) and generates tokens


class WorkerHealth(enum.Enum):
    SERVING = "serving"  # takes new requests
    DRAINING = "draining"  # finishing what it has before it stops; takes no new requests
    STALE = "stale"  # missed its load reports (the scheduler's judgement); out of placement


class ExecutionPlan(enum.Enum):
    """How a request runs: the one meaning of "plan" in pdmesh."""

    DISAGGREGATED = "disaggregated"  # a prefill worker computes the prompt, its KV goes to the decode worker
    LOCAL_PREFILL = "local_prefill"  # the decode worker computes the prompt itself


class Priority(enum.Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """Higher runs first: 0 low, 1 normal, 2 high (the engine's and the scheduler's order)."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}
