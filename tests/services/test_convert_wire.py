"""Bytes that are not a request: the field whose string is not UTF-8 is named, anything else
broken is refused as the request, and a good request parses as it is."""

from __future__ import annotations

from engine.errors import InvalidRequest
from pdmesh.v1 import common_pb2, scheduler_pb2
from services.convert_wire import parse

NOT_UTF8 = b"a\xffc"


def chat_request() -> scheduler_pb2.GenerateRequest:
    messages = [common_pb2.ChatMessage(role=1, content="be brief"), common_pb2.ChatMessage(role=2, content="abc")]
    return scheduler_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages)))


def test_a_string_that_is_not_utf8_is_named_by_its_path() -> None:
    data = chat_request().SerializeToString().replace(b"abc", NOT_UTF8)

    refused = parse(scheduler_pb2.GenerateRequest, data)

    assert isinstance(refused, InvalidRequest)
    assert str(refused) == "prompt.chat.messages[1].content: is not valid UTF-8; send strings encoded as UTF-8"


def test_a_repeated_string_is_named_with_its_index() -> None:
    request = scheduler_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(stop=["ok", "abc"]))

    refused = parse(scheduler_pb2.GenerateRequest, request.SerializeToString().replace(b"abc", NOT_UTF8))

    assert isinstance(refused, InvalidRequest) and refused.field == "sampling.stop[1]"


def test_bytes_cut_short_are_refused_as_the_request() -> None:
    refused = parse(scheduler_pb2.GenerateRequest, chat_request().SerializeToString()[:-2])

    assert isinstance(refused, InvalidRequest) and refused.field == "request"
    assert "pdmesh.v1.GenerateRequest" in refused.problem


def test_a_good_request_parses_as_it_is() -> None:
    assert parse(scheduler_pb2.GenerateRequest, chat_request().SerializeToString()) == chat_request()
