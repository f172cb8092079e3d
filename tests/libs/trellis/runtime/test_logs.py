"""Logs are JSON lines on stderr that carry the current trace_id and span_id."""

import io
import json
import logging
import sys

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


def test_lines_go_to_the_stderr_of_the_moment_not_a_closed_one(monkeypatch) -> None:
    # A CLI run in-process set logging up while stderr was a capture that is closed now.
    gone = io.StringIO()
    monkeypatch.setattr(sys, "stderr", gone)
    setup_logging("info")
    gone.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("some.library").warning("still seen")
    assert json.loads(now.getvalue().splitlines()[-1])["event"] == "still seen"
