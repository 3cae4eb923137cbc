"""Turning a failed KV transfer seen by the engine into the transport's typed error."""

from __future__ import annotations

from kvtransfer.errors import TransferFailed
from kvtransfer.receiver import KVTicketImport


def transfer_failed(landing: KVTicketImport | None, detail: str | None) -> Exception:
    if landing is not None:
        error = landing.error()
        if isinstance(error, TransferFailed):
            return error
        return TransferFailed(landing.info.address, landing.info.ticket_id, 0, detail or "the KV import failed")
    return RuntimeError(detail or "the request failed")
