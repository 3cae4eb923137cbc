"""OpenTelemetry's GenAI server metrics, recorded by the scheduler for every finished request.

gen_ai.server.time_to_first_token, gen_ai.server.time_per_output_token and
gen_ai.server.request.duration, in seconds, with the model and the operation as attributes. They
go through the OpenTelemetry API: with no OTLP metrics endpoint configured (services/telemetry/
otel.py) the API's meter records nothing, and the Prometheus histograms carry the same figures.
"""

from __future__ import annotations

from opentelemetry import metrics

from services.telemetry.metrics import ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS
from services.telemetry.spans import Attr

OPERATION = "text_completion"


class GenAiServerMetrics:
    def __init__(self, model: str) -> None:
        meter = metrics.get_meter("pdmesh")
        self._attributes = {Attr.MODEL: model, Attr.OPERATION: OPERATION, Attr.PROVIDER: "pdmesh"}
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to generate the first token",
            explicit_bucket_boundaries_advisory=list(TTFT_BUCKETS),
        )  # fmt: skip
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", description="Time per output token after the first",
            explicit_bucket_boundaries_advisory=list(ITL_BUCKETS),
        )  # fmt: skip
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Time from request to last token",
            explicit_bucket_boundaries_advisory=list(REQUEST_BUCKETS),
        )  # fmt: skip

    def finished(self, ttft_s: float | None, tpot_s: float | None, duration_s: float, error: str | None = None) -> None:
        """One request's figures; error: the error.type of a request that failed."""
        attributes = self._attributes if error is None else {**self._attributes, "error.type": error}
        if ttft_s is not None:
            self._ttft.record(ttft_s, attributes)
        if tpot_s is not None:
            self._tpot.record(tpot_s, attributes)
        self._duration.record(duration_s, attributes)
