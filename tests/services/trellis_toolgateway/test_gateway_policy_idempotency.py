"""Side-effecting tools: never cached, run once per (tenant, tool, idempotency key);
a repeat - also one arriving while the first still runs - gets the first outcome."""

import asyncio
from collections.abc import Sequence

import pytest
from opentelemetry.trace import NoOpTracer

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.policy.breaker import BreakerConfig
from trellis_toolgateway.policy.idempotency import KeyConflict, MemoryIdempotencyStore
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec, ToolError

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED
DAY = 24 * 3600


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# -- the store alone -------------------------------------------------------------------


async def test_store_claim_complete_and_replay() -> None:
    store = MemoryIdempotencyStore()
    assert await store.claim("k", "fp", 60)
    assert not await store.claim("k", "fp", 60)
    waiter = asyncio.create_task(store.wait("k"))
    await asyncio.sleep(0)
    assert not waiter.done()  # the first call still runs
    await store.complete("k", b"first")
    assert await waiter == b"first"
    assert await store.wait("k") == b"first"
    await store.complete("k", b"second")  # the first outcome stays
    assert await store.wait("k") == b"first"


async def test_store_release_lets_the_next_caller_claim() -> None:
    store = MemoryIdempotencyStore()
    assert await store.claim("k", "fp", 60)
    waiter = asyncio.create_task(store.wait("k"))
    await asyncio.sleep(0)
    await store.release("k")
    assert await waiter is None
    assert await store.claim("k", "fp", 60)


async def test_store_rejects_a_key_reused_with_other_arguments() -> None:
    store = MemoryIdempotencyStore()
    await store.claim("k", "fp1", 60)
    with pytest.raises(KeyConflict):
        await store.claim("k", "fp2", 60)


async def test_store_forgets_finished_keys_after_their_ttl() -> None:
    clock = FakeClock()
    store = MemoryIdempotencyStore(clock=clock)
    await store.claim("k", "fp", 60)
    clock.now += 3600  # the TTL counts from completion, not from the claim
    await store.complete("k", b"v")
    clock.now += 59
    assert not await store.claim("k", "fp", 60)
    clock.now += 1
    assert await store.wait("k") is None
    assert await store.claim("k", "fp", 60)


async def test_store_is_bounded_and_keeps_running_keys() -> None:
    store = MemoryIdempotencyStore(max_entries=3)
    await store.claim("running", "fp", 60)
    for key in ("a", "b", "c"):
        await store.claim(key, "fp", 60)
        await store.complete(key, key.encode())
    assert len(store) == 3
    assert not await store.claim("running", "fp", 60)  # still held
    assert await store.wait("a") is None  # the oldest finished one went
    assert await store.wait("c") == b"c"


# -- inside the invoker ----------------------------------------------------------------


class SendMail:
    """A side-effecting tool that counts the mails it 'sent'."""

    def __init__(self, *, name: str = "send_mail", gate: bool = False, **spec: object) -> None:
        self.sent: list[dict] = []
        self.gate = asyncio.Event() if gate else None
        self.fail: Exception | None = None
        self.tool = FunctionTool(
            Spec(
                name,
                "sends a mail",
                {"type": "object"},
                {"type": "object"},
                side_effects=True,
                cache_ttl=600,  # must be ignored: side effects are never cached
                **spec,  # type: ignore[arg-type]
            ),
            self._run,
        )

    async def _run(self, args: dict) -> dict:
        self.sent.append(args)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {"message_id": len(self.sent)}


class FakeCache:
    def __init__(self) -> None:
        self.used: list[str] = []

    async def get(self, key: str) -> bytes | None:
        self.used.append(key)
        return None

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        self.used.append(key)


def invoker_for(*tools: SendMail, clock: FakeClock | None = None, cache=None, **kw) -> Invoker:
    return Invoker(
        ToolRegistry([t.tool for t in tools]),
        cache,
        NoOpTracer(),
        clock=clock or FakeClock(),
        **kw,
    )


async def test_a_repeated_key_returns_the_first_outcome_without_running_again() -> None:
    mail, cache = SendMail(), FakeCache()
    invoker = invoker_for(mail, cache=cache)
    args = {"to": "a@example.com"}
    first = await invoker.invoke(Call("send_mail", args, node_id="n1"), idempotency_key="r1/n1")
    again = await invoker.invoke(Call("send_mail", args, node_id="n1"), idempotency_key="r1/n1")
    assert len(mail.sent) == 1
    assert from_value(again.output) == from_value(first.output) == {"message_id": 1}
    assert again == first  # the very same outcome: timestamps, attempts and all
    assert (again.attempts, again.cache_hit) == (1, False)
    assert cache.used == []  # never cached


async def test_the_replay_carries_the_callers_node_id() -> None:
    mail = SendMail()
    invoker = invoker_for(mail)
    await invoker.invoke(Call("send_mail", {}, node_id="n1"), idempotency_key="k")
    again = await invoker.invoke(Call("send_mail", {}, node_id="n9"), idempotency_key="k")
    assert again.node_id == "n9" and len(mail.sent) == 1


async def test_concurrent_calls_with_one_key_run_once_and_all_get_its_outcome() -> None:
    mail = SendMail(gate=True)
    invoker = invoker_for(mail)
    calls = [
        asyncio.create_task(
            invoker.invoke(Call("send_mail", {"to": "x"}, node_id=f"n{i}"), idempotency_key="k")
        )
        for i in range(20)
    ]
    await asyncio.sleep(0.01)
    assert len(mail.sent) == 1
    assert not any(c.done() for c in calls)  # the repeats wait for the first
    mail.gate.set()  # type: ignore[union-attr]
    outcomes = await asyncio.gather(*calls)
    assert len(mail.sent) == 1
    assert [o.node_id for o in outcomes] == [f"n{i}" for i in range(20)]
    for outcome in outcomes:
        outcome.node_id = ""
    assert all(o == outcomes[0] for o in outcomes)  # the first outcome, verbatim
    assert from_value(outcomes[0].output) == {"message_id": 1}


async def test_without_a_key_every_call_runs() -> None:
    mail = SendMail()
    invoker = invoker_for(mail)
    for _ in range(3):
        await invoker.invoke(Call("send_mail", {}))
    assert len(mail.sent) == 3


async def test_keys_are_scoped_by_tenant_and_tool() -> None:
    mail, sms = SendMail(), SendMail(name="send_sms")
    invoker = invoker_for(mail, sms)
    for tenant in ("acme", "globex", "acme"):
        with context.request_scope(tenant_id=tenant):
            await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
            await invoker.invoke(Call("send_sms", {}), idempotency_key="k")
    assert (len(mail.sent), len(sms.sent)) == (2, 2)


async def test_a_key_reused_with_other_arguments_is_invalid() -> None:
    mail = SendMail()
    invoker = invoker_for(mail)
    await invoker.invoke(Call("send_mail", {"to": "a"}), idempotency_key="k")
    with pytest.raises(InvalidArgument) as raised:
        await invoker.invoke(Call("send_mail", {"to": "b"}), idempotency_key="k")
    assert raised.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert [v.field for v in raised.value.violations] == ["idempotency_key"]
    assert len(mail.sent) == 1


async def test_a_failed_first_outcome_is_replayed_too() -> None:
    """At most once: the side effect may have happened before the failure."""
    mail = SendMail(retries=0)
    mail.fail = ToolError("SMTP_TIMEOUT", "no answer", retryable=True)
    invoker = invoker_for(mail)
    first = await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
    mail.fail = None
    again = await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
    assert (first.status, again.status, again.error.code) == (FAILED, FAILED, "SMTP_TIMEOUT")
    assert len(mail.sent) == 1


async def test_a_first_call_that_ran_nothing_does_not_hold_the_key() -> None:
    clock, mail = FakeClock(), SendMail()
    mail.fail = ToolError("SMTP_DOWN", "down", retryable=True)
    invoker = invoker_for(mail, clock=clock, breaker=BreakerConfig(consecutive_failures=1))
    await invoker.invoke(Call("send_mail", {}), idempotency_key="k1")  # opens the circuit
    blocked = await invoker.invoke(Call("send_mail", {}), idempotency_key="k2")
    assert (blocked.error.code, blocked.attempts, len(mail.sent)) == ("CIRCUIT_OPEN", 0, 1)
    clock.now += 60
    mail.fail = None
    retried = await invoker.invoke(Call("send_mail", {}), idempotency_key="k2")
    assert (retried.status, retried.attempts, len(mail.sent)) == (SUCCEEDED, 1, 2)


async def test_keys_expire_after_the_ttl() -> None:
    clock, mail = FakeClock(), SendMail()
    invoker = invoker_for(mail, clock=clock)  # default TTL: 24 h
    await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
    clock.now += DAY - 1
    await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
    assert len(mail.sent) == 1
    clock.now += 1
    await invoker.invoke(Call("send_mail", {}), idempotency_key="k")
    assert len(mail.sent) == 2


async def test_a_repeat_whose_deadline_ends_while_the_first_runs_fails_retryably() -> None:
    mail = SendMail(gate=True)
    invoker = invoker_for(mail)
    first = asyncio.create_task(invoker.invoke(Call("send_mail", {}), idempotency_key="k"))
    await asyncio.sleep(0.01)
    with context.request_scope(timeout=0.02):
        pending = await invoker.invoke(Call("send_mail", {}, node_id="n2"), idempotency_key="k")
    assert (pending.error.code, pending.error.retryable, pending.node_id) == (
        "IDEMPOTENCY_PENDING",
        True,
        "n2",
    )
    mail.gate.set()  # type: ignore[union-attr]
    assert (await first).status == SUCCEEDED
    assert len(mail.sent) == 1


async def test_keys_are_ignored_for_tools_without_side_effects() -> None:
    calls = []

    async def run(args: dict) -> dict:
        calls.append(args)
        return {}

    spec = Spec("pure", "", {"type": "object"}, {"type": "object"})
    invoker = Invoker(ToolRegistry([FunctionTool(spec, run)]), None, NoOpTracer())
    for _ in range(2):
        await invoker.invoke(Call("pure", {}), idempotency_key="k")
    assert len(calls) == 2
