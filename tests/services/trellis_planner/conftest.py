"""Planner test kit: a real offline model, the gateway's tools as ToolSpecs, a fake
cost-accounting recorder behind a real usage outbox (a file in the test's tmp dir), and
a core ``Planner`` wired to them with an in-memory span exporter. Every planner a test
builds from settings keeps its outbox in the test's tmp dir (TRELLIS_OUTBOX_PATH)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trellis.clients.usage_outbox import Sender, UsageOutbox
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import Unavailable
from trellis_offline_model.server import RunningModel
from trellis_planner.core import Planner
from trellis_planner.model import ChatModel

COMMANDS = (
    "Run one read-only system command and return its output. The command must be exactly "
    "one of these (no shell syntax, no other arguments):\n"
    "- `uname -a`: operating system, os, kernel, system, platform\n"
    "- `uname -s`: os name, kernel name\n"
    "- `df -h`: disk, disk usage, disk space, storage, filesystem, free space\n"
    "- `uptime`: uptime, load, load average, running\n"
    "- `nproc`: cpu, cpus, cores, processors\n"
    "- `date -u`: date, time, clock"
)


def make_tools() -> list[common_pb2.ToolSpec]:
    """ToolSpecs shaped like the tool gateway's builtin tools."""

    def spec(name: str, description: str, properties: dict, required: list[str]):
        schema = {"type": "object", "properties": properties, "required": required}
        return common_pb2.ToolSpec(
            name=name, description=description, input_schema=to_struct(schema)
        )

    return [
        spec("run_command", COMMANDS, {"command": {"type": "string"}}, ["command"]),
        spec(
            "arithmetic",
            "Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses.",
            {"expression": {"type": "string"}},
            ["expression"],
        ),
        spec(
            "sleep",
            "Wait for the given number of milliseconds.",
            {"ms": {"type": "integer"}},
            ["ms"],
        ),
        spec("echo", "Return the given value unchanged.", {"value": {}}, ["value"]),
    ]


@dataclass
class FakeRecorder:
    """Records usage requests; prices every call at ``cost``; or fails when told to."""

    cost: int = 1234
    fail: bool = False
    requests: list[costs_pb2.RecordUsageRequest] = field(default_factory=list)

    async def record_usage(
        self, request: costs_pb2.RecordUsageRequest
    ) -> costs_pb2.RecordUsageResponse:
        self.requests.append(request)
        if self.fail:
            raise Unavailable("costs is down")
        return costs_pb2.RecordUsageResponse(cost_nano_usd=self.cost)


MakeOutbox = Callable[[Sender], Awaitable[UsageOutbox]]


@pytest.fixture(autouse=True)
def _outbox_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Planners built from settings keep their outbox here, not in the checkout's .trellis/."""
    monkeypatch.setenv("TRELLIS_OUTBOX_PATH", str(tmp_path / "planner-outbox.db"))


@pytest.fixture
async def make_outbox(tmp_path: Path) -> AsyncIterator[MakeOutbox]:
    """``await make_outbox(sender)``: a usage outbox in its own file, closed after the test."""
    made: list[UsageOutbox] = []

    async def make(sender: Sender) -> UsageOutbox:
        outbox = await UsageOutbox.open(tmp_path / f"outbox-{len(made)}.db", sender)
        made.append(outbox)
        return outbox

    yield make
    for outbox in made:
        await outbox.aclose()


@pytest.fixture
def tools() -> list[common_pb2.ToolSpec]:
    return make_tools()


@pytest.fixture
def recorder() -> FakeRecorder:
    return FakeRecorder()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def chat_model(model: RunningModel, spans: InMemorySpanExporter) -> AsyncIterator[ChatModel]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=2)
    chat = ChatModel(client, provider.get_tracer("test"), timeout=10.0)
    yield chat
    await chat.aclose()


@pytest.fixture
async def planner(chat_model: ChatModel, recorder: FakeRecorder, make_outbox) -> Planner:
    outbox = await make_outbox(recorder.record_usage)
    return Planner(chat_model, outbox, default_model="trellis-offline-rules-v1", max_nodes=50)
