"""Typed errors as the HTTP door answers them: the status the OpenAI API would use, OpenAI's error
shape naming the field, and a refusal's retry hint (the core's RetryInfo) as Retry-After."""

from __future__ import annotations

from http import HTTPStatus

from engine.errors import InvalidRequest
from services.scheduler.openai_api.errors import DEFAULT_RETRY_AFTER_S, http_error
from services.status import DeadlineExceeded, ExceedsCapacity, NoCapacity, NoLiveWorker


class HintedRefusal(NoCapacity):
    """A refusal for load that says when capacity returns, as the SLO policy's does."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("slo", "no plan meets the request's SLO now", f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def test_a_refusals_retry_hint_is_its_retry_after_in_whole_seconds() -> None:
    error = http_error(HintedRefusal(2.3))

    assert error.status is HTTPStatus.TOO_MANY_REQUESTS
    assert error.headers == {"Retry-After": "3"}
    assert error.body["error"] == {
        "message": "slo: no plan meets the request's SLO now; retry in 2.3 s",
        "type": "rate_limit_error", "param": "slo", "code": "hinted_refusal",
    }  # fmt: skip
    assert http_error(HintedRefusal(0.05)).headers == {"Retry-After": "1"}  # never "0": that means "now"


def test_a_refusal_without_a_hint_gets_the_default_and_the_rest_none() -> None:
    full = http_error(NoCapacity("kv_cache", "every decode worker is full", "retry later"))
    gone = http_error(NoLiveWorker("workers", "no decode worker is serving", "retry"))

    default = {"Retry-After": str(int(DEFAULT_RETRY_AFTER_S))}
    assert (full.status, full.headers) == (HTTPStatus.TOO_MANY_REQUESTS, default)
    assert (gone.status, gone.headers) == (HTTPStatus.SERVICE_UNAVAILABLE, default)
    for exc, status in [
        (InvalidRequest("temperature", "is -1", "use 0 or more"), HTTPStatus.BAD_REQUEST),
        (ExceedsCapacity("prompt", "needs KV for 9000 tokens", "shorten it"), HTTPStatus.BAD_REQUEST),
        (DeadlineExceeded("deadline", "passed", "give it more time"), HTTPStatus.GATEWAY_TIMEOUT),
    ]:
        error = http_error(exc)
        assert (error.status, error.headers, error.body["error"]["param"]) == (status, {}, exc.field)  # type: ignore[index]
