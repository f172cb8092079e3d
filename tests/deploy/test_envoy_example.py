"""The Envoy gRPC-JSON example: its descriptor command works and names real services."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]


def _transcoder(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    (manager,) = listener["filter_chains"][0]["filters"]
    filters = manager["typed_config"]["http_filters"]
    (transcoder,) = [f for f in filters if f["name"].endswith("grpc_json_transcoder")]
    assert filters[-1]["name"] == "envoy.filters.http.router"  # the router must come last
    return transcoder["typed_config"]


def test_descriptor_set_built_as_documented_has_the_transcoded_services(tmp_path: Path) -> None:
    config = _transcoder(yaml.safe_load((ROOT / "deploy/envoy/envoy.yaml").read_text()))
    out = tmp_path / "trellis.binpb"
    # The command the example's header documents, writing elsewhere.
    result = subprocess.run(
        ["npx", "--no-install", "buf", "build", "--as-file-descriptor-set", "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert config["proto_descriptor"] == "deploy/envoy/trellis.binpb"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    services = {
        f"{file.package}.{service.name}": {m.name for m in service.method}
        for file in files
        for service in file.service
    }
    assert config["services"] == ["trellis.executor.v1.ExecutorService"]
    assert {"Run", "GetRun", "CancelRun"} <= services["trellis.executor.v1.ExecutorService"]
    assert config["auto_mapping"] is True  # no google.api.http annotations in the protos
    names = {file.name for file in files}
    assert "google/protobuf/struct.proto" in names  # imports included
