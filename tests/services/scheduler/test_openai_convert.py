"""How the HTTP door reads OpenAI bodies and headers: the defaults it takes from the OpenAI API,
and the pdmesh extensions (SLO targets and priority, by header or body)."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequest
from pdmesh.enums import Priority
from services.scheduler.intake import ChatMessage, ChatPrompt, TextPrompt, TokenPrompt
from services.scheduler.openai_api.convert import RequestHeaders, chat_request, completion_request
from services.scheduler.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from services.scheduler.request import Slo


def completion(headers: dict[str, str] | None = None, **body: object):
    return completion_request(CompletionRequest(**{"prompt": "hi", **body}), RequestHeaders.parse(headers or {}))


def test_openai_defaults() -> None:
    request = completion()
    assert request.prompt == TextPrompt("hi")
    assert request.sampling.temperature == 1.0 and request.sampling.top_p == 1.0 and request.sampling.top_k == 0
    assert request.max_tokens_unset and request.priority is Priority.NORMAL and request.slo == Slo()


def test_slo_and_priority_from_headers_and_the_body_wins() -> None:
    headers = {"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "40", "x-priority": "HIGH", "x-request-id": "r1"}
    by_header = completion(headers)
    by_body = completion(headers, slo={"ttft_ms": 90}, priority="low")

    assert (by_header.slo, by_header.priority, by_header.request_id) == (Slo(250, 40), Priority.HIGH, "r1")
    assert (by_body.slo, by_body.priority) == (Slo(90, 0), Priority.LOW)


@pytest.mark.parametrize(
    ("headers", "field"),
    [({"x-slo-ttft-ms": "soon"}, "x-slo-ttft-ms"), ({"x-slo-tpot-ms": "-1"}, "x-slo-tpot-ms"),
     ({"x-slo-ttft-ms": "inf"}, "x-slo-ttft-ms"), ({"x-priority": "urgent"}, "x-priority"),
     ({"x-request-timeout-ms": "0"}, "x-request-timeout-ms")],
)  # fmt: skip
def test_bad_headers_name_the_header(headers: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        RequestHeaders.parse(headers)
    assert err.value.field == field


def test_prompts_and_chat_messages() -> None:
    assert completion(prompt=[[1, 2]]).prompt == TokenPrompt((1, 2))
    assert completion(prompt=["one"]).prompt == TextPrompt("one")
    body = ChatCompletionRequest(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_completion_tokens=7, max_tokens=99, stop="END", top_k=-1,
    )  # fmt: skip
    request = chat_request(body, RequestHeaders())
    assert request.prompt == ChatPrompt((ChatMessage("system", "be brief"), ChatMessage("user", "a\nb")))
    assert request.sampling.max_tokens == 7 and not request.max_tokens_unset
    assert request.sampling.stop == ("END",) and request.sampling.top_k == 0
