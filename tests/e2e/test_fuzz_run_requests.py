"""200 hostile RunRequests against the real stack (embedded, runs in PostgreSQL): random
text with control characters and NUL, path-like and over-long ids, huge numbers, deep
and large args, absurd options, and raw bytes that are no RunRequest at all (sent on a
channel method without a serializer). Every call ends OK or INVALID_ARGUMENT with a
stable reason - never INTERNAL, UNKNOWN or a run that failed INTERNAL - and every
service is SERVING afterwards.

The seed is fixed, so CI always sends the same 200 requests; ``TRELLIS_FUZZ_SEED=<n>``
explores others (a failure message names the seed and the request's index).
"""

from __future__ import annotations

import math
import os
import random
import string
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.malformed import deep_struct, field
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import from_rpc_error
from trellis.runtime.validation import MAX_ARGS_DEPTH
from trellis_cli.stack import Stack, start_stack

SEED = int(os.environ.get("TRELLIS_FUZZ_SEED", "14"))
REQUESTS = 200
RUN = "/trellis.executor.v1.ExecutorService/Run"
#: Every reason an INVALID_ARGUMENT of Run may carry (README "Errors").
REASONS = {
    "GOAL_REQUIRED",
    "GOAL_TOO_LARGE",
    "INVALID_GOAL",
    "INVALID_ID",
    "INVALID_PLAN",
    "TOO_MANY_NODES",
    "MALFORMED_REQUEST",
}

TOOLS = """
version: 1
sandbox_root: .
tools:
  - name: echo
    builtin: echo
  - name: arithmetic
    builtin: arithmetic
"""

GOALS = ["What is (17*23)+4?", "Report this machine's OS", "echo hello", "2+2"]
#: Characters a goal may hold, and ones it may not (controls, NUL).
_TEXT = " \n\r\t/\\.:-_$'\"{}[]é中🙂\u200b\ufeff\u202e"
_HOSTILE_CHARS = "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\x9f\n\r\t/\\.:-_ $'\"{}[]é中🙂\u200b\ufeff"


class Fuzzer:
    """Builds the requests from one seeded random source."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.run_ids = [uuid.UUID(int=self.rng.getrandbits(128)).hex for _ in range(4)]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def text(self, max_len: int = 40, *, controls: bool = True) -> str:
        alphabet = string.ascii_letters + string.digits + (_HOSTILE_CHARS if controls else _TEXT)
        length = self.rng.choice([0, 1, 2, 8, self.rng.randint(0, max_len)])
        chars = [self.rng.choice(alphabet) for _ in range(length)]
        if controls and self.chance(0.2):
            chars += [chr(self.rng.choice([self.rng.randint(0, 0xD7FF), 0x10FFFF, 0xFFFE]))]
        return "".join(chars)

    def ident(self, good: str) -> str:
        """An id: usually a good one, else empty, hostile or long."""
        return self.rng.choice(
            [
                *[good] * 6,
                "",
                self.text(),
                f"../{good}",
                f"{good}/x",
                good + "\x00",
                "x" * self.rng.choice([64, 65, 128, 129, 60_000]),
            ]
        )

    def number(self) -> float:
        return self.rng.choice(
            [0, -1, 2**53 + 1, 1e308, -1e308, 5e-324, self.rng.uniform(-1e9, 1e9), 7]
        )

    def value(self, depth: int = 0) -> Any:
        kind = self.rng.randint(0, 9 if depth < 4 else 5)
        if kind <= 2:
            return self.number()
        if kind <= 4:
            return self.text()
        if kind == 5:
            return self.rng.choice([None, True, False, "$a", "${a.x}", "$ghost"])
        if kind <= 7:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.text(8): self.value(depth + 1) for _ in range(self.rng.randint(0, 3))}

    def args(self) -> Any:
        args = common_pb2.ToolCall().args
        roll = self.rng.random()
        if roll < 0.1:  # nested to (or past) the args depth limit
            value: Any = 1
            for _ in range(self.rng.choice([MAX_ARGS_DEPTH - 1, MAX_ARGS_DEPTH + 5])):
                value = {"k": value}
            args.update({"value": value})
        elif roll < 0.15:  # big
            args.update({"value": "x" * self.rng.choice([1000, 300_000])})
        elif roll < 0.25:  # numbers JSON cannot carry
            args.update({"value": 1})
            args.fields["value"].number_value = self.rng.choice([math.nan, math.inf, -math.inf])
        elif roll < 0.35:  # arithmetic's own
            args.update({"expression": self.rng.choice(["1+2", "2**999999", "1/0", self.text()])})
        else:
            args.update({"value": self.value()})
        return args

    def call(self, index: int, ids: list[str]) -> common_pb2.ToolCall:
        call = common_pb2.ToolCall(
            node_id=self.ident(f"n{index}"),
            tool=self.rng.choice(["echo", "echo", "arithmetic", "nope", self.text(10)]),
            depends_on=[self.ident(self.rng.choice(ids)) for _ in range(self.rng.randint(0, 2))]
            if ids
            else [],
        )
        call.args.CopyFrom(self.args())
        return call

    def request(self) -> executor_pb2.RunRequest:
        request = executor_pb2.RunRequest()
        if self.chance(0.5):
            request.run_id = self.ident(self.rng.choice(self.run_ids))
        roll = self.rng.random()
        if roll < 0.3:
            request.goal = self.rng.choice(GOALS)
        elif roll < 0.45:
            request.goal = self.rng.choice(GOALS) + " " + self.text(200)
        elif roll < 0.55:
            request.goal = self.rng.choice(GOALS) + " " + self.text(2000, controls=False)
        elif roll < 0.65:
            request.goal = "x" * self.rng.choice([32 * 1024, 32 * 1024 + 1, 120_000])
        if self.chance(0.55):
            ids: list[str] = []
            for index in range(self.rng.randint(1, 4)):
                request.plan.append(self.call(index, ids))
                ids.append(f"n{index}")
        options = request.options
        if self.chance(0.3):
            options.model = self.rng.choice(["", "trellis-offline-rules-v1", self.text(20)])
        if self.chance(0.2):
            options.max_nodes = self.rng.choice([-(2**31), -1, 0, 1, 2**31 - 1])
            options.max_parallel = self.rng.choice([-(2**31), 0, 1, 2**31 - 1])
            options.max_replans = self.rng.choice([-1, 0, 2**31 - 1])
            options.max_cost_nano_usd = self.rng.choice([-(2**63), 0, 1, 2**63 - 1])
            options.cache_mode = self.rng.choice([0, 1, 2, 3, 99])  # type: ignore[assignment]
        if self.chance(0.1):
            options.timeout.seconds = self.rng.choice([-5, 0, 1, 30, 10**9])
        return request

    def raw(self) -> bytes:
        """Bytes that are (mostly) no RunRequest: random, cut or flipped valid ones,
        invalid UTF-8 in a string field, or args nested past protobuf's depth limit."""
        valid = self.request().SerializeToString()
        roll = self.rng.random()
        if roll < 0.25:
            return self.rng.randbytes(self.rng.randint(1, 200))
        if roll < 0.5 and valid:
            return valid[: self.rng.randint(0, len(valid) - 1)]
        if roll < 0.7 and valid:
            data = bytearray(valid)
            for _ in range(self.rng.randint(1, 4)):
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
            return bytes(data)
        if roll < 0.85:
            return field(self.rng.choice([1, 4]), b"bad \xc3\x28 utf-8")
        inner = field(1, b"a") + field(2, b"echo") + field(3, deep_struct(60))
        return field(2, inner)


@pytest.fixture
async def stack(postgres_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS)
    running = await start_stack(
        database_url=postgres_url,
        costs_database_url=f"sqlite:///{tmp_path}/costs.db",
        tools_file=tools,
        tools_reload_seconds=0,
        run_timeout_seconds=10,
    )
    yield running
    await running.stop()


async def _outcome(call) -> tuple[grpc.StatusCode, str, list[executor_pb2.RunResponse]]:  # type: ignore[no-untyped-def]
    """(status code, reason, events) of one Run call."""
    events: list[executor_pb2.RunResponse] = []
    try:
        async for event in call:
            events.append(event)
    except grpc.RpcError as error:
        return error.code(), from_rpc_error(error).reason, events
    return grpc.StatusCode.OK, "", events


@pytest.mark.timeout(180)
async def test_hostile_run_requests_get_clear_errors_and_the_stack_serves_on(stack) -> None:
    fuzzer = Fuzzer(SEED)
    seen: dict[str, int] = {}
    async with aio.insecure_channel(stack.executor_target) as channel:
        raw = channel.unary_stream(RUN, request_serializer=None, response_deserializer=None)
        typed = channel.unary_stream(
            RUN,
            request_serializer=executor_pb2.RunRequest.SerializeToString,
            response_deserializer=executor_pb2.RunResponse.FromString,
        )
        for index in range(REQUESTS):
            if fuzzer.chance(0.15):
                data = fuzzer.raw()
                code, reason, events = await _outcome(raw(data, timeout=30))
                sent: object = data[:120]
                events = [executor_pb2.RunResponse.FromString(e) for e in events]  # type: ignore[arg-type]
            else:
                request = fuzzer.request()
                code, reason, events = await _outcome(typed(request, timeout=30))
                sent = str(request)[:300]
            where = f"seed {SEED}, request {index}: {sent!r}"
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (
                f"{code.name} {reason} for {where}"
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert reason in REASONS, f"{reason} for {where}"
            else:
                finished = events[-1].finished if events else None
                assert finished is not None and finished.status, f"no finished for {where}"
                assert finished.error.code not in ("INTERNAL", "UNKNOWN"), f"{finished} {where}"
                reason = executor_pb2.RunStatus.Name(finished.status)
            seen[f"{code.name}:{reason}"] = seen.get(f"{code.name}:{reason}", 0) + 1
    # the mix really exercised both sides: runs that ran, and each kind of refusal
    assert seen.get("OK:RUN_STATUS_SUCCEEDED", 0) >= 10, seen
    for reason in ("MALFORMED_REQUEST", "INVALID_ID", "INVALID_PLAN", "GOAL_TOO_LARGE"):
        assert seen.get(f"INVALID_ARGUMENT:{reason}", 0) >= 2, seen
    for name, server in stack.servers.items():
        async with aio.insecure_channel(server.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
