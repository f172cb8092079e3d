"""Logs are JSON lines on stderr that carry the current trace_id and span_id."""

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from trellis.runtime.logs import get_logger, setup_logging


def test_json_log_lines_carry_trace_and_span_ids(capsys) -> None:
    setup_logging("info", service="test")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        get_logger("trellis.test").info("hello", answer=42)
        logging.getLogger("some.library").warning("from stdlib")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    ours, library = lines[-2], lines[-1]
    ctx = span.get_span_context()
    assert ours["event"] == "hello" and ours["answer"] == 42 and ours["level"] == "info"
    assert ours["trace_id"] == format(ctx.trace_id, "032x")
    assert ours["span_id"] == format(ctx.span_id, "016x")
    assert ours["service"] == "test"
    assert library["event"] == "from stdlib" and library["trace_id"] == ours["trace_id"]
