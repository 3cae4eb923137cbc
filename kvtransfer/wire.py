"""The control messages two workers exchange, and their frames.

Every control message travels on one tag per endpoint in a fixed-size frame (a 4-byte length, then
JSON), so the receiving side always posts the same small receive and UCX delivers frames in order.
KV payloads travel separately, each on a tag of its own that the Data header announces:

    sender                                   receiver
    Hello(layout) ------------------------->            on dial; Refuse names the differing field
             <------------------------------ Welcome(layout) | Refuse(layout, difference)
    Hold(ticket) -------------------------->  while the prefill waits or computes, every lease/4
    Data(ticket, layers, nbytes, tag) ----->  then the payload on `tag`; several in flight
    Cancel(ticket, reason) ---------------->
             <------------------------------ Done(ticket, bytes) | Failed(ticket, reason)

Between GPU workers of one host the Hello names the host (ipc.host_identity) and a Welcome that
agrees says how large its cache export is (ipc.py), which follows on EXPORT_TAG; then a ticket's
KV need not travel as payloads at all (direct writes, push.py and receiver.py):

    Unmapped ------------------------------>  first, when the export did not come in time: the
                                              dialer never maps it, the connection goes on over UCX

    AskWrite(ticket) ---------------------->  at once when the push opens: a Hold that asks to write
             <------------------------------ Granted(ticket, direct, tag, block_ids) | Failed(ticket, reason)
             <------------------------------ (direct over UCX: the ticket's block ids, int64, on `tag`)
    (the sender's kernels write the ticket's blocks in the receiver's cache)
    Written(ticket, bytes, checksums) ----->  every layer is there
             <------------------------------ Done | Failed
    (AskWrite, Granted, Written and Done take the Welcome's side channel, a Unix socket, when the
    dialer reached it: side.py; a Granted there carries the block ids itself and names no tag)
    Stopped(ticket) ----------------------->  after a Failed or Cancel of a ticket it asked to
                                              write: nothing of the sender writes its blocks any more

A ticket's lease measures the sender's silence, not the prefill's length: every Hold and every
accepted Data header renews it, so a request queued behind others on a busy prefill worker keeps
its reservation, while one whose prefill worker died (or never started it) loses it after a lease.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from engine.kv_layout import KVLayout

FRAME_BYTES = 4096  # under UCX's rendezvous threshold: frames go eagerly, never waiting for a receive
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Hello:
    kind: ClassVar[str] = "hello"
    name: str  # the dialing worker's own listener address
    instance: str  # random per process: a restarted peer is a new instance
    layout: KVLayout
    host: str = ""  # ipc.host_identity() when the dialer could write into a same-host peer's GPU cache
    pid: int = 0  # with `host`, the dialer's process: gone, the peer counts its CUDA IPC shares down for it


@dataclass(frozen=True)
class Welcome:
    kind: ClassVar[str] = "welcome"
    name: str
    instance: str
    layout: KVLayout
    export_bytes: int = 0  # > 0: the receiver's cache export (ipc.py) follows on EXPORT_TAG
    side_channel: str = ""  # the receiver's Unix socket for direct writes' messages (side.py), and this connection's
    side_token: str = ""  # token for it (hex)


@dataclass(frozen=True)
class Refuse:
    kind: ClassVar[str] = "refuse"
    layout: KVLayout
    difference: str


@dataclass(frozen=True)
class Unmapped:
    """The dialer did not get this connection's cache export in time and will never map it: the
    receiver takes the export's counts down for it (ipc.CacheExport.withdraw)."""

    kind: ClassVar[str] = "unmapped"


@dataclass(frozen=True)
class Hold:
    """The sender has the ticket's prefill in hand (queued or computing) and will push it."""

    kind: ClassVar[str] = "hold"
    ticket: str


@dataclass(frozen=True)
class Data:
    """Announces one payload: layers [first_layer, first_layer + num_layers) of a ticket, packed."""

    kind: ClassVar[str] = "data"
    ticket: str
    first_layer: int
    num_layers: int
    num_blocks: int
    nbytes: int
    tag: int  # the payload's tag on this endpoint
    checksums: tuple[tuple[int, int], ...] = ()  # (chunk index, xxh3 digest) of sampled blocks


@dataclass(frozen=True)
class Cancel:
    kind: ClassVar[str] = "cancel"
    ticket: str
    reason: str


@dataclass(frozen=True)
class Done:
    kind: ClassVar[str] = "done"
    ticket: str
    bytes: int


@dataclass(frozen=True)
class Failed:
    kind: ClassVar[str] = "failed"
    ticket: str
    reason: str


@dataclass(frozen=True)
class AskWrite:
    """A Hold that also asks to write the ticket's blocks directly (the connection mapped them)."""

    kind: ClassVar[str] = "ask_write"
    ticket: str


@dataclass(frozen=True)
class Granted:
    """The ticket is bound to this sender; direct: it may write the blocks itself, else it sends Data."""

    kind: ClassVar[str] = "granted"
    ticket: str
    direct: bool
    tag: int = 0  # direct over UCX: the ticket's block ids (int64) follow on this tag
    block_ids: str = ""  # direct over the side channel: the ids inline (block_ids.encode_ids), no tag


@dataclass(frozen=True)
class Written:
    """Every layer of a granted ticket is in its blocks (the sender's copies have finished)."""

    kind: ClassVar[str] = "written"
    ticket: str
    bytes: int
    checksums: tuple[tuple[int, int], ...] = ()  # as Data's, chunks numbered as one message of every layer


@dataclass(frozen=True)
class Stopped:
    """Nothing of the sender writes the ticket's blocks any more: the receiver may free them."""

    kind: ClassVar[str] = "stopped"
    ticket: str


Message = (
    Hello | Welcome | Refuse | Unmapped | Hold | Data | Cancel | Done | Failed | AskWrite | Granted | Written | Stopped
)
_KINDS: dict[str, type[Message]] = {
    c.kind: c
    for c in (Hello, Welcome, Refuse, Unmapped, Hold, Data, Cancel, Done, Failed, AskWrite, Granted, Written, Stopped)
}


def encode_body(message: Message) -> bytes:
    """The message as JSON (a frame's body; the side channel's too, side.py)."""
    return json.dumps({"kind": message.kind, **asdict(message)}, separators=(",", ":")).encode()


def encode(message: Message) -> bytearray:
    body = encode_body(message)
    if len(body) > FRAME_BYTES - _LENGTH.size:
        raise ValueError(f"a {message.kind} message of {len(body)} bytes does not fit a control frame")
    frame = bytearray(FRAME_BYTES)
    _LENGTH.pack_into(frame, 0, len(body))
    frame[_LENGTH.size : _LENGTH.size + len(body)] = body
    return frame


def decode(frame: bytes | bytearray) -> Message:
    """The message in a frame; ValueError for anything malformed (the connection is then dropped)."""
    try:
        (length,) = _LENGTH.unpack_from(frame, 0)
    except struct.error as e:
        raise ValueError(f"malformed control frame: {e}") from e
    return decode_body(bytes(frame[_LENGTH.size : _LENGTH.size + length]))


def decode_body(body: bytes) -> Message:
    """The message in a frame's JSON body; ValueError for anything malformed."""
    try:
        raw = json.loads(body)
        cls = _KINDS[raw.pop("kind")]
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if "layout" in values:
            values["layout"] = KVLayout(**values["layout"])
        if "checksums" in values:
            values["checksums"] = tuple((int(i), int(d)) for i, d in values["checksums"])
        return cls(**values)
    except (KeyError, TypeError, ValueError, struct.error) as e:
        raise ValueError(f"malformed control frame: {e}") from e
