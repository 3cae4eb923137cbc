"""A same-host dialer that does not get the receiver's cache export in time tells the receiver it
will never map it (Unmapped, its connection's first frame), never maps it even when the bytes come
later, and goes on over UCX; the receiver then takes that export's CUDA IPC counts down for it, once.
Before, the dial failed, and the receiver, unable to tell that dialer from one that mapped the
export, kept the counts up while the dialer lived: its torch warned at exit (RELIABILITY.md).

The dialer's side runs on real UCX (tcp, in this process): the real handshake against a receiver
that speaks the wire protocol and sends its export late. The receiver's bookkeeping runs on real
ref-counter files, as tests/kvtransfer/test_dead_peer_shares.py does (torch's CUDA IPC sharing
cannot run here)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
import ucxx
from test_dead_peer_shares import LAYOUT, CounterFile

from kvtransfer import TransportConfig, ipc, ucx_context
from kvtransfer.connection import CTL_TAG
from kvtransfer.handshake import greet
from kvtransfer.ipc import EXPORT_TAG, CacheExport, LostExports
from kvtransfer.wire import FRAME_BYTES, Hello, Message, Unmapped, Welcome, decode, encode

TIMEOUT_S = 0.5  # the dialer's handshake timeout; the export comes 3x later
BLOB = b'{"layers": []}'


async def _dial_a_receiver_whose_export_is_late() -> tuple[Welcome, object, Message]:
    """greet() against a receiver that sends its Welcome at once and its export late; what greet
    returned, and the first frame the receiver then read."""
    heard: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    async def receiver(ep: ucxx.Endpoint) -> None:
        frame = bytearray(FRAME_BYTES)
        await ep.recv(frame, tag=CTL_TAG)
        hello = decode(frame)
        assert isinstance(hello, Hello)
        await ep.send(encode(Welcome("127.0.0.1:1", "receiver", hello.layout, len(BLOB))), tag=CTL_TAG)
        await asyncio.sleep(3 * TIMEOUT_S)
        await ep.send(bytearray(BLOB), tag=EXPORT_TAG)  # sent: the receiver cannot tell it was lost
        after = bytearray(FRAME_BYTES)
        await ep.recv(after, tag=CTL_TAG)
        heard.set_result(decode(after))
        await ep.close()

    listener = ucxx.create_listener(receiver)
    ep = await ucxx.create_endpoint("127.0.0.1", listener.port)
    try:
        hello = Hello("127.0.0.1:2", "dialer", LAYOUT, "boot/pidns", 1234)
        welcome, mapped = await greet(ep, hello, "127.0.0.1:1", torch.device("cpu"), TIMEOUT_S)
        first = await asyncio.wait_for(heard, 30)
    finally:
        await ep.close()
        listener.close()
    return welcome, mapped, first


def test_a_dialer_that_misses_the_export_says_so_maps_nothing_and_keeps_the_connection() -> None:
    async def run() -> tuple[Welcome, object, Message]:
        ucx_context.init(TransportConfig(ucx_tls="tcp,self"))
        try:
            return await _dial_a_receiver_whose_export_is_late()
        finally:
            await ucx_context.reset()

    welcome, mapped, first = asyncio.run(run())
    assert welcome.export_bytes == len(BLOB)  # the handshake succeeded: KV goes over UCX
    assert mapped is None
    assert first == Unmapped()


@pytest.fixture()
def counters(monkeypatch: pytest.MonkeyPatch) -> CounterFile:
    file = CounterFile(2)
    monkeypatch.setattr(ipc, "_release_counter", file.release)
    return file


def test_an_export_the_dialer_will_never_map_is_counted_down_once_whatever_comes_after(
    counters: CounterFile,
) -> None:
    dialer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        export = CacheExport(BLOB, [], counters.shares(0, 1), peer_pid=dialer.pid)
        export.withdraw()  # the receiver heard Unmapped (transport.py)
        assert counters.counts.tolist() == [0, 0]  # the dialer lives on: before, they stayed at 1
        export.withdraw()  # a second Unmapped changes nothing
        lost = LostExports()
        export.close()  # then its connection is lost ...
        lost.add(export)
        dialer.kill()  # ... and the dialer's process goes
        dialer.wait(10)
        lost.sweep()
        assert counters.counts.tolist() == [0, 0]  # never twice (torch's uint64 count would wrap)
        assert len(lost) == 0  # nothing kept waiting for that dialer
    finally:
        dialer.kill()
        dialer.wait(10)
