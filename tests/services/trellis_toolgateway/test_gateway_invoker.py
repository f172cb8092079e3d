"""The invoker core without gRPC: contracts, caching (tenants, modes, fail-open),
timeouts, failures, output contracts, spans and metrics."""

import asyncio
import sys
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from tests.support.fake_cache import FakeCache
from tests.support.gateway_registries import builtin_registry
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value, timestamp_seconds, to_struct
from trellis.runtime.errors import InvalidArgument, NotFound, Unavailable
from trellis_toolgateway.cache_keys import arg_tag, cache_key
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
Mode = common_pb2.CacheMode


class DownCache:
    async def get(self, key: str) -> bytes | None:
        raise Unavailable("cache is down")

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        raise Unavailable("cache is down")


class Counted:
    """A cacheable tool that counts its runs."""

    def __init__(self, *, cache_ttl: float = 60, side_effects: bool = False) -> None:
        self.runs = 0
        self.tool = FunctionTool(
            Spec(
                name="counted",
                description="counts",
                input_schema={"type": "object"},
                output_schema={"type": "object"},
                cache_ttl=cache_ttl,
                side_effects=side_effects,
            ),
            self._run,
        )

    async def _run(self, args: dict) -> dict:
        self.runs += 1
        return {"run": self.runs, "args": args}


def slow_tool(seconds: float, *, timeout: float) -> FunctionTool:
    async def run(args: dict) -> dict:
        await asyncio.sleep(seconds)
        return {}

    spec = Spec("slow", "sleeps", {"type": "object"}, {"type": "object"}, timeout=timeout)
    return FunctionTool(spec, run)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(spans: InMemorySpanExporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test")


def make(tracer, *tools, cache=None) -> Invoker:
    registry = ToolRegistry(list(tools)) if tools else builtin_registry()
    return Invoker(registry, cache, tracer)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_succeeded_outcome_fields(tracer) -> None:
    before = time.time()
    outcome = await make(tracer).invoke(Call("arithmetic", {"expression": "2 + 3"}, node_id="n1"))
    assert outcome.status == SUCCEEDED
    assert from_value(outcome.output) == {"result": 5}
    assert (outcome.node_id, outcome.attempts, outcome.cache_hit) == ("n1", 1, False)
    started = timestamp_seconds(outcome.started_at)
    finished = timestamp_seconds(outcome.finished_at)
    assert before - 1 <= started <= finished <= time.time() + 1
    assert not outcome.HasField("error")


async def test_accepts_the_proto_tool_call(tracer) -> None:
    call = common_pb2.ToolCall(node_id="n2", tool="echo", args=to_struct({"value": [1, "a"]}))
    outcome = await make(tracer).invoke(call)
    assert (outcome.node_id, from_value(outcome.output)) == ("n2", [1, "a"])


async def test_unknown_tool_is_not_found(tracer) -> None:
    with pytest.raises(NotFound) as raised:
        await make(tracer).invoke(Call("nope", {}))
    assert raised.value.reason == "UNKNOWN_TOOL"
    assert raised.value.metadata == {"tool": "nope"}


@pytest.mark.parametrize(
    ("tool", "args", "violations"),
    [
        ("arithmetic", {}, [("args.expression", "'expression' is a required property")]),
        ("arithmetic", {"expression": 5}, [("args.expression", "5 is not of type 'string'")]),
        ("sleep", {"ms": -1}, [("args.ms", "-1 is less than the minimum of 0")]),
        ("sleep", {"ms": 1.5}, [("args.ms", "1.5 is not of type 'integer'")]),
        (
            "arithmetic",
            {"expression": "1", "extra": True},
            [("args", "Additional properties are not allowed ('extra' was unexpected)")],
        ),
        (
            "sleep",
            {"ms": "x", "y": 1},
            [
                ("args", "Additional properties are not allowed ('y' was unexpected)"),
                ("args.ms", "'x' is not of type 'integer'"),
            ],
        ),
    ],
)
async def test_args_are_checked_against_the_input_schema(tracer, tool, args, violations) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await make(tracer).invoke(Call(tool, args))
    assert raised.value.reason == "ARGS_INVALID"
    assert [(v.field, v.description) for v in raised.value.violations] == violations


async def test_tool_contract_errors_are_raised_not_outcomes(tracer) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await make(tracer).invoke(Call("run_command", {"command": "uname; id"}))
    assert raised.value.reason == "SHELL_SYNTAX_REJECTED"


async def test_second_identical_call_is_a_cache_hit(tracer) -> None:
    counted, cache = Counted(cache_ttl=60), FakeCache()
    invoker = make(tracer, counted.tool, cache=cache)
    first = await invoker.invoke(Call("counted", {"a": 1, "b": [1, 2]}, node_id="n1"))
    second = await invoker.invoke(Call("counted", {"b": [1, 2], "a": 1}, node_id="n2"))
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert counted.runs == 1
    assert from_value(second.output) == from_value(first.output)
    assert second.node_id == "n2" and second.status == SUCCEEDED
    [(key, ttl, tags)] = cache.sets
    assert key == cache_key("default", "counted", "1", {"a": 1, "b": [1, 2]})
    assert (ttl, tags[:2]) == (60, ["tool:counted", "tenant:default"])
    # and one tag per argument value, for invalidation by argument
    assert sorted(tags[2:]) == sorted([arg_tag("counted", "a", 1), arg_tag("counted", "b", [1, 2])])


async def test_tenants_never_share_results(tracer) -> None:
    counted, cache = Counted(), FakeCache()
    invoker = make(tracer, counted.tool, cache=cache)
    hits = []
    for tenant in ("acme", "globex", "acme"):
        with context.request_scope(tenant_id=tenant):
            hits.append((await invoker.invoke(Call("counted", {"q": 1}))).cache_hit)
    assert hits == [False, False, True]
    assert counted.runs == 2
    assert [tags[1] for _, _, tags in cache.sets] == ["tenant:acme", "tenant:globex"]


async def test_cache_modes(tracer) -> None:
    counted, cache = Counted(), FakeCache()
    invoker = make(tracer, counted.tool, cache=cache)
    call = Call("counted", {"q": 1})
    assert not (await invoker.invoke(call, cache_mode=Mode.CACHE_MODE_BYPASS)).cache_hit
    assert (cache.gets, cache.sets) == ([], [])
    assert not (await invoker.invoke(call, cache_mode=Mode.CACHE_MODE_REFRESH)).cache_hit
    assert cache.gets == [] and len(cache.sets) == 1  # written, not read
    assert (await invoker.invoke(call, cache_mode=Mode.CACHE_MODE_USE)).cache_hit
    assert counted.runs == 2


@pytest.mark.parametrize(
    "counted", [Counted(cache_ttl=0), Counted(cache_ttl=60, side_effects=True)], ids=str
)
async def test_uncacheable_tools_never_touch_the_cache(tracer, counted: Counted) -> None:
    cache = FakeCache()
    invoker = make(tracer, counted.tool, cache=cache)
    before = sample("trellis_tool_calls_total", tool="counted", outcome="succeeded", cache="bypass")
    for _ in range(2):
        assert not (await invoker.invoke(Call("counted", {}))).cache_hit
    assert (cache.gets, cache.sets, counted.runs) == ([], [], 2)
    after = sample("trellis_tool_calls_total", tool="counted", outcome="succeeded", cache="bypass")
    assert after - before == 2


async def test_failed_outcomes_are_not_cached(tracer) -> None:
    cache = FakeCache()
    invoker = make(tracer, cache=cache)
    outcome = await invoker.invoke(Call("arithmetic", {"expression": "1 / 0"}))
    assert outcome.status == FAILED
    assert (outcome.error.code, outcome.error.retryable) == ("ARITHMETIC_ERROR", False)
    assert outcome.error.message == "division by zero"
    assert len(cache.gets) == 1 and cache.sets == []


async def test_run_command_is_cached_for_its_own_ttl(tracer) -> None:
    async def launcher(*argv: str, **kwargs) -> asyncio.subprocess.Process:
        program = [sys.executable, "-c", "print('fake output')"]
        return await asyncio.create_subprocess_exec(*program, **kwargs | {"env": None})

    cache = FakeCache()
    invoker = Invoker(builtin_registry(launcher=launcher), cache, tracer)
    for command in ("uptime", "uname -a", "df -h"):
        outcome = await invoker.invoke(Call("run_command", {"command": command}))
        assert from_value(outcome.output)["stdout"] == "fake output\n"
    assert [ttl for _, ttl, _ in cache.sets] == [5, 3600, 300]


async def test_cache_failure_is_fail_open(tracer, spans) -> None:
    counted = Counted()
    invoker = make(tracer, counted.tool, cache=DownCache())
    before = sample("trellis_cache_requests_total", result="error")
    outcomes = [await invoker.invoke(Call("counted", {"q": 1})) for _ in range(2)]
    refreshed = await invoker.invoke(Call("counted", {"q": 1}), cache_mode=Mode.CACHE_MODE_REFRESH)
    assert [(o.status, o.cache_hit) for o in [*outcomes, refreshed]] == [(SUCCEEDED, False)] * 3
    assert counted.runs == 3
    # A failed read skips the write of the same call; REFRESH only writes.
    assert sample("trellis_cache_requests_total", result="error") - before == 3
    events = [e for s in spans.get_finished_spans() for e in s.events]
    assert [e.attributes["trellis.cache.operation"] for e in events] == ["get", "get", "set"]
    assert all(e.attributes["error.type"] == "UNAVAILABLE" for e in events)


async def test_corrupt_cache_entry_is_a_miss(tracer) -> None:
    counted, cache = Counted(), FakeCache()
    invoker = make(tracer, counted.tool, cache=cache)
    await invoker.invoke(Call("counted", {}))
    [key] = cache.data
    cache.data[key] = b"\xff\xff not a Value"
    outcome = await invoker.invoke(Call("counted", {}))
    assert (outcome.status, outcome.cache_hit, counted.runs) == (SUCCEEDED, False, 2)


async def test_tool_timeout_is_a_retryable_failure(tracer) -> None:
    invoker = make(tracer, slow_tool(5, timeout=0.05))
    start = time.perf_counter()
    outcome = await invoker.invoke(Call("slow", {}))
    assert time.perf_counter() - start < 1
    assert (outcome.status, outcome.error.code, outcome.error.retryable) == (
        FAILED,
        "TOOL_TIMEOUT",
        True,
    )


async def test_caller_deadline_shortens_the_tool_timeout(tracer) -> None:
    invoker = make(tracer, slow_tool(5, timeout=30))
    start = time.perf_counter()
    with context.request_scope(timeout=0.05):
        outcome = await invoker.invoke(Call("slow", {}))
    assert time.perf_counter() - start < 1
    # the caller's deadline cut it, not the tool's own timeout: the caller's code
    assert (outcome.error.code, outcome.error.retryable) == ("DEADLINE_EXCEEDED", False)


async def test_sleep_within_its_timeout_succeeds(tracer) -> None:
    outcome = await make(tracer).invoke(Call("sleep", {"ms": 20}))
    assert from_value(outcome.output) == {"slept_ms": 20}


async def test_crashing_tool_is_tool_failed(tracer) -> None:
    async def boom(args: dict) -> dict:
        raise RuntimeError("kaput")

    spec = Spec("boom", "fails", {"type": "object"}, {"type": "object"})
    before = sample("trellis_tool_calls_total", tool="boom", outcome="failed", cache="bypass")
    outcome = await make(tracer, FunctionTool(spec, boom)).invoke(Call("boom", {}))
    assert (outcome.status, outcome.error.code) == (FAILED, "TOOL_FAILED")
    assert "kaput" in outcome.error.message
    assert sample("trellis_tool_calls_total", tool="boom", outcome="failed", cache="bypass") == (
        before + 1
    )


async def test_output_breaking_its_schema_fails(tracer) -> None:
    async def wrong(args: dict) -> dict:
        return {"result": "not a number"}

    spec = Spec(
        "wrong",
        "lies",
        {"type": "object"},
        {
            "type": "object",
            "properties": {"result": {"type": "number"}},
        },
    )
    outcome = await make(tracer, FunctionTool(spec, wrong)).invoke(Call("wrong", {}))
    assert (outcome.status, outcome.error.code) == (FAILED, "OUTPUT_CONTRACT")


async def test_one_span_per_call_with_genai_attributes(tracer, spans) -> None:
    invoker = make(tracer, cache=FakeCache())
    with context.request_scope(tenant_id="acme"):
        await invoker.invoke(Call("arithmetic", {"expression": "1+1"}, node_id="n7"), run_id="r1")
        await invoker.invoke(Call("arithmetic", {"expression": "1+1"}, node_id="n8"), run_id="r1")
        await invoker.invoke(Call("arithmetic", {"expression": "1/0"}, node_id="n9"), run_id="r1")
    first, second, failed = spans.get_finished_spans()
    assert first.name == "execute_tool arithmetic"
    assert first.kind == SpanKind.INTERNAL
    assert dict(first.attributes) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "arithmetic",
        "gen_ai.tool.call.id": "n7",
        "trellis.run_id": "r1",
        "trellis.node_id": "n7",
        "trellis.tenant_id": "acme",
        "trellis.cache_hit": False,
        "trellis.tool.attempts": 1,
        "trellis.breaker.state": "closed",
    }
    assert second.attributes["trellis.cache_hit"] is True
    assert second.attributes["trellis.tool.attempts"] == 0
    assert first.status.status_code != StatusCode.ERROR
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "ARITHMETIC_ERROR"


async def test_metrics_count_calls_by_outcome_and_cache_use(tracer) -> None:
    invoker = make(tracer, cache=FakeCache())
    labels = {"tool": "arithmetic", "outcome": "succeeded"}
    hits = sample("trellis_tool_calls_total", **labels, cache="hit")
    misses = sample("trellis_tool_calls_total", **labels, cache="miss")
    observed = sample("trellis_tool_duration_seconds_count", tool="arithmetic")
    for _ in range(3):
        await invoker.invoke(Call("arithmetic", {"expression": "40 + 2"}))
    assert sample("trellis_tool_calls_total", **labels, cache="miss") - misses == 1
    assert sample("trellis_tool_calls_total", **labels, cache="hit") - hits == 2
    assert sample("trellis_tool_duration_seconds_count", tool="arithmetic") - observed == 3


def costly(*, cost: int, cache_ttl: float = 60, shared_cache: bool = False) -> Counted:
    counted = Counted(cache_ttl=cache_ttl)
    spec = counted.tool.spec
    counted.tool = FunctionTool(
        Spec(
            spec.name,
            spec.description,
            spec.input_schema,
            spec.output_schema,
            cache_ttl=cache_ttl,
            cost_nano_usd=cost,
            shared_cache=shared_cache,
        ),
        counted.tool.fn,
    )
    return counted


async def test_cost_is_charged_when_the_backend_runs_not_for_hits(tracer) -> None:
    counted = costly(cost=2_500)
    invoker = make(tracer, counted.tool, cache=FakeCache())
    first = await invoker.invoke(Call("counted", {"q": 1}))
    hit = await invoker.invoke(Call("counted", {"q": 1}))
    bypass = await invoker.invoke(Call("counted", {"q": 1}), cache_mode=Mode.CACHE_MODE_BYPASS)
    assert [(o.cost_nano_usd, o.attempts, o.cache_hit) for o in (first, hit, bypass)] == [
        (2_500, 1, False),
        (0, 0, True),
        (2_500, 1, False),
    ]


async def test_shared_cache_tools_share_results_across_tenants(tracer) -> None:
    shared, private, cache = costly(cost=0, shared_cache=True), Counted(), FakeCache()
    hits = []
    for counted in (shared, private):
        invoker = make(tracer, counted.tool, cache=cache)
        for tenant in ("acme", "globex"):
            with context.request_scope(tenant_id=tenant):
                hits.append((await invoker.invoke(Call("counted", {"q": 1}))).cache_hit)
    assert hits == [False, True, False, False]
    assert (shared.runs, private.runs) == (1, 2)
    assert cache.sets[0][2][:2] == ["tool:counted", "tenant:*shared*"]


def test_cache_keys_are_tenant_scoped_unless_shared() -> None:
    args = {"a": 1, "b": [1, 2]}
    acme = cache_key("acme", "t", "1", args)
    assert acme == cache_key("acme", "t", "1", {"b": [1, 2], "a": 1})  # canonical JSON
    assert len(acme) == 64 and int(acme, 16) >= 0
    assert acme != cache_key("globex", "t", "1", args)
    assert acme != cache_key("acme", "t", "2", args)  # a new version never serves old results
    assert acme != cache_key("acme", "u", "1", args)
    shared = cache_key("acme", "t", "1", args, shared=True)
    assert shared == cache_key("globex", "t", "1", args, shared=True)
    assert shared not in {acme, cache_key("", "t", "1", args), cache_key("null", "t", "1", args)}
