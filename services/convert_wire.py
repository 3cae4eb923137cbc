"""A request whose bytes do not parse, turned into InvalidRequest naming what is wrong.

gRPC parses a request before any servicer code runs; a parse that fails there (a string that is
not UTF-8, bytes cut short) reaches the client as UNKNOWN with a Python class name and leaves a
traceback in the log. The interceptor (services/interceptor.py) parses through `parse` instead,
and raises the InvalidRequest it returns inside the call, where every error becomes a status.

To name the field whose string is not UTF-8, the bytes are parsed again with a copy of the
message's descriptors in which every string is bytes (protobuf itself says only "String field
had bad UTF-8"); that copy is built once per message type, and only on the error path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message

from engine.errors import InvalidRequest


def parse(message_type: type[Message], data: bytes) -> Message | InvalidRequest:
    """The message, or the InvalidRequest that says why `data` is not one."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        return undecodable(message_type.DESCRIPTOR, data, exc)


def lenient_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A generated `Message.FromString` as one that returns InvalidRequest instead of raising;
    any other deserializer as it is."""
    message_type = getattr(deserializer, "__self__", None)
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        return deserializer
    return functools.partial(parse, message_type)


def undecodable(descriptor: Descriptor, data: bytes, error: DecodeError) -> InvalidRequest:
    field = _field_not_utf8(descriptor, data)
    if field is not None:
        return InvalidRequest(field, "is not valid UTF-8", "send strings encoded as UTF-8")
    reason = str(error).rpartition(": ")[2] or "it does not parse"
    return InvalidRequest(
        "request", f"is not a valid {descriptor.full_name} message ({reason})",
        "send the message as a protobuf library serializes it from pdmesh's protos",
    )  # fmt: skip


def _field_not_utf8(descriptor: Descriptor, data: bytes) -> str | None:
    try:
        lenient = _lenient_type(descriptor.full_name, descriptor.file).FromString(data)
    except DecodeError:
        return None  # broken otherwise too: no one field to blame
    return next(_bad_strings(descriptor, lenient, ""), None)


def _bad_strings(descriptor: Descriptor, lenient: Message, prefix: str) -> Iterator[str]:
    """Paths (`prompt.chat.messages[1].content`) of the fields that are strings in `descriptor`
    and hold bytes that are not UTF-8 in `lenient`."""
    for lenient_field, value in lenient.ListFields():
        field = descriptor.fields_by_name[lenient_field.name]
        path = f"{prefix}{field.name}"
        repeated = field.is_repeated
        items = list(enumerate(value)) if repeated else [(None, value)]
        for index, item in items:
            where = path if index is None else f"{path}[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(item):
                yield where
            elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
                yield from _bad_strings(field.message_type, item, f"{where}.")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@functools.cache
def _lenient_type(full_name: str, file: FileDescriptor) -> type[Message]:
    """The message type `full_name` with every string field turned into bytes, in a pool of its own."""
    pool = descriptor_pool.DescriptorPool()
    _add_lenient(pool, file, set())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def _add_lenient(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    if file.name in added:
        return
    added.add(file.name)
    for dependency in file.dependencies:
        _add_lenient(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    for message in _all_messages(proto.message_type):
        for field in message.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool.Add(proto)


def _all_messages(messages: Any) -> Iterator[descriptor_pb2.DescriptorProto]:
    for message in messages:
        yield message
        yield from _all_messages(message.nested_type)
