"""The per-tool circuit breaker, alone and inside the invoker: opens on consecutive
failures or failure rate, fails fast without calling the backend, lets exactly one
probe through after the cool-down, closes on its success, and ignores contract
violations."""

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer
from prometheus_client import REGISTRY

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.errors import InvalidArgument, NotFound
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Verdict,
)
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
S, F, N = Verdict.SUCCESS, Verdict.FAILURE, Verdict.IGNORED  # N: says nothing


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(breaker: CircuitBreaker, verdicts: list[Verdict]) -> None:
    for verdict in verdicts:
        permit = breaker.acquire()
        assert permit is not None, "the breaker refused a call while closed"
        breaker.record(permit, verdict)


# -- the breaker alone -----------------------------------------------------------------


def test_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=5), clock=FakeClock())
    feed(breaker, [F, F, F, F])
    assert breaker.state is BreakerState.CLOSED
    feed(breaker, [F])
    assert breaker.state is BreakerState.OPEN
    assert breaker.acquire() is None and not breaker.allows()


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=3, min_calls=10))
    feed(breaker, [F, F, S, F, F, S, F, F])
    assert breaker.state is BreakerState.CLOSED


def test_opens_on_failure_rate_over_the_window() -> None:
    config = BreakerConfig(consecutive_failures=5, window=20, min_calls=10, failure_rate=0.5)
    breaker = CircuitBreaker(config)
    feed(breaker, [S, F] * 4 + [S])  # 9 calls, 4 failures: too few calls to judge
    assert breaker.state is BreakerState.CLOSED
    feed(breaker, [F])  # 10 calls, 5 failures, never more than 1 in a row
    assert breaker.state is BreakerState.OPEN


def test_a_failure_rate_below_the_threshold_stays_closed() -> None:
    breaker = CircuitBreaker(BreakerConfig(window=20, min_calls=10, failure_rate=0.5))
    feed(breaker, [S, S, F, S, F, S, S, F, S, F, S, S] * 3)  # 4/12 fail
    assert breaker.state is BreakerState.CLOSED


def test_the_window_only_remembers_the_last_calls() -> None:
    breaker = CircuitBreaker(BreakerConfig(window=10, min_calls=10, consecutive_failures=99))
    feed(breaker, [F, S] * 2 + [S] * 10)  # the early failures slide out
    feed(breaker, [F, S, F, S])  # 2 of the last 10
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through_then_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[tuple[str, BreakerState]] = []
    breaker = CircuitBreaker(
        BreakerConfig(consecutive_failures=2, cooldown=30),
        name="t",
        clock=clock,
        on_change=lambda name, state: changes.append((name, state)),
    )
    feed(breaker, [F, F])
    clock.now += 29.9
    assert breaker.state is BreakerState.OPEN and breaker.acquire() is None
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows()
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    assert breaker.acquire() is None and not breaker.allows()  # one probe at a time
    breaker.record(probe, S)
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        ("t", BreakerState.OPEN),
        ("t", BreakerState.HALF_OPEN),
        ("t", BreakerState.CLOSED),
    ]
    feed(breaker, [F])  # counts start afresh after closing
    assert breaker.state is BreakerState.CLOSED


def test_a_failed_probe_reopens_for_a_fresh_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, cooldown=10), clock=clock)
    feed(breaker, [F])
    clock.now += 10
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, F)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(10)
    clock.now += 5
    assert breaker.acquire() is None


def test_an_ignored_probe_frees_the_probe_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, cooldown=1), clock=clock)
    feed(breaker, [F])
    clock.now += 1
    probe = breaker.acquire()
    assert probe is not None
    breaker.record(probe, N)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire() is not None


def test_ignored_results_never_count() -> None:
    breaker = CircuitBreaker(
        BreakerConfig(consecutive_failures=2, min_calls=2, window=2, failure_rate=1.0)
    )
    feed(breaker, [F, N, N, N, S, N, F, N, N])
    assert breaker.state is BreakerState.CLOSED


def test_a_late_success_from_before_opening_does_not_close_it() -> None:
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1), clock=FakeClock())
    slow = breaker.acquire()
    assert slow is not None
    feed(breaker, [F])
    assert breaker.state is BreakerState.OPEN
    breaker.record(slow, S)
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    "config",
    [
        {"consecutive_failures": 0},
        {"min_calls": 30, "window": 20},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"cooldown": -1},
    ],
)
def test_bad_config_is_rejected(config) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**config)


# -- inside the invoker ----------------------------------------------------------------


class Backend:
    """A tool whose behaviour the test switches; counts the calls that reached it."""

    def __init__(self, **spec: object) -> None:
        self.calls = 0
        self.fail: Exception | None = ToolError(
            "UPSTREAM_DOWN", "502 from upstream", retryable=True
        )
        self.output: object = {"ok": True}
        self.gate: asyncio.Event | None = None
        self.tool = FunctionTool(
            Spec(
                "flaky",
                "a backend that can fail",
                {"type": "object", "properties": {"n": {"type": "integer"}}},
                {"type": "object"},
                **spec,  # type: ignore[arg-type]
            ),
            self._run,
        )

    async def _run(self, args: dict) -> object:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.output


def gauge(tool: str) -> float | None:
    return REGISTRY.get_sample_value("trellis_tool_breaker_state", {"tool": tool})


def make(backend: Backend, clock: FakeClock, tracer=None, **config: float) -> Invoker:
    breaker = BreakerConfig(**{"consecutive_failures": 5, "cooldown": 30, **config})  # type: ignore[arg-type]
    return Invoker(
        ToolRegistry([backend.tool]), None, tracer or NoOpTracer(), breaker=breaker, clock=clock
    )


async def test_open_breaker_fails_fast_without_calling_the_backend() -> None:
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock)
    codes = [(await invoker.invoke(Call("flaky", {}))).error.code for _ in range(5)]
    assert codes == ["UPSTREAM_DOWN"] * 5 and backend.calls == 5
    outcome = await invoker.invoke(Call("flaky", {}, node_id="n6"))
    assert backend.calls == 5  # not called
    assert (outcome.status, outcome.error.code, outcome.error.retryable) == (
        FAILED,
        "CIRCUIT_OPEN",
        True,
    )
    assert (outcome.node_id, outcome.attempts, outcome.cost_nano_usd) == ("n6", 0, 0)
    assert dict(outcome.error.details) == {"tool": "flaky", "retry_after_seconds": "30.000"}
    assert invoker.breaker("flaky").state is BreakerState.OPEN
    assert gauge("flaky") == 2  # trellis_tool_breaker_state: 2 = open


async def test_after_the_cooldown_a_probe_runs_and_success_closes_it() -> None:
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock, consecutive_failures=2, cooldown=30)
    for _ in range(2):
        await invoker.invoke(Call("flaky", {}))
    clock.now += 29
    assert (await invoker.invoke(Call("flaky", {}))).error.code == "CIRCUIT_OPEN"
    clock.now += 1
    backend.fail = None
    probe = await invoker.invoke(Call("flaky", {}))
    assert (probe.status, probe.attempts, backend.calls) == (SUCCEEDED, 1, 3)
    assert invoker.breaker("flaky").state is BreakerState.CLOSED
    assert gauge("flaky") == 0
    for _ in range(3):
        assert (await invoker.invoke(Call("flaky", {}))).status == SUCCEEDED
    assert backend.calls == 6


async def test_half_open_admits_one_probe_among_concurrent_calls() -> None:
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock, consecutive_failures=1, cooldown=5)
    await invoker.invoke(Call("flaky", {}))
    clock.now += 5
    backend.fail, backend.gate = None, asyncio.Event()
    probe = asyncio.create_task(invoker.invoke(Call("flaky", {}, node_id="probe")))
    await asyncio.sleep(0.01)
    assert invoker.breaker("flaky").state is BreakerState.HALF_OPEN
    others = await asyncio.gather(*(invoker.invoke(Call("flaky", {"n": i})) for i in range(10)))
    assert {o.error.code for o in others} == {"CIRCUIT_OPEN"}
    backend.gate.set()
    assert (await probe).status == SUCCEEDED
    assert backend.calls == 2  # the failure that opened it, and the probe
    assert invoker.breaker("flaky").state is BreakerState.CLOSED


async def test_a_failed_probe_reopens_the_circuit() -> None:
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock, consecutive_failures=1, cooldown=5)
    await invoker.invoke(Call("flaky", {}))
    clock.now += 5
    probe = await invoker.invoke(Call("flaky", {}))
    assert (probe.error.code, backend.calls) == ("UPSTREAM_DOWN", 2)
    assert (await invoker.invoke(Call("flaky", {}))).error.code == "CIRCUIT_OPEN"
    assert backend.calls == 2
    clock.now += 5
    backend.fail = None
    assert (await invoker.invoke(Call("flaky", {}))).status == SUCCEEDED


async def test_contract_violations_never_trip_the_breaker() -> None:
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock, consecutive_failures=2, min_calls=2, window=2)
    for _ in range(5):
        with pytest.raises(InvalidArgument):  # arguments break the input schema
            await invoker.invoke(Call("flaky", {"n": "not an integer"}))
        with pytest.raises(NotFound):
            await invoker.invoke(Call("nope", {}))
    backend.fail = InvalidArgument("bad path", reason="PATH_OUTSIDE_SANDBOX")
    for _ in range(5):  # the tool itself rejects the call as a contract violation
        with pytest.raises(InvalidArgument):
            await invoker.invoke(Call("flaky", {}))
    backend.fail, backend.output = None, ["not", "an", "object"]
    for _ in range(5):  # the output breaks the output schema
        assert (await invoker.invoke(Call("flaky", {}))).error.code == "OUTPUT_CONTRACT"
    assert invoker.breaker("flaky").state is BreakerState.CLOSED
    assert backend.calls == 10
    backend.output = {"ok": True}
    assert (await invoker.invoke(Call("flaky", {}))).status == SUCCEEDED


async def test_deliberate_tool_errors_do_not_trip_it_but_crashes_and_timeouts_do() -> None:
    backend, clock = Backend(timeout=0.01), FakeClock()
    invoker = make(backend, clock, consecutive_failures=3)
    backend.fail = ToolError("ARITHMETIC_ERROR", "division by zero")  # not retryable
    for _ in range(5):
        await invoker.invoke(Call("flaky", {}))
    assert invoker.breaker("flaky").state is BreakerState.CLOSED
    backend.fail = RuntimeError("kaput")
    await invoker.invoke(Call("flaky", {}))
    backend.fail, backend.gate = None, asyncio.Event()  # hangs past its timeout
    codes = [(await invoker.invoke(Call("flaky", {}))).error.code for _ in range(2)]
    assert codes == ["TOOL_TIMEOUT", "TOOL_TIMEOUT"]
    assert invoker.breaker("flaky").state is BreakerState.OPEN


async def test_timeouts_caused_by_the_callers_deadline_do_not_trip_it() -> None:
    backend, clock = Backend(timeout=10), FakeClock()
    backend.fail, backend.gate = None, asyncio.Event()
    invoker = make(backend, clock, consecutive_failures=2)
    for _ in range(3):
        with context.request_scope(timeout=0.01):
            outcome = await invoker.invoke(Call("flaky", {}))
            assert outcome.error.code == "DEADLINE_EXCEEDED"
    assert invoker.breaker("flaky").state is BreakerState.CLOSED


async def test_breaker_state_is_a_span_attribute() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    backend, clock = Backend(), FakeClock()
    invoker = make(backend, clock, provider.get_tracer("test"), consecutive_failures=1)
    await invoker.invoke(Call("flaky", {}))
    await invoker.invoke(Call("flaky", {}))
    first, second = spans.get_finished_spans()
    assert first.attributes["trellis.breaker.state"] == "open"  # this call opened it
    assert second.attributes["trellis.breaker.state"] == "open"
    assert second.attributes["error.type"] == "CIRCUIT_OPEN"


async def test_breakers_are_per_tool() -> None:
    backend, clock = Backend(), FakeClock()
    other = FunctionTool(
        Spec("other", "fine", {"type": "object"}, {"type": "object"}),
        lambda args: asyncio.sleep(0, {"fine": True}),
    )
    invoker = Invoker(
        ToolRegistry([backend.tool, other]),
        None,
        NoOpTracer(),
        breaker=BreakerConfig(consecutive_failures=1),
        clock=clock,
    )
    await invoker.invoke(Call("flaky", {}))
    assert (await invoker.invoke(Call("flaky", {}))).error.code == "CIRCUIT_OPEN"
    assert (await invoker.invoke(Call("other", {}))).status == SUCCEEDED


async def test_an_open_circuit_fails_fast_instead_of_queueing() -> None:
    backend, clock = Backend(max_concurrency=1), FakeClock()
    backend.fail, backend.gate = None, asyncio.Event()
    invoker = Invoker(
        ToolRegistry([backend.tool]), None, NoOpTracer(), queue_per_slot=0, clock=clock
    )
    holder = asyncio.create_task(invoker.invoke(Call("flaky", {})))  # takes the one slot
    await asyncio.sleep(0.01)
    feed(invoker.breaker("flaky"), [F] * 5)  # other replicas' view, say: it is failing
    outcome = await invoker.invoke(Call("flaky", {}))
    assert outcome.error.code == "CIRCUIT_OPEN"  # not TOOL_BUSY, and no wait for the slot
    backend.gate.set()
    assert (await holder).status == SUCCEEDED
