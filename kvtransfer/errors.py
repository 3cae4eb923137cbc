"""Typed kvtransfer errors: every failure names the peer, the ticket and how far the transfer got."""

from __future__ import annotations


class TransferFailed(Exception):
    """A ticket ended without every layer landing. Maps to UNAVAILABLE (ABORTED when cancelled).

    peer: the other worker's listener address ("host:port"), or "" when it was never known.
    bytes_moved: payload bytes this side had sent (sender) or landed in its blocks (receiver).
    """

    def __init__(self, peer: str, ticket: str, bytes_moved: int, reason: str) -> None:
        self.peer = peer
        self.ticket = ticket
        self.bytes_moved = bytes_moved
        self.reason = reason
        super().__init__(f"ticket {ticket!r} with peer {peer or '?'} failed after {bytes_moved} bytes: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int, str]]:  # picklable across processes
        return (type(self), (self.peer, self.ticket, self.bytes_moved, self.reason))


class IncompatiblePeer(TransferFailed):
    """The handshake found a KV layout field that differs.

    difference: KVLayout.first_difference's words, e.g. "num_kv_heads (ours 3, theirs 4)"; field: its name.
    """

    def __init__(self, peer: str, ticket: str, difference: str) -> None:
        super().__init__(peer, ticket, 0, f"incompatible peer: {difference}")
        self.difference = difference
        self.field = difference.split(" ", 1)[0]

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # type: ignore[override]
        return (type(self), (self.peer, self.ticket, self.difference))
