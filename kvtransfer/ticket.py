"""The ticket: the one description of a hold on a decode worker's blocks that KV is pushed into.

The receiver builds it when a ticket is expected (KVReceiver.expect); the decode service sends it,
converted field for field, in Decode.Reserve's answer; the scheduler passes it to the prefill
worker, whose sender needs nothing else to push. The lease it names is the receiver's clock,
the only one: see receiver.TicketImport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NewType

TicketId = NewType("TicketId", str)


@dataclass(frozen=True)
class Ticket:
    """address: the receiving worker's KV listener, "host:port".
    num_tokens: the first num_tokens prompt tokens, whose KV fills num_blocks blocks.
    lease_expiry_unix_ms: wall-clock time after which the receiver gives the hold up unless it was
    committed; the sender gives up a grace period later (TransportConfig.sender_grace_s).
    traceparent: the W3C trace context of the request the hold is for ("" when none), so the
    spans of the transfer join the request's trace on both sides (kvtransfer itself ignores it).
    """

    ticket_id: TicketId
    address: str
    num_tokens: int
    num_blocks: int
    lease_expiry_unix_ms: int
    traceparent: str = ""

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def lease_left_s(self) -> float:
        """Seconds until the lease ends (negative once it has)."""
        return self.lease_expiry_unix_ms / 1000 - time.time()
