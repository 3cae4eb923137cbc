"""The scheduler's door as the wire sees it: the public messages (every message a Scheduler RPC
takes, and the messages inside them), raw bytes sent as a request, and mutations of valid requests
for the fuzz test: fields set to values a protobuf library would refuse to write (strings that are
not UTF-8, enum values no one defined, NaN), and bytes flipped, cut, repeated or spliced."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pdmesh.v1 import common_pb2, scheduler_pb2

SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]

_VARINT_TYPES = {
    FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL,
}  # fmt: skip
_FLOATS = (math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-45, 0.5, 1.0, 2.0, 1e30)
_VARINTS = (0, 1, 2, 3, 4, 5, 99, 2**31, 2**32 - 1, 2**63, 2**64 - 1)  # 2**64 - 1 reads as -1 in an enum
_STRINGS = (b"", b"a", b"\xff\xfe", b"ok \xc3", b"\xed\xa0\x80", "é".encode() * 200, b"x" * 300)


def public_messages() -> list[Descriptor]:
    """Every message a client of the Scheduler service writes, each once, outermost first."""
    found: dict[str, Descriptor] = {}
    pending = [method.input_type for method in SCHEDULER.methods]
    while pending:
        message = pending.pop(0)
        if message.full_name in found:
            continue
        found[message.full_name] = message
        pending += [f.message_type for f in message.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    return list(found.values())


def raw_generate(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    """Scheduler.Generate taking the request as bytes, sent as they are."""
    return channel.unary_stream(
        "/pdmesh.v1.Scheduler/Generate",
        request_serializer=lambda data: data,
        response_deserializer=scheduler_pb2.GenerateResponse.FromString,
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(path: list[FieldDescriptor], payload: bytes) -> bytes:
    """`payload` (the encoded value) as the field at `path` of the outermost message; appended to
    a serialized message it overrides that scalar, or merges into that submessage."""
    field, rest = path[0], path[1:]
    if rest:
        inner = field_bytes(rest, payload)
        return varint(field.number << 3 | 2) + varint(len(inner)) + inner
    if field.type in _VARINT_TYPES:
        return varint(field.number << 3) + payload
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return varint(field.number << 3 | 5) + payload
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return varint(field.number << 3 | 1) + payload
    return varint(field.number << 3 | 2) + varint(len(payload)) + payload


def odd_value(field: FieldDescriptor, rng: random.Random) -> bytes:
    """An encoded value for `field`, often one that no well-behaved client sends."""
    if field.type in _VARINT_TYPES:
        return varint(rng.choice(_VARINTS))
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return struct.pack("<f", rng.choice(_FLOATS))
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return struct.pack("<d", rng.choice(_FLOATS) * rng.choice((1.0, 1e3, 1e300)))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return rng.choice((b"", rng.randbytes(rng.randrange(1, 12))))
    return rng.choice(_STRINGS)


def leaf_paths(message: Descriptor, prefix: tuple[FieldDescriptor, ...] = ()) -> Iterator[list[FieldDescriptor]]:
    """Every field path reachable from `message` (submessages included as paths of their own)."""
    for field in message.fields:
        path = (*prefix, field)
        yield list(path)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            yield from leaf_paths(field.message_type, path)


def valid_requests() -> list[scheduler_pb2.GenerateRequest]:
    """A few requests the mesh serves, each form of prompt and most options; short outputs."""
    sampling = common_pb2.SamplingParams
    return [
        scheduler_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2, 3])), sampling=sampling(max_tokens=3)
        ),
        scheduler_pb2.GenerateRequest(
            request_id="fuzz", prompt=common_pb2.Prompt(text="hello there"),
            sampling=sampling(max_tokens=2, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=3,
                              repetition_penalty=1.1, stop=["xyz"], stop_token_ids=[7], logprobs=True),
            slo=common_pb2.Slo(ttft_ms=30000, tpot_ms=1000), priority=common_pb2.PRIORITY_HIGH,
        ),
        scheduler_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[
                common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_SYSTEM, content="be brief"),
                common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hi"),
            ])),
            sampling=sampling(max_tokens=2, ignore_eos=True, include_stop_str_in_output=True),
        ),
    ]  # fmt: skip


@dataclass(frozen=True)
class Mutator:
    """Malformed variants of valid requests, reproducible from the seed."""

    seed: int

    def cases(self, count: int) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        bases = [r.SerializeToString() for r in valid_requests()]
        paths = list(leaf_paths(scheduler_pb2.GenerateRequest.DESCRIPTOR))
        for _ in range(count):
            data = rng.choice(bases)
            for _ in range(rng.choice((1, 1, 2, 3))):
                data = self._mutate(data, rng, bases, paths)
            yield data

    def _mutate(self, data: bytes, rng: random.Random, bases: list[bytes], paths: list[list[FieldDescriptor]]) -> bytes:
        kind = rng.randrange(10)
        if kind < 5:  # one field set to an odd value (the last one wins, submessages merge)
            path = rng.choice(paths)
            return data + field_bytes(path, odd_value(path[-1], rng))
        at = rng.randrange(len(data) + 1)
        if kind == 5:  # a byte flipped
            if at == len(data):
                return data
            return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
        if kind == 6:  # cut short
            return data[:at]
        if kind == 7:  # random bytes inserted
            return data[:at] + rng.randbytes(rng.randrange(1, 8)) + data[at:]
        if kind == 8:  # a span repeated
            end = rng.randrange(at, len(data) + 1)
            return data[:end] + data[at:end] + data[end:]
        return data[:at] + rng.choice(bases)[at:]  # spliced with another request
