"""What to do when a worker's call fails: one function from (status code, phase) to a verdict.

The phases of a request's way through the workers, and what each failure means:
- RESERVE (Decode.Reserve): a full cache is worth waiting for or trying another decode worker;
  a worker gone (UNAVAILABLE, ABORTED) is marked and another placed.
- PREFILL (Prefill.Prefill): the request is not at fault when the worker is gone, shutting down
  (CANCELLED), hung past its own timeout (DEADLINE_EXCEEDED), crashed mid-call (INTERNAL, UNKNOWN)
  or its transfer failed (UNAVAILABLE, ABORTED): another prefill worker, or the decode worker
  itself, takes it; a full prefill worker is passed over without being marked.
- COMMIT (Decode.Generate of a ticket, before its first token): a ticket the decode worker no
  longer has (its lease ran out: FAILED_PRECONDITION, NOT_FOUND) leaves a healthy worker, which
  continues by prefilling prompt + first token itself.
- DECODE (a decode stream): a worker gone mid-stream is replaced by another that prefills prompt
  + output so far and continues with the same seed.
Anything else is the request's own fault or beyond repair: the client gets the worker's status.
A call that failed because the client's own deadline passed is never retried (the caller checks).
"""

from __future__ import annotations

import enum

import grpc

Code = grpc.StatusCode


class Phase(enum.Enum):
    RESERVE = "reserve"
    PREFILL = "prefill"
    COMMIT = "commit"
    DECODE = "decode"


class Verdict(enum.Enum):
    FAIL = "fail"  # end the request with the worker's status
    ELSEWHERE = "elsewhere"  # the worker failed: mark it dead, place the request on another
    BUSY = "busy"  # the worker is full: try another (or wait), without marking it
    LOCAL = "local"  # the ticket is gone, the decode worker is fine: prefill there


_GONE = frozenset({Code.UNAVAILABLE, Code.ABORTED})
_PREFILL_BROKE = _GONE | {Code.CANCELLED, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN}
_TICKET_LOST = frozenset({Code.FAILED_PRECONDITION, Code.NOT_FOUND})


def classify(code: grpc.StatusCode, phase: Phase) -> Verdict:
    if code == Code.RESOURCE_EXHAUSTED and phase in (Phase.RESERVE, Phase.PREFILL):
        return Verdict.BUSY
    if code in (_PREFILL_BROKE if phase is Phase.PREFILL else _GONE):
        return Verdict.ELSEWHERE
    if phase is Phase.COMMIT and code in _TICKET_LOST:
        return Verdict.LOCAL
    return Verdict.FAIL
