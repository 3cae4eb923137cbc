"""KV block movement between workers over UCX (ucxx): connections, handshake, tickets, layer-wise push.

The engine sees two small interfaces (engine.handoff): a prefill worker pushes a request's layers
through a KVPush, a decode worker waits on a TicketImport. Both come from one KVTransport per
worker process, and one Ticket describes the hold between them:

    transport = KVTransport(layout, TransportConfig(ucx_tls="tcp,self"), kv_caches=engine_caches).start()
    imported = transport.expect("req-1", block_ids, num_tokens, timeout_s=30)   # decode side
    push = transport.push(imported.ticket)                                      # prefill side
"""

from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.errors import IncompatiblePeer, TransferFailed
from kvtransfer.push import KVPush
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.telemetry import Direction, NullObserver, TransferObserver, TransferStats
from kvtransfer.ticket import Ticket, TicketId
from kvtransfer.ticket_import import LeaseState, TicketImport
from kvtransfer.transport import KVTransport

__all__ = [
    "Direction",
    "IncompatiblePeer",
    "KVPush",
    "KVCaches",
    "KVReceiver",
    "KVSender",
    "KVTransport",
    "LeaseState",
    "NullObserver",
    "Ticket",
    "TicketId",
    "TicketImport",
    "TransferFailed",
    "TransferObserver",
    "TransferStats",
    "TransportConfig",
]
