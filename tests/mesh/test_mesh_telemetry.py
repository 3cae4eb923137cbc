"""Observability of a real mesh: a scheduler, a prefill and a decode worker as separate processes,
exporting over OTLP/gRPC (the standard OTEL_* variables) to a receiver inside the test.

One disaggregated request leaves one trace across the three processes, rooted at the scheduler's
pdmesh.generate, with each phase under the call that ran it and the KV transfer's bytes equal to
the KV of the prompt's blocks; every log line any process wrote for the request carries its
request id and trace id; each process's /metrics parses with Prometheus' parser and its counters
moved by exactly that request; the scheduler exports the GenAI server metrics. A request through
the OpenAI HTTP door is traced and counted exactly as one through gRPC (the same core, Door).
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.client import Client, Completion, ExecutionPlan
from pdmesh.process_output import Echo, ProcessOutput
from pdmesh.up import Mesh, MeshSpec
from tests.mesh.conftest import BLOCK_SIZE, HTTP_PORT_OFFSET, KV_BLOCKS, free_port_base
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.slow

# The tiny model's KV per block: layers x (K, V) x tokens x kv heads x head dim x float32.
KV_BYTES_PER_BLOCK = 3 * 2 * BLOCK_SIZE * 2 * (64 // 4) * 4
PROMPT = list(range(10, 70))  # 60 tokens: past local_prefill_max_tokens, so a prefill worker computes it
SHORT = [5, 6, 7]  # prefilled on the decode worker itself
# least_loaded's fixed rule hands PROMPT off for sure (slo would prefill it on the idle decode worker).
POLICY = (("PDMESH_SCHEDULER_POLICY", "least_loaded"),)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def mesh(mesh_model: Path, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    otel = (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("PDMESH_TELEMETRY_LOG_LEVEL", "debug"),  # a line per request and phase
    )  # fmt: skip
    port = free_port_base()
    spec = MeshSpec(
        port=port, model=str(mesh_model), env=(("PDMESH_SCHEDULER_REPORT_INTERVAL_MS", "100"), *POLICY, *otel),
        http_port=port + HTTP_PORT_OFFSET,
        extra_worker_args=("--threads", "1", "--kv-blocks", str(KV_BLOCKS), "--block-size", str(BLOCK_SIZE)),
        kvstore=False,  # the workers' offers to a store would add to the KV transfer counters counted here
    )  # fmt: skip
    mesh = Mesh(spec, output=ProcessOutput(Echo.WARNINGS, log_dir=tmp_path_factory.mktemp("mesh_logs")))
    mesh.start(180)
    yield mesh
    mesh.stop()


def scrape(mesh: Mesh) -> dict[str, dict[str, float]]:
    """Every process's samples, by process: {"scheduler": {"name{label=value}": value}}."""
    out = {}
    for name, n in mesh.spec.metrics_ports():
        url = f"http://127.0.0.1:{mesh.spec.port + 200 + n}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out[name] = {
            s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    return out


def moved(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], process: str, sample: str) -> float:
    return after[process].get(sample, 0.0) - before[process].get(sample, 0.0)


def generate(mesh: Mesh, prompt: list[int], request_id: str) -> Completion:
    with Client(mesh.target) as client:
        return client.complete(prompt, max_tokens=6, ignore_eos=True, request_id=request_id)


def trace_of(receiver: OtlpReceiver, request_id: str) -> list[ReceivedSpan]:
    roots = [
        s for s in receiver.spans if s.name == "pdmesh.generate" and s.attributes.get("pdmesh.request_id") == request_id
    ]
    if len(roots) != 1:
        return []
    return [s for s in receiver.spans if s.trace_id == roots[0].trace_id]


def complete_trace(request_id: str, *names: str):  # noqa: ANN201 (a predicate for wait_for)
    def found(receiver: OtlpReceiver) -> bool:
        spans = trace_of(receiver, request_id)
        ids = {s.span_id for s in spans}
        connected = all(s.parent_id in ids for s in spans if s.name != "pdmesh.generate")
        return connected and all(n in {s.name for s in spans} for n in names)

    return found


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[str]:
    names = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


def test_one_request_is_one_trace_across_every_process(mesh: Mesh, receiver: OtlpReceiver) -> None:
    before = scrape(mesh)
    done = generate(mesh, PROMPT, "traced-1")
    assert done.placement is not None and done.placement.plan is ExecutionPlan.DISAGGREGATED
    phases = ("pdmesh.schedule", "pdmesh.prefill.queue", "pdmesh.prefill.compute", "pdmesh.kv.transfer",
              "pdmesh.decode.wait_kv", "pdmesh.decode.first_step", "pdmesh.decode.stream")  # fmt: skip
    receiver.wait_for("the request's whole trace", complete_trace("traced-1", *phases))
    spans = trace_of(receiver, "traced-1")
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "pdmesh.generate"]
    assert root.parent_id == "" and root.service == "pdmesh-scheduler"  # the root of the trace
    where = {
        "pdmesh.schedule": ("pdmesh-scheduler", "pdmesh.generate"),
        "pdmesh.prefill.queue": ("pdmesh-prefill", "/pdmesh.v1.Prefill/Prefill"),
        "pdmesh.prefill.compute": ("pdmesh-prefill", "/pdmesh.v1.Prefill/Prefill"),
        "pdmesh.decode.wait_kv": ("pdmesh-decode", "/pdmesh.v1.Decode/Generate"),
        "pdmesh.decode.first_step": ("pdmesh-decode", "/pdmesh.v1.Decode/Generate"),
        "pdmesh.decode.stream": ("pdmesh-decode", "/pdmesh.v1.Decode/Generate"),
    }
    for name, (service, parent) in where.items():
        (span,) = [s for s in spans if s.name == name]
        chain = ancestors(span, by_id)
        assert span.service == service and chain[0] == parent and chain[-1] == "pdmesh.generate", (name, chain)
    # The reservation's call is made while scheduling; each rpc hop is a client span, then a server span.
    reserve = [s for s in spans if s.name == "/pdmesh.v1.Decode/Reserve" and s.service == "pdmesh-decode"]
    assert ancestors(reserve[0], by_id)[:2] == ["/pdmesh.v1.Decode/Reserve", "pdmesh.schedule"]

    expected_bytes = math.ceil(len(PROMPT) / BLOCK_SIZE) * KV_BYTES_PER_BLOCK
    transfers = {s.attributes["pdmesh.kv.direction"]: s for s in spans if s.name == "pdmesh.kv.transfer"}
    send, recv = transfers["send"], transfers["recv"]
    assert (send.service, recv.service) == ("pdmesh-prefill", "pdmesh-decode")
    assert send.attributes["pdmesh.kv.bytes"] == recv.attributes["pdmesh.kv.bytes"] == expected_bytes
    assert done.usage is not None and done.usage.transfer_bytes == expected_bytes
    assert send.attributes["pdmesh.kv.layers"] == 3 and send.attributes["pdmesh.kv.gbps"] > 0
    assert ancestors(send, by_id)[0] == "/pdmesh.v1.Prefill/Prefill"
    assert ancestors(recv, by_id)[0] == "/pdmesh.v1.Decode/Reserve"  # through the ticket's trace context
    assert root.attributes["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    assert root.attributes["gen_ai.request.max_tokens"] == 6
    (stream,) = [s for s in spans if s.name == "pdmesh.decode.stream"]
    assert stream.attributes["pdmesh.decode.tokens"] == 5  # the first token came from the prefill worker

    # Every log line written for the request, in every process, carries its trace id.
    for process in ("scheduler", "prefill-0", "decode-0"):
        log = mesh.output.log_path(process)
        assert log is not None
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == "traced-1"]
        assert mine, f"{process} logged nothing for the request"
        assert {line["trace_id"] for line in mine} == {root.trace_id}, process

    after = scrape(mesh)
    model = f"{{model_name={mesh.spec.model}}}"
    assert moved(before, after, "scheduler", f"pdmesh:time_to_first_token_seconds_count{model}") == 1
    assert moved(before, after, "scheduler", f"pdmesh:e2e_request_latency_seconds_count{model}") == 1
    assert moved(before, after, "scheduler", f"pdmesh:inter_token_latency_seconds_count{model}") == 5
    assert moved(before, after, "scheduler", f"pdmesh:prompt_tokens_total{model}") == len(PROMPT)
    assert moved(before, after, "scheduler", f"pdmesh:generation_tokens_total{model}") == 6
    assert moved(before, after, "scheduler", "pdmesh:placements_total{plan=disaggregated}") == 1
    # KV moved, by peer: each side names the other's KV listener.
    kv = {f"{role}-{i}": f"127.0.0.1:{mesh.spec.port + 100 + n}" for role, i, n in mesh.spec.workers}
    sent = f"pdmesh:kv_transfer_bytes_total{{direction=send}}{{peer={kv['decode-0']}}}"
    received = f"pdmesh:kv_transfer_bytes_total{{direction=recv}}{{peer={kv['prefill-0']}}}"
    assert moved(before, after, "prefill-0", sent) == expected_bytes
    assert moved(before, after, "decode-0", received) == expected_bytes
    assert moved(before, after, "prefill-0", "pdmesh:prefix_cache_queries_total") == len(PROMPT)
    assert not [k for k in after["prefill-0"] if k.startswith("pdmesh:kv_transfer_failures_total")]


def test_the_phases_add_up_to_the_time_to_first_token(mesh: Mesh, receiver: OtlpReceiver) -> None:
    done = generate(mesh, [p + 1 for p in PROMPT], "traced-2")
    u = done.usage
    assert u is not None
    phases = u.schedule_ms + u.queue_ms + u.prefill_ms + u.transfer_ms
    assert u.ttft_ms - phases >= 0  # the rest is the two gRPC hops
    assert u.ttft_ms - phases < max(50.0, 0.5 * u.ttft_ms), u  # generous: a loaded CI machine
    receiver.wait_for("the request's trace", complete_trace("traced-2", "pdmesh.kv.transfer", "pdmesh.decode.stream"))
    spans = {s.name: s for s in trace_of(receiver, "traced-2")}
    assert abs(spans["pdmesh.prefill.compute"].duration_ms - u.prefill_ms) < 1.0
    assert abs(spans["pdmesh.prefill.queue"].duration_ms - u.queue_ms) < 1.0


def test_a_local_prefill_and_a_refusal_are_traced_and_counted(mesh: Mesh, receiver: OtlpReceiver) -> None:
    before = scrape(mesh)
    done = generate(mesh, SHORT, "traced-3")
    assert done.placement is not None and done.placement.plan is ExecutionPlan.LOCAL_PREFILL
    receiver.wait_for("the local request's trace", complete_trace("traced-3", "pdmesh.prefill.compute"))
    spans = trace_of(receiver, "traced-3")
    compute = next(s for s in spans if s.name == "pdmesh.prefill.compute")
    assert compute.service == "pdmesh-decode" and compute.attributes["pdmesh.prefill.computed_tokens"] == 3
    with Client(mesh.target) as client, pytest.raises(Exception, match="max_tokens"):
        client.complete(SHORT, max_tokens=0, request_id="refused")
    after = scrape(mesh)
    assert moved(before, after, "scheduler", "pdmesh:placements_total{plan=local_prefill}") == 1
    assert moved(before, after, "scheduler", "pdmesh:rejections_total{reason=invalid_argument}") == 1
    assert moved(before, after, "decode-0", "pdmesh:prefix_cache_queries_total") == 3


def test_the_scheduler_exports_the_genai_server_metrics(mesh: Mesh, receiver: OtlpReceiver) -> None:
    generate(mesh, SHORT, "metered")
    wanted = {
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
        "gen_ai.server.request.duration",
    }

    def exported(r: OtlpReceiver) -> bool:
        return wanted <= {m.name for service, m in r.metrics if service == "pdmesh-scheduler"}

    receiver.wait_for("the GenAI server metrics", exported)
    ttft = next(m for service, m in receiver.metrics if m.name == "gen_ai.server.time_to_first_token")
    assert ttft.unit == "s" and ttft.histogram.data_points[0].count >= 1


def test_a_request_through_the_http_door_is_traced_and_counted_as_through_grpc(
    mesh: Mesh, receiver: OtlpReceiver
) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    before = scrape(mesh)
    with httpx.Client(base_url=f"{mesh.spec.http_base_url}/v1", timeout=60) as http:
        done = http.post(
            "/completions",  # token ids: the tiny model ships no chat template
            json={"prompt": SHORT, "max_tokens": 4, "ignore_eos": True},
            headers={"traceparent": f"00-{caller_trace}-{caller_span}-01", "x-request-id": "http-1"},
        )  # fmt: skip
        refused = http.post("/completions", json={"prompt": "hi", "temperature": -1})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    assert refused.status_code == 400

    receiver.wait_for("the HTTP request's trace", complete_trace("http-1", "pdmesh.schedule", "pdmesh.decode.stream"))
    (root,) = [s for s in trace_of(receiver, "http-1") if s.name == "pdmesh.generate"]
    assert (root.trace_id, root.parent_id) == (caller_trace, caller_span)  # a child of the caller's span
    assert root.attributes["gen_ai.operation.name"] == "text_completion"
    assert root.attributes["gen_ai.usage.output_tokens"] == 4
    after = scrape(mesh)
    model = f"{{model_name={mesh.spec.model}}}"
    assert moved(before, after, "scheduler", f"pdmesh:time_to_first_token_seconds_count{model}") == 1
    assert moved(before, after, "scheduler", f"pdmesh:generation_tokens_total{model}") == 4
    assert moved(before, after, "scheduler", "pdmesh:rejections_total{reason=invalid_argument}") == 1
