"""mTLS between services, with certificates this test generates (cryptography): a client
with a certificate from the CA gets through; no client certificate, one from another
CA, or plaintext, does not (UNAVAILABLE); a service's own channels dial with its
certificate; the whole embedded stack on mTLS runs a goal; partial settings stop a
service at start-up."""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context, tls
from trellis.runtime.channels import Channels
from trellis.runtime.convert import from_value, to_value
from trellis.runtime.errors import Unavailable, translated_rpc_errors
from trellis.runtime.server import Service
from trellis.runtime.settings import ServiceSettings, load_settings
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc
from trellis_cli.stack import start_stack

SERVICE = tools_pb2.DESCRIPTOR.services_by_name["ToolServerService"].full_name
HOUR = datetime.timedelta(hours=1)


# -- certificates -----------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Authority:
    """A CA that signs service certificates (serverAuth + clientAuth, SAN localhost and
    127.0.0.1), each written as PEM files."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    directory: Path

    @classmethod
    def create(cls, name: str, directory: Path) -> "Authority":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, cert, directory)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, name: str) -> tuple[Path, Path]:
        """(certificate file, key file) of a service certificate called ``name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + HOUR)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        return cert_file, key_file

    def settings(self, name: str) -> dict[str, Path]:
        """The TLS settings of a service with a certificate from this CA."""
        cert_file, key_file = self.issue(name)
        return {"tls_cert_file": cert_file, "tls_key_file": key_file, "tls_ca_file": self.ca_file}


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority.create("trellis-test-ca", tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> Authority:
    return Authority.create("somebody-else", tmp_path / "other-ca")


def files(settings: dict[str, Path]) -> tls.TlsFiles:
    tls_files = tls.tls_files(*(settings[name] for name in tls.FIELDS))
    assert tls_files is not None
    return tls_files


# -- a probe service to call ------------------------------------------------------------------


class Relay(tools_pb2_grpc.ToolServerServiceServicer):
    """Answers with its tenant; relays to the next server first when there is one."""

    def __init__(self, channels, next_target: str | None) -> None:
        self._channels, self._next = channels, next_target

    async def CallTool(self, request, ctx):
        seen = {"tenant": context.tenant(), "hops": 1}
        if self._next:
            stub = tools_pb2_grpc.ToolServerServiceStub(self._channels.get(self._next))
            with translated_rpc_errors():
                onward = await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=10)
            seen["hops"] += from_value(onward.output)["hops"]
        return tools_pb2.CallToolResponse(output=to_value(seen))


def relay(next_target: str | None = None):
    async def build(settings, telemetry, channels) -> Service:
        servicer = Relay(channels, next_target)
        return Service(
            "relay",
            [SERVICE],
            lambda server: tools_pb2_grpc.add_ToolServerServiceServicer_to_server(servicer, server),
        )

    return build


async def call(channel: grpc.aio.Channel) -> dict:
    stub = tools_pb2_grpc.ToolServerServiceStub(channel)
    with translated_rpc_errors():
        reply = await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=5)
    return from_value(reply.output)


@pytest.fixture
async def mtls_server(serve, ca: Authority) -> str:
    server = await serve("relay", relay(), ServiceSettings(port=0, **ca.settings("server")))
    return server.target


# -- the handshake ----------------------------------------------------------------------------


async def test_a_client_certificate_from_the_ca_gets_through(mtls_server: str, ca) -> None:
    credentials = files(ca.settings("client")).channel_credentials()
    channels = Channels(credentials=credentials)
    try:
        with context.request_scope(tenant_id="acme"):
            assert await call(channels.get(mtls_server)) == {"tenant": "acme", "hops": 1}
        async with grpc.aio.secure_channel(mtls_server, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channels.close()


async def test_the_server_name_is_checked_against_its_certificate(mtls_server: str, ca) -> None:
    """A client trusting the CA still refuses a server whose certificate names another host."""
    credentials = files(ca.settings("client")).channel_credentials()
    options = [("grpc.ssl_target_name_override", "executor.example")]
    async with grpc.aio.secure_channel(mtls_server, credentials, options=options) as channel:
        with pytest.raises(Unavailable):
            await call(channel)


async def test_a_client_without_a_certificate_is_refused(mtls_server: str, ca) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_file.read_bytes())
    async with grpc.aio.secure_channel(mtls_server, credentials) as channel:
        with pytest.raises(Unavailable):
            await call(channel)


async def test_a_certificate_from_another_ca_is_refused(mtls_server: str, ca, other_ca) -> None:
    stranger = files(other_ca.settings("stranger"))
    # It trusts our CA (so the server is fine) but presents a certificate we did not sign.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.ca_file.read_bytes(),
        private_key=stranger.key,
        certificate_chain=stranger.cert,
    )
    async with grpc.aio.secure_channel(mtls_server, credentials) as channel:
        with pytest.raises(Unavailable):
            await call(channel)


async def test_plaintext_is_refused(mtls_server: str) -> None:
    async with grpc.aio.insecure_channel(mtls_server) as channel:
        with pytest.raises(Unavailable):
            await call(channel)


async def test_a_services_own_channels_dial_with_its_certificate(serve, ca) -> None:
    """Server A (mTLS) relays to server B (mTLS): A's channel factory presents A's cert."""
    last = await serve("b", relay(), ServiceSettings(port=0, **ca.settings("b")))
    first = await serve("a", relay(last.target), ServiceSettings(port=0, **ca.settings("a")))
    channels = Channels(credentials=files(ca.settings("client")).channel_credentials())
    try:
        assert (await call(channels.get(first.target)))["hops"] == 2
    finally:
        await channels.close()


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", tls.FIELDS)
def test_partial_tls_settings_stop_the_service(monkeypatch, capsys, ca, missing: str) -> None:
    for name, path in ca.settings("svc").items():
        if name != missing:
            monkeypatch.setenv(f"TRELLIS_{name.upper()}", str(path))
    with pytest.raises(SystemExit) as exited:
        load_settings(ServiceSettings, "trellis-test")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"without TRELLIS_{missing.upper()}" in err and "needs all three" in err


def test_unreadable_or_non_pem_files_stop_the_service(tmp_path: Path, ca) -> None:
    given = ca.settings("svc")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"TRELLIS_TLS_KEY_FILE: .* holds no PEM block"):
        ServiceSettings(**{**given, "tls_key_file": tmp_path / "junk.pem"})
    with pytest.raises(ValueError, match="TRELLIS_TLS_CA_FILE: cannot read"):
        ServiceSettings(**{**given, "tls_ca_file": tmp_path / "absent.pem"})


def test_no_tls_settings_is_plaintext(monkeypatch) -> None:
    assert tls.from_settings(ServiceSettings()) is None
    assert tls.from_env({}) is None
    with pytest.raises(tls.TlsConfigError, match="without TRELLIS_TLS_KEY_FILE"):
        tls.from_env({"TRELLIS_TLS_CERT_FILE": "a", "TRELLIS_TLS_CA_FILE": "c"})


# -- the whole stack --------------------------------------------------------------------------


async def test_the_embedded_stack_on_mtls_runs_a_goal(tmp_path: Path, ca) -> None:
    """Every service serves mTLS and dials the others with its certificate; a goal (planner,
    gateway, cache, costs) and an explicit plan run end to end."""
    stack = await start_stack(database_url=f"sqlite:///{tmp_path}/t.db", **ca.settings("svc"))
    channels = Channels(credentials=files(ca.settings("cli")).channel_credentials())
    try:
        client = ExecutorClient(channels.get(stack.executor_target), timeout=60)
        events = [e async for e in client.run(executor_pb2.RunRequest(goal="What is (17*23)+4?"))]
        finished = events[-1].finished
        assert finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, finished
        assert "395" in finished.answer
        assert finished.usage.input_tokens > 0  # the planner reached the model and costs
        plan = executor_pb2.RunRequest()
        plan.plan.append(common_pb2.ToolCall(node_id="n1", tool="arithmetic"))
        plan.plan[0].args.update({"expression": "2*21"})
        events = [e async for e in client.run(plan)]
        assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
        # Plaintext to any of the services is refused.
        async with grpc.aio.insecure_channel(stack.target("cache")) as plain:
            health = health_pb2_grpc.HealthStub(plain)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channels.close()
        await stack.stop()
