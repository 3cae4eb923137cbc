"""Strict validation at the scheduler's door, over the wire, on a real mesh (tiny random model,
one prefill and one decode worker as processes).

The table names every field of every public message (every message a Scheduler RPC takes, and
those inside them, read from the proto descriptors: a new field without a row fails the test) with
values the mesh must serve and values it must refuse, each refusal's status and the field its
message names. The fuzz test sends thousands of valid requests mutated on the wire; whatever it
sends, the answer is a status a client can act on, never UNKNOWN or INTERNAL, no process logs a
traceback or an error, and the mesh serves afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pdmesh.process_output import Echo, ProcessOutput
from pdmesh.up import Mesh, MeshSpec
from pdmesh.v1 import common_pb2, scheduler_pb2
from tests.engine.conftest import VOCAB, save_tiny_model
from tests.mesh.conftest import BLOCK_SIZE, free_port_base
from tests.mesh.door_wire import Mutator, field_bytes, public_messages, raw_generate, valid_requests

pytestmark = pytest.mark.slow

CONTEXT = 512  # the tiny model's max_position_embeddings
KV_BLOCKS = 96  # 384 tokens: less than the context, so "fits no decode worker" is reachable
MAX_PROMPT_BYTES = 4096
INVALID, NOT_FOUND, OK = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK
EXHAUSTED, OUT_OF_RANGE = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE
NOT_UTF8 = b"ok \xff\xfe"
FUZZ_CASES = 3000
# Valid variants finish in milliseconds; one that waits this long for KV blocks is told so.
FUZZ_TIMEOUT_S = 5


@dataclass(frozen=True)
class DoorMesh:
    mesh: Mesh
    log_dir: Path

    @property
    def target(self) -> str:
        return self.mesh.target

    def log_problems(self) -> list[str]:
        """Lines of any process's log that a clean run never writes."""
        lines = (line for log in sorted(self.log_dir.glob("*.log")) for line in log.read_text().splitlines())
        return [line for line in lines if "Traceback" in line or '"level": "error"' in line]


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorMesh]:
    model = save_tiny_model(tmp_path_factory.mktemp("door_model"), max_position_embeddings=CONTEXT, seed=3)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    log_dir = tmp_path_factory.mktemp("door_logs")
    args = ("--threads", "1", "--kv-blocks", str(KV_BLOCKS), "--block-size", str(BLOCK_SIZE))
    # Rows without an SLO bring no TTFT target: under the `slo` policy a default one is a forecast
    # that a machine loaded 10-16 deep (full-suite runs) may refuse, and these rows test the door.
    env = {"PDMESH_SCHEDULER_MAX_PROMPT_BYTES": str(MAX_PROMPT_BYTES), "PDMESH_SCHEDULER_REPORT_INTERVAL_MS": "100",
           "PDMESH_SLO_DEFAULT_TTFT_MS": "0"}  # fmt: skip
    spec = MeshSpec(
        port=free_port_base(), prefill=1, decode=1, model=str(model), extra_worker_args=args,
        env=tuple(env.items()), kvstore=False,
    )  # fmt: skip
    mesh = Mesh(spec, output=ProcessOutput(Echo.WARNINGS, log_dir))
    mesh.start(180)
    try:
        yield DoorMesh(mesh, log_dir)
    finally:
        mesh.stop()


# ---- the table -------------------------------------------------------------------------------

Edit = Callable[[scheduler_pb2.GenerateRequest], object]


@dataclass(frozen=True)
class Case:
    """A valid request changed by `edit` (or with `wire` appended to its bytes); the status the
    mesh answers, and for a refusal the field its message names before the colon."""

    name: str
    edit: Edit | None = None
    wire: tuple[tuple[str, ...], bytes] | None = None
    code: grpc.StatusCode = OK
    field: str = ""
    says: str = ""  # what the message must also say

    def request_bytes(self) -> bytes:
        request = base_request()
        if self.edit is not None:
            self.edit(request)
        data = request.SerializeToString()
        if self.wire is not None:
            names, payload = self.wire
            data += field_bytes(field_path(names), payload)
        return data


def base_request() -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2, 3])),
        sampling=common_pb2.SamplingParams(max_tokens=2),
    )


def field_path(names: tuple[str, ...]) -> list:
    message, path = scheduler_pb2.GenerateRequest.DESCRIPTOR, []
    for name in names:
        field = message.fields_by_name[name]
        path.append(field)
        message = field.message_type
    return path


def ok(name: str, edit: Edit) -> Case:
    return Case(name, edit)


def refused(name: str, field: str, edit: Edit | None = None, code: grpc.StatusCode = INVALID, **kw: object) -> Case:
    return Case(name, edit, code=code, field=field, **kw)  # type: ignore[arg-type]


def sampling(name: str, value: object) -> Edit:
    def edit(r: scheduler_pb2.GenerateRequest) -> None:
        if isinstance(value, list):
            getattr(r.sampling, name).extend(value)
        else:
            setattr(r.sampling, name, value)

    return edit


def chat(*messages: tuple[int, str]) -> Edit:
    def edit(r: scheduler_pb2.GenerateRequest) -> None:
        r.prompt.chat.SetInParent()
        for role, content in messages:
            r.prompt.chat.messages.add(role=role, content=content)  # type: ignore[arg-type]

    return edit


def floats(field: str, edit: Callable[[float], Edit], *bad: float) -> list[Case]:
    return [refused(f"{field}={v}", field.split(".")[-1], edit(v)) for v in (math.nan, math.inf, -math.inf, *bad)]


def slo(name: str) -> Callable[[float], Edit]:
    return lambda v: lambda r: setattr(r.slo, name, v)


def bad_utf8(field: str, *names: str) -> Case:
    return refused(f"{field} not UTF-8", field, wire=(names, NOT_UTF8))


USER, SYSTEM = common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_SYSTEM

TABLE: dict[str, list[Case]] = {
    "GenerateRequest.request_id": [
        ok("any id", lambda r: setattr(r, "request_id", "mine-1")),
        bad_utf8("request_id", "request_id"),
    ],
    "GenerateRequest.model": [
        refused("unknown", "model", lambda r: setattr(r, "model", "no-such-model"), NOT_FOUND),
        bad_utf8("model", "model"),
    ],
    "GenerateRequest.prompt": [refused("unset", "prompt", lambda r: r.ClearField("prompt"))],
    "GenerateRequest.sampling": [ok("unset: defaults", lambda r: r.ClearField("sampling"))],
    "GenerateRequest.slo": [ok("unset: none", lambda r: r.ClearField("slo"))],
    "GenerateRequest.priority": [
        *(ok(f"priority {p}", lambda r, p=p: setattr(r, "priority", p)) for p in (1, 2, 3)),
        refused("unknown 99", "priority", lambda r: setattr(r, "priority", 99), says="99"),
        refused("negative", "priority", lambda r: setattr(r, "priority", -1)),
    ],
    "Prompt.text": [
        ok("text", lambda r: setattr(r.prompt, "text", "hello there")),
        refused("empty", "prompt.text", lambda r: setattr(r.prompt, "text", "")),
        refused("over max_prompt_bytes", "prompt.text", lambda r: setattr(r.prompt, "text", "é" * MAX_PROMPT_BYTES)),
        bad_utf8("prompt.text", "prompt", "text"),
    ],
    "Prompt.token_ids": [refused("no ids", "prompt", lambda r: r.prompt.token_ids.ClearField("ids"))],
    "Prompt.chat": [refused("no messages", "prompt.chat", chat())],
    "TokenIds.ids": [
        refused("outside the vocabulary", "prompt.token_ids", lambda r: r.prompt.token_ids.ids.append(VOCAB)),
        refused("largest uint32", "prompt.token_ids", lambda r: r.prompt.token_ids.ids.append(2**32 - 1)),
        refused("over the context", "prompt", lambda r: r.prompt.token_ids.ids.extend([5] * CONTEXT)),
        refused(
            "over every decode worker's KV", "prompt", lambda r: r.prompt.token_ids.ids.extend([5] * 400), EXHAUSTED
        ),
    ],
    "ChatMessages.messages": [ok("a conversation", chat((SYSTEM, "be brief"), (USER, "hi")))],
    "ChatMessage.role": [
        *(ok(f"role {role}", chat((role, "hi"))) for role in (1, 2, 3, 4)),
        refused("unset", "prompt.chat.messages[0].role", chat((0, "hi"))),
        refused("unknown 99", "prompt.chat.messages[1].role", chat((USER, "hi"), (99, "hi")), says="99"),
    ],
    "ChatMessage.content": [
        ok("empty", chat((USER, ""))),
        refused("over max_prompt_bytes", "prompt.chat.messages", chat((USER, "x" * (MAX_PROMPT_BYTES + 1)))),
        refused(
            "not UTF-8",
            "prompt.chat.messages[1].content",
            chat((USER, "hi")),
            wire=(("prompt", "chat", "messages", "content"), NOT_UTF8),
        ),
    ],  # fmt: skip
    "SamplingParams.max_tokens": [
        ok("5", sampling("max_tokens", 5)),
        refused("0", "max_tokens", sampling("max_tokens", 0)),
        refused("over the context", "max_tokens", sampling("max_tokens", CONTEXT)),
        refused("largest uint32", "max_tokens", sampling("max_tokens", 2**32 - 1)),
        refused("over every decode worker's KV", "max_tokens", sampling("max_tokens", 450), EXHAUSTED),
    ],
    "SamplingParams.temperature": [
        ok("0.7", sampling("temperature", 0.7)),
        *floats("temperature", lambda v: sampling("temperature", v), -1.0),
    ],
    "SamplingParams.top_k": [ok("5", sampling("top_k", 5)), ok("largest uint32", sampling("top_k", 2**32 - 1))],
    "SamplingParams.top_p": [
        ok("0.5", sampling("top_p", 0.5)),
        *floats("top_p", lambda v: sampling("top_p", v), 0.0, -0.5, 1.5),
    ],
    "SamplingParams.min_p": [
        ok("0.2", sampling("min_p", 0.2)),
        *floats("min_p", lambda v: sampling("min_p", v), -0.1, 1.5),
    ],
    "SamplingParams.repetition_penalty": [
        ok("1.3", sampling("repetition_penalty", 1.3)),
        *floats("repetition_penalty", lambda v: sampling("repetition_penalty", v), 0.0, -1.0),
    ],
    "SamplingParams.seed": [
        ok("0", sampling("seed", 0)),
        refused("2**63", "seed", sampling("seed", 2**63)),
        refused("largest uint64", "seed", sampling("seed", 2**64 - 1)),
    ],
    "SamplingParams.stop": [
        ok("a string", sampling("stop", ["zz"])),
        refused("empty string", "stop", sampling("stop", [""])),
        refused("17 strings", "stop", sampling("stop", [f"s{i}" for i in range(17)])),
        refused("a long string", "stop", sampling("stop", ["x" * 300])),
        bad_utf8("sampling.stop[0]", "sampling", "stop"),
    ],
    "SamplingParams.stop_token_ids": [
        ok("an id", sampling("stop_token_ids", [5])),
        refused("outside the vocabulary", "stop_token_ids", sampling("stop_token_ids", [VOCAB])),
        refused("65 ids", "stop_token_ids", sampling("stop_token_ids", [5] * 65)),
    ],
    "SamplingParams.ignore_eos": [ok("set", sampling("ignore_eos", True))],
    "SamplingParams.logprobs": [ok("set", sampling("logprobs", True))],
    "SamplingParams.include_stop_str_in_output": [ok("set", sampling("include_stop_str_in_output", True))],
    "Slo.ttft_ms": [
        # Valid targets are served however loaded the machine is: this row is not a test of admission.
        ok("1 h", slo("ttft_ms")(3_600_000.0)), *floats("slo.ttft_ms", slo("ttft_ms"), -1.0),
        refused("out of reach", "slo.ttft_ms", slo("ttft_ms")(1.0), OUT_OF_RANGE, says="retrying will not help"),
    ],
    "Slo.tpot_ms": [
        ok("60 s", slo("tpot_ms")(60_000.0)), *floats("slo.tpot_ms", slo("tpot_ms"), -1.0),
        refused("out of reach", "slo.tpot_ms", slo("tpot_ms")(0.01), OUT_OF_RANGE, says="retrying will not help"),
    ],
    # Messages without fields: unknown fields (from a newer client) are ignored, as proto3 says.
    "ListModelsRequest": [],
    "GetClusterStateRequest": [],
}


def test_the_table_has_a_row_for_every_field_of_every_public_message() -> None:
    wanted = set()
    for message in public_messages():
        wanted |= {f"{message.name}.{f.name}" for f in message.fields} or {message.name}
    assert sorted(wanted - TABLE.keys()) == [], "add a row for each new field"
    assert sorted(TABLE.keys() - wanted) == [], "a row for a field that is gone"


async def answer(
    generate: grpc.aio.UnaryStreamMultiCallable, data: bytes, timeout_s: float
) -> tuple[grpc.StatusCode, str]:
    """The status a request as bytes ends with, and its message; OK only with a final chunk."""
    finished = False
    try:
        async for response in generate(data, timeout=timeout_s):
            finished = response.chunk.HasField("finish")
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return (OK, "") if finished else (grpc.StatusCode.UNKNOWN, "the stream ended without a final chunk")


async def test_every_field_is_served_or_refused_naming_it(door: DoorMesh) -> None:
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(door.target) as channel:
        generate = raw_generate(channel)
        for row, cases in TABLE.items():
            for case in cases:
                code, details = await answer(generate, case.request_bytes(), timeout_s=60)
                named = details.partition(":")[0]
                if code != case.code or case.field not in named or case.says not in details or "Traceback" in details:
                    wrong.append(
                        f"{row} {case.name}: {code.name} {details!r}, expected {case.code.name} on {case.field}"
                    )
        for method in ("ListModels", "GetClusterState"):
            call = channel.unary_unary(f"/pdmesh.v1.Scheduler/{method}", request_serializer=lambda b: b)
            await call(b"", timeout=10)
            await call(field_bytes(field_path(("request_id",)), b"from a newer client"), timeout=10)
    assert wrong == [], "\n".join(wrong)
    assert door.log_problems() == []


# ---- the fuzz test ---------------------------------------------------------------------------

# What a client may be told: its request is wrong, too big, too slow, its SLO out of reach (OUT_OF_RANGE),
# or the mesh is busy.
ACCEPTABLE = {OK, INVALID, NOT_FOUND, EXHAUSTED, OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def test_thousands_of_malformed_requests_get_clear_answers(door: DoorMesh) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    unclear: list[str] = []
    started = time.monotonic()
    async with grpc.aio.insecure_channel(door.target) as channel:
        generate = raw_generate(channel)
        queue = iter(enumerate(Mutator(seed=14).cases(FUZZ_CASES)))

        async def sender() -> None:
            for index, data in queue:
                code, details = await answer(generate, data, timeout_s=FUZZ_TIMEOUT_S)
                outcomes[code.name] += 1
                if code not in ACCEPTABLE or "Traceback" in details:
                    unclear.append(f"case {index} {data!r}: {code.name} {details!r}")

        await asyncio.gather(*(sender() for _ in range(8)))
        # The mesh still serves, and serves right.
        for request in valid_requests():
            assert await answer(generate, request.SerializeToString(), timeout_s=60) == (OK, "")
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {sum(outcomes.values())} cases in {elapsed:.0f} s: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) == FUZZ_CASES
    assert unclear == []
    assert door.log_problems() == []
