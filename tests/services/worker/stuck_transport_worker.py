"""`pdmesh serve` whose KV transport's loop thread blocks for good once the transport begins to
close: a test hook, so that a test can show a worker's stop ends within its budget even when the
transport's thread never stops (a hung UCX call, a callback that never returns).

    python tests/services/worker/stuck_transport_worker.py serve prefill ...

It logs "kv transport loop blocked" on that thread first. Everything else is the real worker.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from kvtransfer.transport import KVTransport  # noqa: E402
from pdmesh.cli import main  # noqa: E402

teardown = KVTransport._teardown


async def _blocked_teardown(self: KVTransport) -> None:
    structlog.get_logger(__name__).warning("kv transport loop blocked")
    threading.Event().wait()  # on the loop's thread: nothing on the loop runs again
    await teardown(self)


KVTransport._teardown = _blocked_teardown  # type: ignore[method-assign]

main(sys.argv[1:])
