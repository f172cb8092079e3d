"""Retries: only retryable backend failures, at most ``spec.retries`` more attempts,
exponential backoff with full jitter, never past the caller's deadline."""

import asyncio
import random
import time

import pytest
from opentelemetry.trace import NoOpTracer

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.errors import InvalidArgument, Unavailable
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.breaker import BreakerConfig
from trellis_toolgateway.policy.retry import Backoff
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


# -- backoff alone ---------------------------------------------------------------------


def test_backoff_cap_grows_exponentially_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.1, multiplier=2, maximum=1.0)
    assert [backoff.cap(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.cap(10_000) == 1.0  # no overflow


def test_backoff_is_full_jitter_between_zero_and_the_cap() -> None:
    backoff, rng = Backoff(initial=0.1, multiplier=2, maximum=1.0), random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(2000)]
    assert all(0 <= d <= 0.4 for d in delays)
    assert min(delays) < 0.02 and max(delays) > 0.38  # spread over the whole range
    assert 0.18 < sum(delays) / len(delays) < 0.22


# -- inside the invoker ----------------------------------------------------------------


class Script:
    """A tool that raises the scripted errors in turn, then succeeds."""

    def __init__(self, errors: list[Exception], **spec: object) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.tool = FunctionTool(
            Spec("scripted", "fails as told", {"type": "object"}, {"type": "object"}, **spec),  # type: ignore[arg-type]
            self._run,
        )

    async def _run(self, args: dict) -> dict:
        self.calls += 1
        if self.errors:
            error = self.errors.pop(0)
            if isinstance(error, TimeoutError):
                await asyncio.sleep(10)  # hang: the invoker's timeout fires
            raise error
        return {"calls": self.calls}


class Sleeps:
    """A fake ``sleep`` that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def retryable(code: str = "UPSTREAM_503") -> ToolError:
    return ToolError(code, "try again", retryable=True)


def invoker_for(script: Script, sleeps: Sleeps | None = None, **kwargs) -> Invoker:
    return Invoker(
        ToolRegistry([script.tool]),
        None,
        NoOpTracer(),
        backoff=kwargs.pop("backoff", Backoff(initial=0.1, multiplier=2, maximum=1)),
        sleep=sleeps or Sleeps(),
        rng=random.Random(1),
        breaker=BreakerConfig(consecutive_failures=100, min_calls=20),
        **kwargs,
    )


async def test_retryable_failures_are_retried_until_success() -> None:
    script, sleeps = Script([retryable(), retryable()], retries=3, cost_nano_usd=10), Sleeps()
    outcome = await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (outcome.status, outcome.attempts, script.calls) == (SUCCEEDED, 3, 3)
    assert outcome.cost_nano_usd == 30  # every attempt reached the paid backend
    assert len(sleeps.delays) == 2
    assert 0 <= sleeps.delays[0] <= 0.1 and 0 <= sleeps.delays[1] <= 0.2


async def test_retries_stop_after_spec_retries() -> None:
    script, sleeps = (
        Script([retryable("A"), retryable("B"), retryable("C"), retryable("D")], retries=2),
        Sleeps(),
    )
    outcome = await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (outcome.status, outcome.attempts, script.calls) == (FAILED, 3, 3)
    assert (outcome.error.code, outcome.error.retryable) == ("C", True)  # the last failure
    assert len(sleeps.delays) == 2


async def test_no_retries_by_default() -> None:
    script, sleeps = Script([retryable()]), Sleeps()
    outcome = await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (outcome.status, outcome.attempts, script.calls, sleeps.delays) == (FAILED, 1, 1, [])


@pytest.mark.parametrize(
    "error",
    [
        ToolError("ARITHMETIC_ERROR", "division by zero"),
        RuntimeError("a crash is not retryable"),
    ],
    ids=["non-retryable", "crash"],
)
async def test_non_retryable_failures_run_once(error: Exception) -> None:
    script, sleeps = Script([error], retries=5), Sleeps()
    outcome = await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (outcome.status, outcome.attempts, script.calls, sleeps.delays) == (FAILED, 1, 1, [])


async def test_contract_violations_are_never_retried() -> None:
    script, sleeps = Script([InvalidArgument("no", reason="BAD")], retries=5), Sleeps()
    with pytest.raises(InvalidArgument):
        await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (script.calls, sleeps.delays) == (1, [])


async def test_output_contract_failures_are_not_retried() -> None:
    async def wrong(args: dict) -> list:
        wrong.calls += 1  # type: ignore[attr-defined]
        return []

    wrong.calls = 0  # type: ignore[attr-defined]
    spec = Spec("wrong", "", {"type": "object"}, {"type": "object"}, retries=3)
    invoker = Invoker(ToolRegistry([FunctionTool(spec, wrong)]), None, NoOpTracer(), sleep=Sleeps())
    outcome = await invoker.invoke(Call("wrong", {}))
    assert (outcome.error.code, outcome.attempts, wrong.calls) == ("OUTPUT_CONTRACT", 1, 1)  # type: ignore[attr-defined]


async def test_timeouts_and_unavailable_backends_are_retried() -> None:
    errors = [TimeoutError(), Unavailable("connection refused")]
    script, sleeps = Script(errors, retries=2, timeout=0.02), Sleeps()
    outcome = await invoker_for(script, sleeps).invoke(Call("scripted", {}))
    assert (outcome.status, outcome.attempts, script.calls) == (SUCCEEDED, 3, 3)


async def test_retries_never_go_beyond_the_deadline() -> None:
    script = Script([retryable()] * 1000, retries=1000)
    # Real sleeps, a fixed 40 ms delay (jitter off via the rng), a 250 ms deadline.
    invoker = Invoker(
        ToolRegistry([script.tool]),
        None,
        NoOpTracer(),
        backoff=Backoff(initial=0.04, multiplier=1, maximum=0.04),
        rng=MaxRandom(),
        breaker=BreakerConfig(consecutive_failures=10_000, min_calls=20, failure_rate=1.0),
    )
    start = time.monotonic()
    with context.request_scope(timeout=0.25):
        outcome = await invoker.invoke(Call("scripted", {}))
    elapsed = time.monotonic() - start
    assert elapsed < 0.25  # gave up before the deadline instead of sleeping past it
    assert 4 <= outcome.attempts <= 7 and script.calls == outcome.attempts
    assert outcome.status == FAILED and outcome.error.code == "UPSTREAM_503"


async def test_an_opening_breaker_stops_the_retries() -> None:
    script, sleeps = Script([retryable()] * 10, retries=9), Sleeps()
    invoker = Invoker(
        ToolRegistry([script.tool]),
        None,
        NoOpTracer(),
        sleep=sleeps,
        breaker=BreakerConfig(consecutive_failures=3),
    )
    outcome = await invoker.invoke(Call("scripted", {}))
    assert (outcome.attempts, script.calls, outcome.error.code) == (3, 3, "UPSTREAM_503")
    again = await invoker.invoke(Call("scripted", {}))
    assert (again.error.code, again.attempts, script.calls) == ("CIRCUIT_OPEN", 0, 3)


class MaxRandom(random.Random):
    """Jitter off: always the cap."""

    def uniform(self, a: float, b: float) -> float:
        return b
