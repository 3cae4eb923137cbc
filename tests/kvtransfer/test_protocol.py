"""The pieces both sides must agree on: control frames, the receiver's checks, sampled checksums."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.kv_layout import KVLayout
from kvtransfer import IncompatiblePeer, Ticket, TransferFailed
from kvtransfer.checksum import digest_chunks, first_mismatch, sample_chunks
from kvtransfer.receiver import check_data
from kvtransfer.wire import FRAME_BYTES, Cancel, Data, Done, Failed, Hello, Refuse, Welcome, decode, encode

LAYOUT = KVLayout("fp", "bfloat16", 16, 32, 8, 128)


@pytest.mark.parametrize(
    "message",
    [
        Hello("10.0.0.1:5000", "abc", LAYOUT),
        Welcome("10.0.0.2:5000", "def", LAYOUT),
        Refuse(LAYOUT, "dtype (ours 'bfloat16', theirs 'float32')"),
        Data("req-1", 8, 4, 64, 4 * 4 << 20, 17, ((3, 2**64 - 1), (9, 0))),
        Cancel("req-1", "cancelled: client went away"),
        Done("req-1", 123),
        Failed("req-1", "the lease expired"),
    ],
)
def test_every_control_message_survives_its_frame(message: object) -> None:
    frame = encode(message)  # type: ignore[arg-type]

    assert len(frame) == FRAME_BYTES
    assert decode(frame) == message


def test_a_garbled_frame_is_refused_not_guessed() -> None:
    frame = encode(Done("req-1", 1))
    frame[10:20] = b"\xff" * 10

    with pytest.raises(ValueError, match="malformed control frame"):
        decode(frame)


def test_a_message_too_large_for_a_frame_is_refused_at_the_sender() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode(Failed("req-1", "x" * FRAME_BYTES))


def data(first: int = 0, layers: int = 2, blocks: int = 4, nbytes: int = 2 * 1000) -> Data:
    return Data("t", first, layers, blocks, nbytes, 5)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (data(), None),
        (data(blocks=5), "the sender has 5 blocks, the reservation 4"),
        (data(first=3), "layers [3, 5) are outside [0, 4)"),
        (data(first=-1), "layers [-1, 1) are outside [0, 4)"),
        (data(layers=0), "layers [0, 0) are outside [0, 4)"),
        (data(first=1), "layers [1, 3) overlap layers already sent"),
        (data(nbytes=2 * 1000 + 1), "the payload is 2001 bytes; 2 layers of this ticket are 2000"),
        (Data("t", 0, 2, 4, 2000, 5, ((16, 0),)), "a checksum names a block outside the payload"),
    ],
)
def test_the_receiver_accepts_only_an_exact_unseen_layer_range(header: Data, problem: str | None) -> None:
    claimed = [False, False, True, False]  # layer 2 already arrived

    assert check_data(header, num_blocks=4, layer_bytes=1000, claimed=claimed) == problem


def test_sampled_checksums_catch_a_flipped_byte() -> None:
    payload = torch.randint(0, 256, (64 * 100,), dtype=torch.uint8)  # 64 chunks of 100 bytes
    chunks = sample_chunks(64, 8, "req-1:0")
    sent = digest_chunks(payload, 100, chunks)
    assert sample_chunks(64, 8, "req-1:0") == chunks  # the receiver samples the same chunks
    assert first_mismatch(payload, 100, sent) is None

    payload[chunks[3] * 100 + 42] ^= 1

    assert first_mismatch(payload, 100, sent) == chunks[3]


def test_failures_keep_their_fields_across_processes() -> None:
    failed = pickle.loads(pickle.dumps(TransferFailed("10.0.0.2:5000", "req-1", 4096, "connection lost")))
    refused = pickle.loads(pickle.dumps(IncompatiblePeer("10.0.0.2:5000", "req-2", "head_dim (ours 64, theirs 128)")))

    assert (failed.peer, failed.ticket, failed.bytes_moved, failed.reason) == (
        "10.0.0.2:5000", "req-1", 4096, "connection lost",
    )  # fmt: skip
    assert (refused.field, refused.reason) == ("head_dim", "incompatible peer: head_dim (ours 64, theirs 128)")


def test_a_ticket_names_the_address_to_dial() -> None:
    info = Ticket("req-1", "10.1.2.3:13337", 1000, 63, 1_700_000_000_000)  # type: ignore[arg-type]

    assert (info.host, info.port) == ("10.1.2.3", 13337)
