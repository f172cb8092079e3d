"""API keys: parsing and hashing of the key table, the lookup, the settings that carry
it, the `trellis keys` helper, and the rules interceptor authenticating real gRPC calls
(the tenant is the key's, whatever x-tenant-id says; health and reflection stay open)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from trellis.runtime import auth, context
from trellis.runtime.convert import from_value, to_value
from trellis.runtime.errors import Unauthenticated, from_rpc_error, translated_rpc_errors
from trellis.runtime.server import Service
from trellis.runtime.settings import ConfigError, ServiceSettings, load_settings
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc
from trellis_cli import up
from trellis_cli.app import app
from trellis_executor.settings import ExecutorSettings

KEY_A, KEY_B = "trk_key-of-acme", "trk_key-of-beta"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
HASH_B = hashlib.sha256(KEY_B.encode()).hexdigest()
KEYS = auth.ApiKeys.load({HASH_A: "acme", HASH_B: "beta"})


# -- hashing and generated keys -------------------------------------------------------------


def test_hash_is_sha256_hex_of_the_key() -> None:
    assert auth.hash_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_new_keys_are_random_prefixed_and_long() -> None:
    keys = {auth.new_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("trk_") and len(key) == 4 + 43


# -- the key table ----------------------------------------------------------------------------


def test_key_map_from_json_text_or_mapping_normalises_hashes() -> None:
    text = json.dumps({HASH_A.upper(): "acme", HASH_B: " beta "})
    assert auth.parse_key_map(text) == {HASH_A: "acme", HASH_B: "beta"}
    assert auth.parse_key_map({HASH_A: "acme"}) == {HASH_A: "acme"}
    assert auth.parse_key_map("") == auth.parse_key_map("  ") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "JSON object"),
        (json.dumps({KEY_A: "acme"}), "not a SHA-256"),  # the key itself, not its hash
        (json.dumps({HASH_A: "bad tenant"}), "tenant 'bad tenant'"),
        (json.dumps({HASH_A: ""}), "tenant ''"),
        (json.dumps({HASH_A: 7}), "must be a string"),
        (json.dumps({HASH_A: "acme", HASH_A.upper(): "beta"}), "both 'acme' and 'beta'"),
    ],
)
def test_bad_key_maps_are_refused(value: str, message: str) -> None:
    with pytest.raises(auth.KeyConfigError, match=message):
        auth.parse_key_map(value)


def test_keys_file_has_hash_tenant_lines_comments_and_blanks() -> None:
    text = f"# production keys\n\n{HASH_A} acme   # rotated 2026-01\n  {HASH_B}\tbeta\n"
    assert auth.parse_keys_file(text) == {HASH_A: "acme", HASH_B: "beta"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{HASH_A}\n", "line 1: expected"),
        (f"# ok\n{HASH_A} acme extra\n", "line 2: expected"),
        ("abc acme\n", "line 1: 'abc' is not a SHA-256"),
        (f"{HASH_A} acme\n{HASH_A} beta\n", "line 2: .* both 'acme' and 'beta'"),
    ],
)
def test_bad_keys_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(auth.KeyConfigError, match=message):
        auth.parse_keys_file(text)


def test_load_merges_variable_and_file_and_refuses_contradictions(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"{HASH_B} beta\n{HASH_A} acme\n")
    keys = auth.ApiKeys.load({HASH_A: "acme"}, file)
    assert dict(keys.tenants) == {HASH_A: "acme", HASH_B: "beta"} and len(keys) == 2
    with pytest.raises(auth.KeyConfigError, match="both 'other' and 'beta'"):
        auth.ApiKeys.load({HASH_B: "other"}, file)
    with pytest.raises(auth.KeyConfigError, match="cannot read"):
        auth.ApiKeys.load({}, tmp_path / "missing")


# -- authenticating one call ------------------------------------------------------------------


def test_a_valid_bearer_key_gives_its_tenant() -> None:
    assert KEYS.authenticate(f"Bearer {KEY_A}") == "acme"
    assert KEYS.authenticate(f"bearer {KEY_B}") == "beta"  # the scheme is case-insensitive
    assert KEYS.authenticate(f"  Bearer   {KEY_A}  ") == "acme"
    assert KEYS.tenant_of(KEY_A) == "acme" and KEYS.tenant_of("nope") is None


@pytest.mark.parametrize("value", [None, "", "   "])
def test_no_key_is_api_key_missing(value: str | None) -> None:
    with pytest.raises(Unauthenticated) as raised:
        KEYS.authenticate(value)
    assert raised.value.reason == "API_KEY_MISSING"
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in raised.value.message


@pytest.mark.parametrize(
    "value",
    [
        "Bearer trk_wrong",
        f"Basic {KEY_A}",  # right key, wrong scheme
        KEY_A,  # no scheme
        "Bearer",
        f"Bearer {KEY_A} extra",
        f"Bearer {HASH_A}",  # the hash is not the key
    ],
)
def test_anything_else_is_api_key_invalid(value: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        KEYS.authenticate(value)
    assert raised.value.reason == "API_KEY_INVALID"
    assert KEY_A not in raised.value.message  # a key is never echoed back


# -- executor settings ------------------------------------------------------------------------


def test_executor_reads_keys_from_variable_and_file(monkeypatch, tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"{HASH_B} beta\n")
    monkeypatch.setenv("TRELLIS_API_KEYS", json.dumps({HASH_A: "acme"}))
    monkeypatch.setenv("TRELLIS_API_KEYS_FILE", str(file))
    settings = load_settings(ExecutorSettings, "test")
    assert settings.auth is True  # the default
    store = settings.key_store()
    assert store is not None
    assert store.authenticate(f"Bearer {KEY_B}") == "beta"
    assert store.authenticate(f"Bearer {KEY_A}") == "acme"


def test_auth_on_without_keys_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="TRELLIS_API_KEYS or TRELLIS_API_KEYS_FILE"):
        ExecutorSettings(auth=True).key_store()
    assert ExecutorSettings(auth=False).key_store() is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TRELLIS_API_KEYS": "{oops"}, "TRELLIS_API_KEYS"),
        ({"TRELLIS_API_KEYS": json.dumps({"raw-key": "acme"})}, "TRELLIS_API_KEYS"),
        ({"TRELLIS_API_KEYS_FILE": "/nonexistent/keys"}, "TRELLIS_API_KEYS_FILE"),
        ({"TRELLIS_AUTH": "maybe"}, "TRELLIS_AUTH"),
    ],
)
def test_bad_key_settings_exit_2_naming_the_variable(monkeypatch, capsys, env, variable) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        load_settings(ExecutorSettings, "trellis-executor")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{variable}: " in err


def test_standalone_executor_without_keys_exits_2_with_one_line(tmp_path: Path) -> None:
    """Auth is on by default outside the embedded stack: no key configured, no start."""
    result = subprocess.run(
        [sys.executable, "-m", "trellis_executor"],
        env={"PATH": "/usr/bin:/bin", "TRELLIS_PORT": "0", "TRELLIS_METRICS_PORT": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trellis-executor: invalid configuration: TRELLIS_AUTH is on")
    assert not (tmp_path / ".trellis").exists()  # refused before opening any store


# -- `trellis keys` and `trellis up`'s development key ----------------------------------------


def test_keys_new_prints_a_key_and_the_line_that_accepts_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "new", "--tenant", "acme", "--json"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    assert made["tenant"] == "acme" and made["sha256"] == auth.hash_key(made["key"])
    text = CliRunner().invoke(app, ["keys", "new", "--tenant", "acme"]).output
    line = next(part.removeprefix("line:").strip() for part in text.splitlines() if "line:" in part)
    key = next(part.removeprefix("key:").strip() for part in text.splitlines() if "key:" in part)
    (tmp_path / "keys").write_text(line + "\n")
    assert auth.ApiKeys.load(path=tmp_path / "keys").authenticate(auth.bearer(key)) == "acme"


def test_keys_hash_reads_the_key_from_stdin() -> None:
    result = CliRunner().invoke(app, ["keys", "hash", "--tenant", "beta"], input=KEY_B + "\n")
    assert result.exit_code == 0 and result.output.strip() == f"{HASH_B} beta"
    assert KEY_B not in result.output
    bad = CliRunner().invoke(app, ["keys", "new", "--tenant", "no spaces"])
    assert bad.exit_code == 2


def test_up_makes_a_development_key_only_when_auth_is_not_configured() -> None:
    env: dict[str, str] = {}
    key = up.dev_key(env)
    assert key is not None
    keys = auth.ApiKeys.load(json.loads(env["TRELLIS_API_KEYS"]))
    assert keys.authenticate(auth.bearer(key)) == context.DEFAULT_TENANT
    for name in up.AUTH_VARIABLES:
        given = {name: "x"}
        assert up.dev_key(given) is None and given == {name: "x"}


# -- the rules interceptor over real gRPC -----------------------------------------------------

SERVICE = tools_pb2.DESCRIPTOR.services_by_name["ToolServerService"].full_name


class TenantProbe(tools_pb2_grpc.ToolServerServiceServicer):
    """Answers with the tenant it runs as, after asking the next probe the same (if any)."""

    def __init__(self, channels, next_target: str | None) -> None:
        self._channels, self._next = channels, next_target

    async def CallTool(self, request, ctx):
        seen = {"tenant": context.tenant()}
        if self._next:
            stub = tools_pb2_grpc.ToolServerServiceStub(self._channels.get(self._next))
            with translated_rpc_errors():
                onward = await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=10)
            seen["downstream"] = from_value(onward.output)["tenant"]
        return tools_pb2.CallToolResponse(output=to_value(seen))


def probe(api_keys: auth.ApiKeys | None, next_target: str | None = None):
    async def build(settings, telemetry, channels) -> Service:
        servicer = TenantProbe(channels, next_target)
        return Service(
            "probe",
            [SERVICE],
            lambda server: tools_pb2_grpc.add_ToolServerServiceServicer_to_server(servicer, server),
            api_keys=api_keys,
        )

    return build


@pytest.fixture
async def edge(serve) -> str:
    """An authenticating probe (the edge) calling an internal probe that trusts x-tenant-id."""
    settings = ServiceSettings(port=0, metrics_port=0)
    internal = await serve("internal", probe(None), settings)
    edge = await serve("edge", probe(KEYS, internal.target), settings)
    return edge.target


async def call_probe(channels, target: str, metadata=()) -> dict:
    stub = tools_pb2_grpc.ToolServerServiceStub(channels.get(target))
    try:
        reply = await stub.CallTool(
            tools_pb2.CallToolRequest(tool="x"), timeout=10, metadata=tuple(metadata)
        )
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from error
    return from_value(reply.output)


async def test_a_valid_key_sets_the_tenant_here_and_downstream(edge: str, channels) -> None:
    seen = await call_probe(channels, edge, [("authorization", auth.bearer(KEY_A))])
    assert seen == {"tenant": "acme", "downstream": "acme"}


async def test_the_clients_own_tenant_header_is_ignored(edge: str, channels) -> None:
    metadata = [("authorization", auth.bearer(KEY_B)), ("x-tenant-id", "acme")]
    with context.request_scope(tenant_id="acme"):  # the client's interceptor sends it too
        seen = await call_probe(channels, edge, metadata)
    assert seen == {"tenant": "beta", "downstream": "beta"}


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "API_KEY_MISSING"),
        ([("x-tenant-id", "acme")], "API_KEY_MISSING"),
        ([("authorization", "Bearer trk_guess")], "API_KEY_INVALID"),
        ([("authorization", f"Basic {KEY_A}")], "API_KEY_INVALID"),
    ],
)
async def test_calls_without_a_valid_key_are_unauthenticated(
    edge: str, channels, metadata, reason: str
) -> None:
    with pytest.raises(Unauthenticated) as raised:
        await call_probe(channels, edge, metadata)
    assert raised.value.reason == reason
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_answer_without_a_key(edge: str) -> None:
    async with grpc.aio.insecure_channel(edge) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for response in reflection.ServerReflectionInfo(iter([request]), timeout=5):
            names |= {s.name for s in response.list_services_response.service}
        assert SERVICE in names


async def test_without_keys_the_callers_tenant_header_is_trusted(serve, channels) -> None:
    """Internal services (and auth off): the tenant is the caller's x-tenant-id."""
    server = await serve("internal", probe(None), ServiceSettings(port=0, metrics_port=0))
    with context.request_scope(tenant_id="acme"):
        assert (await call_probe(channels, server.target))["tenant"] == "acme"
