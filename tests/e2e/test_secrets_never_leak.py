"""A secret never leaks: a sentinel API key is searched for in everything a run leaves.

The sentinel is the planner's OPENAI_API_KEY (a ``SecretStr`` setting, so registered
for redaction at start-up). It also goes, as a caller would send it, in the Run call's
``authorization: Bearer`` metadata, into a tool's arguments (so it flows into outputs,
the result cache's reach, errors and model prompts), into a goal, into tool and plan
errors, and into the model endpoint's own error text. A second value, never registered,
is sent only as ``x-api-key`` metadata: request metadata is never recorded at all.

The rule the test holds the stack to (see ``trellis.runtime.redact``):

- never in any log line (JSON on stderr, debug level, stdlib loggers included), any
  exported span (name, attributes, events, status), any error a caller receives (gRPC
  status message and details, a run's or a node's ``Error``), the result cache (every
  Redis key and value), the ledger and the usage outboxes, or the metrics;
- returned as they are: a tool's output and the plan are the caller's own data, so the
  echo tool's answer holds the sentinel, and the run store keeps it for ``GetRun``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from google.rpc import status_pb2
from grpc import aio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest

from tests.support.json_logs import JsonLogs
from tests.support.model_script import script_of
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import from_value, to_struct
from trellis_cli.stack import start_stack

SENTINEL = f"SENTINEL{uuid.uuid4().hex}"
UNREGISTERED = f"UNREGISTERED{uuid.uuid4().hex}"
HARMLESS = f"harmless-{uuid.uuid4().hex}"
FORBIDDEN = (SENTINEL, UNREGISTERED)

METADATA = (("authorization", f"Bearer {SENTINEL}"), ("x-api-key", UNREGISTERED))

TOOLS = """
version: 1
sandbox_root: .
tools:
  - name: echo
    builtin: echo
    cache_ttl: 60   # cacheable: a result holding the secret must still never be stored
  - name: arithmetic
    builtin: arithmetic
  - name: read_file
    builtin: read_file
  - name: sleep
    builtin: sleep
"""


def node(node_id: str, tool: str, deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def leaks(text: str | bytes) -> list[str]:
    """The forbidden values found in ``text``."""
    if isinstance(text, bytes):
        return [v for v in FORBIDDEN if v.encode() in text]
    return [v for v in FORBIDDEN if v in text]


def rpc_error_text(error: aio.AioRpcError) -> str:
    """Everything a caller gets with a failed call: code, message, every trailer."""
    parts = [error.code().name, error.details() or ""]
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            parts.append(str(status_pb2.Status.FromString(value)))
        parts.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return "\n".join(parts)


async def run(stub, request: executor_pb2.RunRequest) -> list[executor_pb2.RunResponse]:
    return [event async for event in stub.Run(request, metadata=METADATA, timeout=60)]


def outcomes(events) -> dict[str, common_pb2.NodeOutcome]:
    return {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if e.WhichOneof("event") == "node_finished"
    }


def files_of(directory: Path, prefix: str) -> dict[Path, bytes]:
    """The bytes of every file in ``directory`` whose name starts with ``prefix``
    (a SQLite file with its -wal and -shm companions)."""
    return {p: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.startswith(prefix)}


async def redis_dump(url: str) -> list[bytes]:
    """Every key of the Redis the stack used, and every value under it."""
    client = redis.Redis.from_url(url)
    out: list[bytes] = []
    try:
        async for key in client.scan_iter(count=1000):
            out.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                out.append(await client.get(key) or b"")
            elif kind == "hash":
                out.extend(b"%s=%s" % kv for kv in (await client.hgetall(key)).items())
            elif kind == "set":
                out.extend(await client.smembers(key))
            elif kind == "zset":
                out.extend(await client.zrange(key, 0, -1))
            elif kind == "list":
                out.extend(await client.lrange(key, 0, -1))
            else:
                out.append(await client.dump(key) or b"")
    finally:
        await client.aclose()
    return out


async def test_a_sentinel_secret_never_leaks(tmp_path: Path, redis_server, channels) -> None:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS)
    exporter = InMemorySpanExporter()
    logs = JsonLogs()
    seen_errors: list[str] = []  # every error text a caller was handed
    try:
        stack = await start_stack(
            database_url=f"sqlite:///{tmp_path}/runs.db",
            costs_database_url=f"sqlite:///{tmp_path}/costs.db",
            span_processors=[SimpleSpanProcessor(exporter)],
            openai_api_key=SENTINEL,
            redis_url=redis_server.url,
            tools_file=tools,
            tools_reload_seconds=0,
        )
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
            assert stack.model is not None

            # 1. A planned run (the model is called with the sentinel as its API key),
            #    and one whose goal holds the sentinel (prompts, openai's debug logs).
            planned = await run(stub, executor_pb2.RunRequest(goal="What is (17*23)+4?"))
            assert planned[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
            await run(stub, executor_pb2.RunRequest(goal=f"Say hello to {SENTINEL}"))

            # 2. An explicit plan: outputs holding the sentinel, a cacheable control
            #    value, and tool errors quoting it (arguments, expression, file path).
            plan = [
                node("secret", "echo", value=f"token={SENTINEL}"),
                node("again", "echo", ["secret"], value="$secret"),
                node("plain", "echo", value=HARMLESS),
                node("bad_args", "sleep", ms=SENTINEL),
                node("bad_expression", "arithmetic", expression=f"{SENTINEL} + 1"),
                node("bad_path", "read_file", path=SENTINEL),
            ]
            explicit = await run(stub, executor_pb2.RunRequest(run_id="explicit", plan=plan))
            done = outcomes(explicit)
            # The caller's own data comes back unchanged ...
            assert from_value(done["secret"].output) == f"token={SENTINEL}"
            assert from_value(done["again"].output) == f"token={SENTINEL}"
            assert from_value(done["plain"].output) == HARMLESS
            # ... while every error is redacted.
            for name in ("bad_args", "bad_expression", "bad_path"):
                assert done[name].status == common_pb2.NODE_STATUS_FAILED, done[name]
                assert "[redacted]" in done[name].error.message, done[name].error
            seen_errors += [str(o.error) for o in done.values()]
            seen_errors.append(str(explicit[-1].finished.error))

            # 3. An invalid plan: the refusal quotes the unknown tool's name.
            bad_plan = [node("n1", f"tool_{SENTINEL}", value=1)]
            with pytest.raises(aio.AioRpcError) as refused:
                await run(stub, executor_pb2.RunRequest(plan=bad_plan))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "[redacted]" in (refused.value.details() or "")
            seen_errors.append(rpc_error_text(refused.value))

            # 4. The model endpoint refuses the key and quotes it in its error.
            script_of(stack.model).fail(401, message=f"Incorrect API key provided: {SENTINEL}")
            failed = await run(stub, executor_pb2.RunRequest(goal="What is 1+1?"))
            finished = failed[-1].finished
            assert finished.status == executor_pb2.RUN_STATUS_FAILED
            assert finished.error.code == "MODEL_AUTH_FAILED"
            assert "Incorrect API key provided: [redacted]" in finished.error.message
            seen_errors.append(str(finished.error))

            # The stored runs: errors redacted; the plan and outputs are the caller's.
            for events in (planned, explicit, failed):
                stored = (
                    await stub.GetRun(
                        executor_pb2.GetRunRequest(run_id=events[0].run_id),
                        metadata=METADATA,
                        timeout=10,
                    )
                ).run
                seen_errors.append(str(stored.error))
                seen_errors += [str(o.error) for o in stored.outcomes]
                if stored.run_id == "explicit":
                    assert SENTINEL in str(stored.plan) and SENTINEL in str(stored.outcomes)

            # Wait for the control value's (write-behind) cache entry.
            for _ in range(100):
                if any(HARMLESS.encode() in item for item in await redis_dump(redis_server.url)):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the harmless echo result was never cached")
        finally:
            await stack.stop()  # flushes spans and the usage outboxes
    finally:
        logs.restore()

    # -- errors a caller received -------------------------------------------------------
    for text in seen_errors:
        assert not leaks(text), text

    # -- logs ---------------------------------------------------------------------------
    lines = logs.lines()
    assert any(json.loads(line).get("level") == "debug" for line in lines)
    leaked = [line for line in lines if leaks(line)]
    assert not leaked, leaked[:3]

    # -- spans --------------------------------------------------------------------------
    spans = exporter.get_finished_spans()
    services = {span.resource.attributes["service.name"] for span in spans}
    # cost accounting's bookkeeping makes spans only when it fails (rpc_spans): not here
    assert services == {"executor", "planner", "toolgateway", "cache"}
    dumps = [span.to_json() for span in spans]
    leaked = [text for text in dumps if leaks(text)]
    assert not leaked, leaked[:1]
    # The model's refusal was recorded on the planner's span, redacted.
    assert any("Incorrect API key provided: [redacted]" in text for text in dumps)

    # -- the result cache (Redis: every key and value) -----------------------------------
    cached = await redis_dump(redis_server.url)
    assert any(HARMLESS.encode() in item for item in cached)  # the cache was in use
    leaked = [item for item in cached if leaks(item)]
    assert not leaked, leaked[:3]

    # -- the ledger and the usage outboxes (every byte of their files) --------------------
    with sqlite3.connect(tmp_path / "costs.db") as db:
        assert db.execute("SELECT count(*) FROM usage").fetchone()[0] > 0
    ledger = files_of(tmp_path, "costs")
    assert any("outbox" in p.name for p in ledger)
    for path, data in ledger.items():
        assert not leaks(data), path

    # -- the run store keeps the caller's data, never request metadata ---------------------
    runs = b"".join(files_of(tmp_path, "runs").values())
    assert SENTINEL.encode() in runs and UNREGISTERED.encode() not in runs

    # -- metrics --------------------------------------------------------------------------
    assert not leaks(generate_latest(REGISTRY))
