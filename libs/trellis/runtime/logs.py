"""JSON logs (structlog) that carry the current trace_id and span_id.

Standard-library loggers (grpc, aiohttp, ...) go through the same formatter, so a
service writes one JSON object per line to stderr whatever logged it. Every line is
redacted last, after tracebacks are rendered (``trellis.runtime.redact``): registered
secrets, sensitive fields (authorization, api_key, password, ...) and bearer tokens
never reach the output.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from opentelemetry import trace

from trellis.runtime.redact import redact_event


def add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (as logging's own
    last-resort handler does), unless given a stream with ``setStream``: a command run
    in-process (tests, an embedding program) may swap stderr and close the one that was
    there at set-up."""

    def __init__(self) -> None:
        super().__init__()
        self._chosen: Any = None  # the base class set the stderr of the moment: forget it

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return self._chosen if self._chosen is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        self._chosen = value


def setup_logging(level: str = "info", *, service: str | None = None) -> None:
    """Configure structlog and stdlib logging for JSON lines on stderr."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event,  # last before rendering: tracebacks included
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The openai client's HTTP stack logs every request at INFO; spans already show them.
    for noisy in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
