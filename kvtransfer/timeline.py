"""Per-ticket timelines: when each step of a transfer happened, on either side, for finding where a
ticket's time goes (bench/kv_transfer.py --timeline).

Steps are stamped with time.monotonic_ns(), which on Linux is one system-wide clock: the
sender's and the receiver's stamps, taken in two processes of one host, line up. Off by default
(TransportConfig.record_timeline); off, a step costs one attribute test. On, the recorder keeps
the last _KEEP steps of every ticket, so a long run cannot grow it without bound.
"""

from __future__ import annotations

import collections
import enum
import threading
import time


class Step(enum.Enum):
    # the sending side
    OPENED = "open"  # push() called (engine thread)
    CONNECTED = "connected"  # the ticket has its connection (at once when one was open: no dial)
    FIRST_LAYER = "first_layer"  # the first push_layer (engine thread)
    GROUP_FULL = "group_full"  # the push_layer that completes a message (a group of layers) entered
    IDS_READY = "ids_ready"  # the ticket's block ids are queued to the device (at the first push_layer)
    ASK_SENT = "ask_sent"  # direct writes: the AskWrite's send completed
    GRANTED = "granted"  # the receiver's Granted arrived
    ARMED = "armed"  # its block ids arrived: copies may launch
    COPY_LAUNCHED = "copy_launched"  # direct: a group's copy kernel queued (engine thread, or the loop at arming)
    PACKED = "pack_launched"  # a message's pack (direct: the ticket's last copy and its end event) queued
    SEND_TASK = "send_task"  # the loop picked the message up
    HEADER_SENT = "header_sent"  # its Data header's (direct: the Written's) send completed
    PACK_DONE = "pack_done"  # the loop saw its pack (direct: the written thread saw every copy) finished
    PAYLOAD_SENT = "payload_sent"  # its payload's send completed
    DONE_HEARD = "done_heard"  # the receiver's Done arrived
    COMPLETED = "completed"  # the push's future resolved
    # the receiving side
    EXPECTED = "expected"  # the ticket registered on the loop
    HOLD_HEARD = "hold_heard"
    ASK_HEARD = "ask_heard"
    GRANT_SENT = "grant_sent"  # the Granted and its block ids were sent
    WRITTEN_HEARD = "written_heard"  # direct writes: the sender's Written arrived
    DATA_HEARD = "data_heard"  # a Data header arrived
    RECV_POSTED = "recv_posted"  # its payload's receive posted
    PAYLOAD_LANDED = "payload_landed"  # the payload is in the staging buffer
    UNPACKED = "unpacked"  # the payload is in the ticket's blocks
    LANDED = "landed"  # every layer landed: the ticket's future resolved
    DONE_SENT = "done_sent"  # the Done's send completed


_KEEP = 4096  # steps kept, all tickets together


class Timeline:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._steps: collections.deque[tuple[str, str, int, int]] = collections.deque(maxlen=_KEEP)
        self._lock = threading.Lock()  # the engine thread and the transport's loop both stamp

    def mark(self, ticket: str, step: Step, part: int = -1) -> None:
        """Stamp a step of a ticket now; part tells a ticket's messages apart (their first layer)."""
        if self.enabled:
            stamp = time.monotonic_ns()
            with self._lock:
                self._steps.append((ticket, step.value, part, stamp))

    def take(self, ticket: str) -> list[tuple[str, int, int]]:
        """A ticket's steps so far as (step, part, monotonic ns), oldest first, removed from the record."""
        with self._lock:
            mine = [s for s in self._steps if s[0] == ticket]
            rest = [s for s in self._steps if s[0] != ticket]
            self._steps.clear()
            self._steps.extend(rest)
        return [(step, part, stamp) for _, step, part, stamp in mine]
