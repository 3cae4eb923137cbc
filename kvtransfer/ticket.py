"""What a decode worker hands out when it reserves blocks for an incoming transfer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

TicketId = NewType("TicketId", str)


@dataclass(frozen=True)
class TicketInfo:
    """A ticket descriptor in simple fields, carried by the Reserve RPC to the prefill worker.

    address: the receiving worker's UCX listener, "host:port".
    lease_expiry_unix_s: wall-clock time (seconds since the epoch) after which the receiver gives up.
    """

    address: str
    ticket_id: TicketId
    num_blocks: int
    num_tokens: int
    lease_expiry_unix_s: float

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])
