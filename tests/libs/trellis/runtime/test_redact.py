"""Redaction: registered secrets, sensitive field names and credential shapes are kept out
of log lines, span exports and RPC errors; short values are never registered."""

import io
import json
import logging
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel, SecretStr

from trellis.runtime import errors, redact
from trellis.runtime.logs import get_logger, setup_logging
from trellis.runtime.telemetry import RedactingSpanProcessor


def new_secret() -> str:
    """A value nothing else in the process contains (no credential shape either)."""
    return f"SECRET{uuid.uuid4().hex}"


# -- what is a secret --------------------------------------------------------------------


def test_registered_values_are_redacted_everywhere_in_text() -> None:
    secret = new_secret()
    assert redact.redact_text(f"key={secret}!") == f"key={secret}!"
    assert redact.register_secret(secret)
    assert redact.redact_text(f"key={secret}!") == "key=[redacted]!"
    assert redact.contains_secret(f"x{secret}x".encode())
    assert not redact.contains_secret(b"nothing here")


def test_short_and_empty_values_are_not_registered() -> None:
    assert not redact.register_secret("")
    assert not redact.register_secret("offline")  # 7 characters: would mask a word
    assert redact.redact_text("trellis-offline-rules-v1") == "trellis-offline-rules-v1"


def test_every_secret_field_of_settings_is_registered() -> None:
    class Nested(BaseModel):
        token: SecretStr

    class Settings(BaseModel):
        api_key: SecretStr
        keys: list[SecretStr]
        nested: Nested
        by_name: dict[str, SecretStr]
        plain: str

    values = [new_secret() for _ in range(4)]
    settings = Settings(
        api_key=SecretStr(values[0]),
        keys=[SecretStr(values[1])],
        nested=Nested(token=SecretStr(values[2])),
        by_name={"a": SecretStr(values[3])},
        plain="not-a-secret-value",
    )
    assert redact.register_settings(settings) == 4
    text = " ".join([*values, "not-a-secret-value"])
    assert redact.redact_text(text) == " ".join(["[redacted]"] * 4 + ["not-a-secret-value"])


def test_credential_shapes_are_redacted_without_registration() -> None:
    assert redact.redact_text("Authorization: Bearer abcdefgh12345678") == (
        "Authorization: Bearer [redacted]"
    )
    assert redact.redact_text("key sk-abcdefghijklmnop1234 used") == "key [redacted] used"
    assert redact.redact_text("a bearer token is needed") == "a bearer token is needed"


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "x-api-key",
        "api_key",
        "openai_api_key",
        "password",
        "token",
        "refresh_token",
        "client_secret",
        "http.request.header.authorization",
        "rpc.request.metadata.x-api-key",
        "cookie",
    ],
)
def test_sensitive_field_names(key: str) -> None:
    assert redact.sensitive_key(key)


@pytest.mark.parametrize(
    "key",
    ["gen_ai.usage.input_tokens", "output_tokens", "trace_id", "key", "tool", "event", "tokens"],
)
def test_ordinary_field_names(key: str) -> None:
    assert not redact.sensitive_key(key)


def test_values_are_redacted_in_nested_structures_and_sensitive_keys_masked() -> None:
    secret = new_secret()
    redact.register_secret(secret)
    value = {"headers": {"Authorization": "Basic Zm9vOmJhcg==", "x": [secret, 1]}, "ok": True}
    assert redact.redact_value(value) == {
        "headers": {"Authorization": "[redacted]", "x": ["[redacted]", 1]},
        "ok": True,
    }


# -- logs ----------------------------------------------------------------------------------


@pytest.fixture
def log_lines():
    """Logging as a service sets it up (debug), captured; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("debug", service="test")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]

    def lines() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield lines
    root.handlers[:], level = saved
    root.setLevel(level)


def test_log_lines_never_carry_secrets(log_lines) -> None:
    secret = new_secret()
    redact.register_secret(secret)
    log = get_logger("trellis.test.redact")
    log.info(f"calling with {secret}", authorization=f"Bearer {secret}", api_key="raw-key-1")
    log.info("metadata", metadata={"x-api-key": "raw-key-2", "x-tenant-id": "acme"})
    logging.getLogger("some.library").debug("stdlib says %s", secret)
    try:
        raise RuntimeError(f"endpoint refused key {secret}")
    except RuntimeError:
        log.exception("call failed")
    text = json.dumps(log_lines())
    assert secret not in text and "raw-key-1" not in text and "raw-key-2" not in text
    first, second, library, failure = log_lines()[-4:]
    assert first["event"] == "calling with [redacted]" and first["api_key"] == "[redacted]"
    assert second["metadata"] == {"x-api-key": "[redacted]", "x-tenant-id": "acme"}
    assert library["event"] == "stdlib says [redacted]"
    assert "endpoint refused key [redacted]" in failure["exception"]


def test_structlog_processor_alone_masks_sensitive_fields() -> None:
    event = redact.redact_event(None, "info", {"event": "x", "password": "p4ss-word-123"})
    assert event == {"event": "x", "password": "[redacted]"}


# -- spans ---------------------------------------------------------------------------------


def test_exported_spans_hold_no_secret_and_clean_spans_pass_unchanged() -> None:
    secret = new_secret()
    redact.register_secret(secret)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(SimpleSpanProcessor(exporter)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("clean") as clean:
        clean.set_attribute("gen_ai.usage.input_tokens", 12)
    with tracer.start_as_current_span(f"call {secret}") as span:
        span.set_attribute("http.request.header.authorization", "Bearer abcdefgh12345678")
        span.set_attribute("trellis.note", f"with {secret}")
        span.set_attribute("trellis.list", ["a", secret])
        span.record_exception(RuntimeError(f"refused {secret}"))
        span.set_status(Status(StatusCode.ERROR, f"failed: {secret}"))
    clean_out, dirty = exporter.get_finished_spans()
    assert clean_out.attributes["gen_ai.usage.input_tokens"] == 12
    text = dirty.to_json()
    assert secret not in text and "abcdefgh12345678" not in text
    assert dirty.name == "call [redacted]"
    assert dirty.attributes["trellis.note"] == "with [redacted]"
    assert dirty.attributes["trellis.list"] == ("a", "[redacted]")
    assert dirty.status.description == "failed: [redacted]"
    assert dirty.events[0].attributes["exception.message"] == "refused [redacted]"
    assert dirty.context == span.get_span_context()


# -- errors --------------------------------------------------------------------------------


def test_errors_leaving_a_server_are_redacted() -> None:
    secret = new_secret()
    redact.register_secret(secret)
    error = errors.InvalidArgument(
        f"bad value {secret}",
        reason="ARGS_INVALID",
        violations=[errors.FieldViolation(f"args.{secret}", f"{secret!r} is not a number")],
        metadata={"tool": "echo", "api_key": "raw-key-3", "echo": secret},
    )
    status = errors.to_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "bad value [redacted]"
    trailers = b"".join(v for _, v in status.trailing_metadata)
    assert secret.encode() not in trailers and b"raw-key-3" not in trailers
    rich = errors.rich_status(_FakeRpcError(status))
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    rich.details[0].Unpack(info)
    rich.details[1].Unpack(bad)
    assert dict(info.metadata) == {"tool": "echo", "api_key": "[redacted]", "echo": "[redacted]"}
    assert bad.field_violations[0].description == "'[redacted]' is not a number"
    assert error.message == f"bad value {secret}"  # the exception itself is left alone


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def trailing_metadata(self):
        return self._status.trailing_metadata


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:s3cret@db:5432/runs", "postgresql://bob:[redacted]@db:5432/runs"),
        ("postgresql://u:p@ss@db/runs", "postgresql://u:[redacted]@db/runs"),
        (
            "postgres://db/runs?password=s3cret&sslmode=require",
            "postgres://db/runs?password=[redacted]&sslmode=require",
        ),
        ("postgresql://bob@db/runs", "postgresql://bob@db/runs"),
        (
            "postgresql:///runs?host=/var/run/postgresql",
            "postgresql:///runs?host=/var/run/postgresql",
        ),
    ],
)
def test_urls_lose_their_password_and_keep_the_rest(url: str, shown: str) -> None:
    assert redact.redact_url(url) == shown
