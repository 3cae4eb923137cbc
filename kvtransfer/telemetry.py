"""Telemetry hooks: one callback per finished transfer, wired to metrics and spans by the services."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from kvtransfer.errors import TransferFailed


class Direction(enum.Enum):
    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True)
class TransferStats:
    ticket: str
    peer: str  # the other worker's listener address
    direction: Direction
    bytes: int  # payload bytes (KV only, no headers)
    seconds: float  # first layer handed over (send) or ticket registered (recv) until the last layer landed

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class TransferObserver(Protocol):
    """Called on the transport's thread: keep it quick, and don't raise."""

    def on_complete(self, stats: TransferStats) -> None: ...

    def on_failure(self, error: TransferFailed, direction: Direction) -> None: ...


class NullObserver:
    def on_complete(self, stats: TransferStats) -> None:
        pass

    def on_failure(self, error: TransferFailed, direction: Direction) -> None:
        pass
