"""`pdmesh serve kvstore` whose next fetch stalls once a test arms it, so that the test can SIGKILL
the store in the middle of a fetch: the blocks are pinned and loaded, the worker's import waits.

    python tests/mesh/stalling_store.py CONTROL_DIR serve kvstore ...

The test creates CONTROL_DIR/arm; the next Fetch removes it, creates CONTROL_DIR/fetching and
waits forever before pushing anything. While CONTROL_DIR/delay exists, every Fetch waits that
many seconds (its text) before pushing: a slow store. A fetch over shared memory (a worker on
this host) stalls or waits the same way once its blocks are pinned, before answering their
slots. Everything else is the real store.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvtransfer.ticket import Ticket  # noqa: E402
from pdmesh.cli import main  # noqa: E402
from services.kvstore.namespace import Namespace  # noqa: E402
from services.kvstore.shared import SharedFetch, SharedTransfers  # noqa: E402
from services.kvstore.transfers import StoreTransfers  # noqa: E402

control = Path(sys.argv[1])
push = StoreTransfers._push
shared_fetch = SharedTransfers.fetch


async def _stalling_push(self: StoreTransfers, namespace: Namespace, ticket: Ticket, slots: list[int]) -> int:
    await _stall()
    return await push(self, namespace, ticket, slots)


async def _stalling_shared_fetch(self: SharedTransfers, *args: object, **kwargs: object) -> SharedFetch:
    fetch = await shared_fetch(self, *args, **kwargs)  # type: ignore[arg-type]
    await _stall()  # pinned, not yet answered (a SIGKILL now leaves the worker's call to fail)
    return fetch


async def _stall() -> None:
    arm = control / "arm"
    if arm.exists():
        arm.unlink()
        (control / "fetching").touch()
        await asyncio.Event().wait()
    delay = control / "delay"
    if delay.exists():
        await asyncio.sleep(float(delay.read_text()))


StoreTransfers._push = _stalling_push  # type: ignore[method-assign]
SharedTransfers.fetch = _stalling_shared_fetch  # type: ignore[method-assign]
main(sys.argv[2:])
