"""A receiver whose writer was SIGKILLed while it mapped the receiver's caches counts that writer's
CUDA IPC shares down for it, once the writer's process is gone: its torch never will, and the
receiver's torch would warn at exit. Never for a live writer (nor one not yet reaped), never
twice, and never a count the writer took down itself before it died.

The GPU path (torch's _share_cuda_ and _release_ipc_counter, CUDA only) cannot run here. What runs
is the bookkeeping, on real ref-counter files: torch's RefcountedMapAllocator files in /dev/shm,
made by CPU file_system sharing (the same allocator and layout torch's CUDA IPC counters use),
and real writer processes killed with SIGKILL. The count-down itself, CUDA-only in torch, is the
same `-= 1` on the same file done through the tensor mapping it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from engine.kv_layout import KVLayout
from kvtransfer import ipc
from kvtransfer.ipc import CacheExport, LostExports, process_gone, share_count
from kvtransfer.wire import Hello, decode, encode

LAYOUT = KVLayout("m", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=2)


class CounterFile:
    """torch's ref-counter file as a writer's shares find it: one int64 count per share, set to 1."""

    def __init__(self, num_shares: int) -> None:
        self.counts = torch.ones(num_shares, dtype=torch.int64)
        self.handle = self.counts.untyped_storage()._share_filename_cpu_()[1]

    def shares(self, *offsets: int) -> list[tuple[bytes, int]]:
        return [(self.handle, offset) for offset in offsets]

    def release(self, handle: bytes, offset: int) -> None:
        """What torch's _release_ipc_counter does to the file (on a CUDA build only)."""
        assert handle == self.handle
        self.counts[offset] -= 1


@pytest.fixture()
def counters(monkeypatch: pytest.MonkeyPatch) -> CounterFile:
    file = CounterFile(4)
    monkeypatch.setattr(ipc, "_release_counter", file.release)
    return file


@pytest.fixture()
def writers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(10)


def writer(started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    started.append(proc)
    return proc


def export_to(pid: int, shares: list[tuple[bytes, int]]) -> CacheExport:
    export = CacheExport(b"", [], shares, peer_pid=pid)
    export.close()  # the connection was lost
    return export


def test_a_killed_writers_shares_are_counted_down_once_it_is_gone_and_a_live_ones_never(
    counters: CounterFile, writers: list[subprocess.Popen[bytes]]
) -> None:
    live, killed = writer(writers), writer(writers)
    lost = LostExports()
    lost.add(export_to(live.pid, counters.shares(0, 1)))  # its connection dropped; it still runs
    killed.send_signal(signal.SIGKILL)
    lost.add(export_to(killed.pid, counters.shares(2, 3)))
    assert counters.counts.tolist() == [1, 1, 1, 1]  # nothing yet: the killed one may not be reaped
    killed.wait(10)  # reaped: its pid is gone, and its mappings with it
    assert process_gone(killed.pid) and not process_gone(live.pid)

    lost.sweep()  # the receiver's transport closes
    assert counters.counts.tolist() == [1, 1, 0, 0]
    assert len(lost) == 1  # the live writer's, still counted
    lost.sweep()
    assert counters.counts.tolist() == [1, 1, 0, 0]  # never twice

    live.kill()
    live.wait(10)
    lost.sweep()
    assert counters.counts.tolist() == [0, 0, 0, 0] and len(lost) == 0


def test_counts_a_dead_writer_took_down_itself_or_an_unknown_writers_are_left_alone(
    counters: CounterFile, writers: list[subprocess.Popen[bytes]]
) -> None:
    gone = writer(writers)
    gone.kill()
    gone.wait(10)
    counters.counts[0] = 0  # it unmapped share 0 before it died; share 1 it still mapped
    lost = LostExports()
    lost.add(export_to(gone.pid, counters.shares(0, 1)))
    assert counters.counts.tolist()[:2] == [0, 0]  # share 1 down to 0, share 0 not to -1
    unknown = export_to(0, counters.shares(2))  # a peer whose Hello named no process
    lost.add(unknown)
    lost.sweep()
    assert counters.counts[2] == 1 and len(lost) == 1
    assert share_count(b"/pdmesh-no-such-counter-file", 0) is None  # unreadable: never counted down


def test_a_same_host_dialer_names_its_process_in_its_hello() -> None:
    hello = Hello("127.0.0.1:1", "instance", LAYOUT, "boot/pidns", 4321)
    assert decode(encode(hello)) == hello
    assert decode(encode(Hello("127.0.0.1:1", "instance", LAYOUT))).pid == 0  # not offered an export
