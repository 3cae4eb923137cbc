"""Per-request records: what `pdmesh bench serve` writes of every request it sent, and reading
them back, so that a saved run can be judged again (`pdmesh bench score`: other SLOs, without
another run).

A record holds what the client saw — when the request left (seconds from the start of its run,
and when an open loop wanted it to leave), its status (`OK`, or the failure's code and message),
prompt and output tokens, TTFT, TPOT and end-to-end — and what the server's usage said of the
prompt (tokens found cached, and computed) where it said. Each output token's arrival is kept only
on request (`--token-times`): it is the one field that grows with the answers' lengths. Times are
written at full precision, so a run read back scores exactly as the run itself did.
"""

from __future__ import annotations

from typing import Any

from pdmesh.bench.metrics import RequestResult

OK = "OK"  # the code of a request answered in full


def request_json(r: RequestResult, token_times: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "index": r.index, "ok": r.ok, "code": OK if r.ok else r.code, "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "scheduled_s": r.scheduled_s, "start_s": r.start_s,
        "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
        "e2e_s": r.e2e_s,  # a failed request's: when it failed (it counts in the run's duration)
        "finish_reason": r.finish_reason, "cached_prompt_tokens": r.cached_prompt_tokens,
        "computed_prompt_tokens": r.computed_prompt_tokens,
        "error": r.error,  # a refusal's message says whether, and when, to retry
    }  # fmt: skip
    if token_times:
        doc["token_times_s"] = r.token_times_s
    return doc


def request_from_json(doc: dict[str, Any]) -> RequestResult:
    """A record read back. Records written before usage and token times were kept lack them; what
    scoring needs (ok, send time, TTFT, E2E, output tokens) every record has. KeyError or
    TypeError for a record that is not one."""
    ok = bool(doc["ok"])
    return RequestResult(
        index=int(doc["index"]), ok=ok, prompt_tokens=int(doc["prompt_tokens"]),
        output_tokens=int(doc["output_tokens"]), scheduled_s=_float(doc.get("scheduled_s")),
        start_s=float(doc["start_s"]), ttft_s=_float(doc["ttft_s"]), e2e_s=_float(doc["e2e_s"]),
        code=None if ok else doc.get("code"), error=doc.get("error") or "", finish_reason=doc.get("finish_reason"),
        token_times_s=[float(t) for t in doc.get("token_times_s") or []],
        cached_prompt_tokens=doc.get("cached_prompt_tokens"), computed_prompt_tokens=doc.get("computed_prompt_tokens"),
    )  # fmt: skip


def _float(x: Any) -> float | None:
    return None if x is None else float(x)
