"""The wire contract: generated code matches the protos, and the protos follow the house rules.

Rules checked on the compiled descriptors: every service, RPC, message, field, oneof, enum and
enum value has a comment; enum values carry their enum's prefix and 0 is *_UNSPECIFIED;
durations and time points say their unit in the name.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

import pdmesh.v1
from pdmesh import protogen

protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) generates the code")

GENERATED = protogen.ROOT / protogen.PACKAGE_DIR
UNITLESS_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "logprobs", "rms_relative_error"}


def test_regenerating_the_code_changes_nothing(tmp_path: Path) -> None:
    tools = importlib.metadata.version("grpcio-tools")
    if f"grpcio-tools {tools}" != pdmesh.v1.GENERATED_WITH:
        pytest.skip(
            f"committed code is from {pdmesh.v1.GENERATED_WITH}; grpcio-tools {tools} writes other bytes"
        )
    protogen.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in (tmp_path / protogen.PACKAGE_DIR).glob("*.py*")}
    committed = {p.name: p.read_text() for p in GENERATED.glob("*.py*")}
    assert sorted(committed) == sorted(fresh), "files differ: run `make protos` and commit pdmesh/v1"
    stale = [name for name in sorted(fresh) if fresh[name] != committed[name]]
    assert stale == [], f"{stale} are stale: run `make protos` and commit pdmesh/v1"


def test_generated_stubs_import_under_grpcio_older_than_the_generator() -> None:
    for path in GENERATED.glob("*_pb2_grpc.py"):
        assert f"GRPC_GENERATED_VERSION = '{protogen.GRPC_FLOOR}'" in path.read_text(), path.name


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("descriptors") / "pdmesh.pb"
    protos = sorted(
        str(p.relative_to(protogen.PROTO_ROOT)) for p in (protogen.PROTO_ROOT / "pdmesh/v1").glob("*.proto")
    )
    assert protoc.main(["protoc", f"-I{protogen.PROTO_ROOT}", "--include_source_info",
                        f"--descriptor_set_out={out}", *protos]) == 0  # fmt: skip
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def documented_elements(f: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, full name) of every element that must carry a comment."""

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, scope: str) -> Iterator:
        yield path, f"{scope}.{e.name}"
        for k, v in enumerate(e.value):
            yield (*path, 2, k), f"{scope}.{e.name}.{v.name}"

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, scope: str) -> Iterator:
        name = f"{scope}.{m.name}"
        yield path, name
        for k, field in enumerate(m.field):
            yield (*path, 2, k), f"{name}.{field.name}"
        for k, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of `optional` fields
                yield (*path, 8, k), f"{name}.{oneof.name}"
        for k, nested in enumerate(m.nested_type):
            yield from message((*path, 3, k), nested, name)
        for k, e in enumerate(m.enum_type):
            yield from enum((*path, 4, k), e, name)

    for i, m in enumerate(f.message_type):
        yield from message((4, i), m, f.package)
    for i, e in enumerate(f.enum_type):
        yield from enum((5, i), e, f.package)
    for i, s in enumerate(f.service):
        yield (6, i), f"{f.package}.{s.name}"
        for k, rpc in enumerate(s.method):
            yield (6, i, 2, k), f"{f.package}.{s.name}.{rpc.name}"


def test_every_service_rpc_message_field_and_enum_value_is_documented(files: list) -> None:
    undocumented = []
    for f in files:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        undocumented += [name for path, name in documented_elements(f) if not comments.get(path)]
    assert undocumented == []


def test_enum_values_carry_their_enum_prefix_and_zero_is_unspecified(files: list) -> None:
    for f in files:
        for e in f.enum_type:
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", e.name).upper() + "_"
            assert e.value[0].number == 0 and e.value[0].name == prefix + "UNSPECIFIED", e.name
            assert [v.name for v in e.value if not v.name.startswith(prefix)] == [], e.name


def test_durations_times_and_sizes_say_their_unit(files: list) -> None:
    floats = (descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE, descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT)
    unitless = []
    for f in files:
        for m in f.message_type:
            for field in m.field:
                name = field.name
                if field.type in floats and name not in UNITLESS_FLOATS and not name.endswith("_ms"):
                    unitless.append(f"{m.name}.{name}")
                if re.search(r"(^|_)(time|expiry|lease|interval|timeout)(_|$)", name) and not name.endswith(
                    "_ms"
                ):
                    unitless.append(f"{m.name}.{name}")
                if "bytes" in name and not name.endswith("_bytes"):
                    unitless.append(f"{m.name}.{name}")
    assert unitless == []
