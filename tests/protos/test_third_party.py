"""The vendored third_party/protos (google/rpc, grpc/health) compile on their own and
define exactly the messages, fields, enums and services of the descriptors the Python
services use (googleapis-common-protos, grpcio-health-checking): a client built from them
reads what the services send."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = ROOT / "third_party" / "protos"
#: vendored file -> the descriptor the Python side compiled from its own copy.
VENDORED: dict[str, FileDescriptor] = {
    "google/rpc/status.proto": status_pb2.DESCRIPTOR,
    "google/rpc/error_details.proto": error_details_pb2.DESCRIPTOR,
    "grpc/health/v1/health.proto": health_pb2.DESCRIPTOR,
}


@pytest.fixture(scope="module")
def compiled(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("third_party") / "set.binpb"
    include = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto only
    code = protoc.main(
        ["protoc", f"-I{THIRD_PARTY}", f"-I{include}", f"--descriptor_set_out={out}", *VENDORED]
    )
    assert code == 0, "protoc could not compile third_party/protos"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {file.name: file for file in files}


def _normalized(messages) -> list[descriptor_pb2.DescriptorProto]:
    """Messages by name, fields by number, without json_name (protoc fills it in, the
    Python runtime's copy leaves it out): declaration order is not part of the contract."""
    out = []
    for message in sorted(messages, key=lambda m: m.name):
        copy = descriptor_pb2.DescriptorProto()
        copy.CopyFrom(message)
        fields = sorted(copy.field, key=lambda f: f.number)
        for field in fields:
            field.ClearField("json_name")
        del copy.field[:]
        copy.field.extend(fields)
        nested = _normalized(copy.nested_type)
        del copy.nested_type[:]
        copy.nested_type.extend(nested)
        out.append(copy)
    return out


def shape(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """What goes on the wire and into stubs: package, messages, enums, services."""
    kept = descriptor_pb2.FileDescriptorProto(package=file.package, syntax=file.syntax)
    kept.message_type.extend(_normalized(file.message_type))
    kept.enum_type.extend(sorted(file.enum_type, key=lambda e: e.name))
    for service in sorted(file.service, key=lambda s: s.name):
        copy = kept.service.add(name=service.name)
        copy.method.extend(sorted(service.method, key=lambda m: m.name))
    return kept


@pytest.mark.parametrize("name", VENDORED)
def test_vendored_file_matches_what_the_services_use(compiled, name: str) -> None:
    python = descriptor_pb2.FileDescriptorProto()
    VENDORED[name].CopyToProto(python)
    assert shape(compiled[name]) == shape(python)


def test_every_vendored_file_is_listed_and_licensed() -> None:
    found = sorted(str(p.relative_to(THIRD_PARTY)) for p in THIRD_PARTY.rglob("*.proto"))
    assert found == sorted(VENDORED)
    for name in found:
        head = (THIRD_PARTY / name).read_text().splitlines()[:16]
        assert any("Licensed under the Apache License, Version 2.0" in line for line in head)
    assert "Apache License" in (THIRD_PARTY / "LICENSE").read_text()
    readme = (THIRD_PARTY / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in found)
