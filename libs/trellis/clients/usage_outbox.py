"""A durable outbox of usage events: what a call spent is never lost to an outage.

Callers of cost accounting (the planner's model calls, the gateway's tool executions) hand
each ``RecordUsageRequest`` to ``UsageOutbox.send`` (or ``submit``, to deliver in the
background). Events are coalesced ("flush when idle"): with a ``batch_sender``
(``CostsClient.record_usages``), an event submitted while no delivery is under way goes at
once, and the events submitted while one is under way go together, one RecordUsages per
tenant (at most MAX_BATCH events; each tenant's batches go independently), as soon as it
returns (``batch_window`` adds a short wait before each round, 0 by default), so a busy
service makes a few ledger transactions instead of one per call
(``trellis.runtime.coalescing``). The event of a tool call that cost nothing (no tool
cost, no tokens) may wait ``free_window`` instead, going with the next batch that forms
anyway: no budget or spend depends on it, and an idle-time RecordUsages per call is what
would otherwise delay the calls being served. Each event still has its own outcome (its
entry's result). It is delivered bounded by ``send_timeout``; when that fails with anything that
may heal (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, connection errors,
timeouts) the request is written to a local SQLite file, keyed by tenant and usage_id,
with the tenant it was made for (RecordUsage reads the tenant from ``x-tenant-id``, so a
redelivery runs under the original one), its attempts and the time of its next attempt. A
background loop (``start``/``aclose``) redelivers the rows oldest first (among those tried
as often), one at a time, with exponential backoff and jitter (about 1 s, doubling per
failure in a row, capped at 30 s): one failure postpones every row (cost accounting is
down for all of them), and one success, redelivered or fresh, makes every row due again
(it is back). A row that keeps failing is tried after the others, so it cannot hold them
back. Rows left by an earlier process are due as soon as the next one starts. The ledger
is idempotent on usage_id, so a redelivery of an event that did arrive is acknowledged,
not counted.

A permanent refusal (INVALID_ARGUMENT, ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION,
UNIMPLEMENTED: the event itself is wrong and no retry can fix it) is logged as an error
with the event, counted as ``rejected`` and dropped, never silently.

On a graceful stop (``aclose``) deliveries still in flight get ``flush_seconds`` to
finish; the rest are written to the file rather than lost. The one window left: a
process SIGKILLed (or crashing) after a call ended and before its usage was delivered
or written here loses that event (with a ``batch_window``, the events of that window;
with a ``free_window``, the zero-cost events of that one);
shrinking it further would mean writing every event to disk before the first try, on
the hot path of every call.

Only the sender callable knows gRPC; failures are classified by the domain errors of
``trellis.runtime.errors`` (a raw ``grpc.RpcError`` is translated first).
Metrics: ``trellis_usage_outbox_pending`` (rows held by the outboxes of this process)
and ``trellis_usage_deliveries_total{outcome=delivered|queued|redelivered|rejected}``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import grpc

from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.coalescing import Coalescer
from trellis.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unimplemented,
    from_rpc_error,
)
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import USAGE_DELIVERIES, USAGE_OUTBOX_PENDING
from trellis.runtime.sqlite import SQLITE_PREFIX, connect

log = get_logger(__name__)

Request = costs_pb2.RecordUsageRequest
Response = costs_pb2.RecordUsageResponse
#: Delivers one event (e.g. ``CostsClient.record_usage``); raises when it was not taken.
Sender = Callable[[Request], Awaitable[Response]]
#: Delivers one tenant's events in one call (e.g. ``CostsClient.record_usages``).
BatchSender = Callable[[Sequence[Request]], Awaitable[costs_pb2.RecordUsagesResponse]]
#: Most events one batch carries (cost accounting's RecordUsages limit).
MAX_BATCH = 1000

#: Refusals no retry can change: the event is dropped (logged and counted).
PERMANENT = (InvalidArgument, AlreadyExists, NotFound, FailedPrecondition, Unimplemented)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    usage_id TEXT NOT NULL,
    request BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (tenant_id, usage_id)
)
"""


def default_outbox_path(service: str) -> Path:
    """``.trellis/{service}-outbox.db``: beside the embedded database's default file."""
    return Path(".trellis") / f"{service}-outbox.db"


def validate_outbox_path(path: Path) -> Path:
    """For ``outbox_path`` settings: a file that can outlive the process."""
    text = str(path).strip()
    if not text or text == ".":
        raise ValueError("must name a file")
    if text == ":memory:":
        raise ValueError("must be a file: an outbox in memory is lost on restart")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name a file in it")
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {path}: {existing} is not a writable directory")
    return path


def is_permanent(error: BaseException) -> bool:
    """Whether cost accounting refused the event for good (retrying cannot help)."""
    if isinstance(error, grpc.RpcError):
        error = from_rpc_error(error)
    return isinstance(error, PERMANENT)


def backoff_delay(attempts: int, first: float, cap: float, rng: random.Random) -> float:
    """Seconds before the next try after ``attempts`` failed ones: ``first``, doubling,
    capped at ``cap``, with equal jitter (between half of that and all of it)."""
    ceiling = min(cap, first * 2 ** max(0, attempts - 1))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass(frozen=True)
class _Event:
    """One event as it waits: the request and the tenant it was made for."""

    request: Request
    tenant_id: str


class UsageOutbox:
    """Delivers usage events to cost accounting, keeping the undelivered ones on disk.

    ``open`` it, ``start`` its redelivery loop, and ``aclose`` it when the service stops
    (before its channels close). ``clock`` is wall-clock seconds (stored next-attempt
    times must mean the same after a restart); ``rng`` makes the jitter reproducible.
    """

    def __init__(
        self,
        db: aiosqlite.Connection,
        sender: Sender,
        *,
        path: Path,
        send_timeout: float = 5.0,
        first_retry: float = 1.0,
        max_retry: float = 30.0,
        flush_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        batch_sender: BatchSender | None = None,
        batch_window: float = 0.0,
        free_window: float = 0.0,
    ) -> None:
        self._db = db
        self._sender = sender
        self._batch_sender = batch_sender
        self._batch_window = batch_window
        self._free_window = free_window
        #: Each tenant's events waiting for its next batch (a batch is one tenant's).
        self._batches: dict[str, Coalescer[_Event, Response]] = {}
        self.path = path
        self._timeout = send_timeout
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._rng = rng or random.Random()
        #: Rows this instance counts in ``trellis_usage_outbox_pending``.
        self._pending = 0
        self._tasks: set[asyncio.Task[Response | None]] = set()
        #: Those of ``_tasks`` waiting for cost accounting (the ones ``aclose`` interrupts).
        self._sending: set[asyncio.Task[object]] = set()
        self._wake = asyncio.Event()
        #: Redeliveries failed in a row (the backoff grows with them; 0 after a success).
        self._failures = 0
        #: When a fresh delivery last made the waiting rows due (at most once a retry).
        self._woken_at = float("-inf")
        self._loop: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: Path | str,
        sender: Sender,
        *,
        send_timeout: float = 5.0,
        first_retry: float = 1.0,
        max_retry: float = 30.0,
        flush_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        batch_sender: BatchSender | None = None,
        batch_window: float = 0.0,
        free_window: float = 0.0,
    ) -> UsageOutbox:
        """Open (or create) the outbox file; rows an earlier process left are due now."""
        path = Path(path)
        db = await connect(f"{SQLITE_PREFIX}{path}", autocommit=True)
        outbox = cls(
            db,
            sender,
            path=path,
            send_timeout=send_timeout,
            first_retry=first_retry,
            max_retry=max_retry,
            flush_seconds=flush_seconds,
            clock=clock,
            rng=rng,
            batch_sender=batch_sender,
            batch_window=batch_window,
            free_window=free_window,
        )
        try:
            await db.execute(SCHEMA)
            await db.execute(
                "UPDATE usage_outbox SET next_attempt_at = MIN(next_attempt_at, ?)", (clock(),)
            )
            count = await outbox.count()
        except BaseException:
            await db.close()
            raise
        outbox._count(count)
        if count:
            log.info("usage outbox holds undelivered events", path=str(path), pending=count)
        return outbox

    @property
    def pending(self) -> int:
        """Events waiting in the file (as this instance knows them)."""
        return self._pending

    async def count(self) -> int:
        """Events waiting in the file, read from it."""
        async with self._db.execute("SELECT COUNT(*) FROM usage_outbox") as rows:
            (count,) = await rows.fetchone()  # type: ignore[misc]
        return int(count)

    def start(self) -> None:
        """Start redelivering in the background (until ``aclose``)."""
        if self._loop is None and not self._closing:
            self._loop = asyncio.create_task(self._redeliver_forever(), name="usage-outbox")

    # -- sending ------------------------------------------------------------------------

    def submit(self, request: Request) -> asyncio.Task[Response | None]:
        """Deliver ``request`` in the background, for the current tenant; the outbox keeps
        the task (and flushes it on ``aclose``). Its result is the response, or None when
        the event was kept for later or refused."""
        event = _Event(request, context.tenant())
        # Queued now, not when the task first runs: a stop right after still flushes it.
        queued = None if self._batch_sender is None or self._closing else self._enqueue(event)
        task = asyncio.create_task(self._deliver(event, queued))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def send(self, request: Request) -> Response | None:
        """Deliver ``request`` now: the response, or None when it was kept for later (or
        refused). Cancelling the caller does not cancel the delivery."""
        return await asyncio.shield(self.submit(request))

    async def _deliver(
        self, event: _Event, queued: asyncio.Future[Response] | None = None
    ) -> Response | None:
        if queued is None and self._closing:
            await self._keep(event, "the service is stopping")
            return None
        task = asyncio.current_task()
        assert task is not None
        self._sending.add(task)
        try:
            response = await (self._call(event) if queued is None else queued)
        except asyncio.CancelledError:
            # Only ``aclose`` (or the event loop ending) cancels a delivery: keep the event.
            await self._keep(event, "interrupted by shutdown")
            if self._closing:
                return None
            raise
        except Exception as error:
            if is_permanent(error):
                self._reject(event, error)
            else:
                await self._keep(event, repr(error))
            return None
        finally:
            self._sending.discard(task)
        USAGE_DELIVERIES.labels("delivered").inc()
        now = self._clock()
        if self._pending and now - self._woken_at >= self._first_retry:
            self._woken_at = now  # cost accounting answers: the waiting rows may go now
            try:
                await self._all_due()
            except Exception as error:  # the loop gets to them in time anyway
                log.warning("usage outbox not woken", error=repr(error))
        return response

    async def _call(self, event: _Event) -> Response:
        # Detached: the caller's deadline may have passed (a call it cut short); what
        # the call used is recorded all the same, bounded by the outbox's own timeout.
        with context.request_scope(timeout=self._timeout, tenant_id=event.tenant_id, detached=True):
            async with asyncio.timeout(self._timeout):
                return await self._sender(event.request)

    def _enqueue(self, event: _Event) -> asyncio.Future[Response]:
        """Queue ``event`` for its tenant's next batch; the future ends with its outcome.
        An event whose delivery was interrupted first is not sent: it was kept on disk."""
        batches = self._batches.get(event.tenant_id)
        if batches is None:
            batches = self._batches[event.tenant_id] = Coalescer(
                functools.partial(self._send_batch, event.tenant_id),
                max_group=MAX_BATCH,
                window=self._batch_window,
                drop_abandoned=True,
                name="usage-outbox-batches",
            )
        free = self._free_window if costs_nothing(event.request) else None
        return batches.submit(event, within=free)

    async def _send_batch(
        self, tenant_id: str, events: Sequence[_Event]
    ) -> list[Response | Exception]:
        """One RecordUsages for ``events`` (one tenant's): each entry's response, or
        the error that entry (or the whole call) failed with."""
        batch_sender = self._batch_sender
        try:
            if batch_sender is None:
                raise Unimplemented("one RecordUsage per event")
            with context.request_scope(timeout=self._timeout, tenant_id=tenant_id, detached=True):
                async with asyncio.timeout(self._timeout):
                    answer = await batch_sender([event.request for event in events])
        except Unimplemented:
            # A cost accounting without RecordUsages: one RecordUsage per event, as before.
            self._batch_sender = None
            results = await asyncio.gather(
                *(self._call(event) for event in events), return_exceptions=True
            )
            return [r if not isinstance(r, BaseException) else _as_exception(r) for r in results]
        except Exception as error:
            return [error] * len(events)
        if len(answer.results) != len(events):
            failure = Internal("RecordUsages answered another number of results")
            return [failure] * len(events)
        return [_entry_outcome(result) for result in answer.results]

    async def _keep(self, event: _Event, error: str) -> None:
        """Write ``event`` to the file for a later try (a repeat of a kept one is a no-op)."""
        request = event.request
        if self._closed:
            log.error(
                "usage not recorded: the outbox is closed",
                usage_id=request.usage_id,
                **_describe(request, event.tenant_id),
            )
            return
        now = self._clock()
        try:
            # Never due before the rows already waiting: they go first.
            cursor = await self._db.execute(
                "INSERT INTO usage_outbox (tenant_id, usage_id, request, attempts,"
                " next_attempt_at, created_at, last_error) VALUES (?, ?, ?, 1,"
                " MAX(?, COALESCE((SELECT MAX(next_attempt_at) FROM usage_outbox), 0)), ?, ?)"
                " ON CONFLICT (tenant_id, usage_id) DO NOTHING",
                (
                    event.tenant_id,
                    request.usage_id,
                    request.SerializeToString(),
                    now + self._backoff(1),
                    now,
                    error,
                ),
            )
            inserted = cursor.rowcount == 1
            await cursor.close()
        except Exception as failure:  # a full disk must not break the caller's call
            log.error(
                "usage not recorded: the outbox could not be written",
                usage_id=request.usage_id,
                error=repr(failure),
                **_describe(request, event.tenant_id),
            )
            return
        USAGE_DELIVERIES.labels("queued").inc()
        if inserted:
            self._count(1)
        log.warning(
            "usage kept in the outbox for a later try",
            usage_id=request.usage_id,
            tenant_id=event.tenant_id,
            error=error,
        )
        self._wake.set()

    def _reject(self, event: _Event, error: BaseException) -> None:
        USAGE_DELIVERIES.labels("rejected").inc()
        log.error(
            "usage refused by cost accounting; not retried",
            usage_id=event.request.usage_id,
            error=repr(error),
            **_describe(event.request, event.tenant_id),
        )

    # -- redelivery ---------------------------------------------------------------------

    async def _redeliver_forever(self) -> None:
        while True:
            self._wake.clear()  # before reading: a row written meanwhile wakes us again
            try:
                wait = await self.redeliver_due()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # e.g. the file went away; try again later
                log.error("usage outbox redelivery failed", error=repr(error))
                wait = self._max_retry
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def redeliver_due(self) -> float | None:
        """Redeliver due rows, the least tried and then the oldest first, until one fails
        or none is due; return the seconds until the next is due (None: none left)."""
        while not self._closing:
            async with self._db.execute(
                "SELECT seq, tenant_id, request, attempts FROM usage_outbox"
                " WHERE next_attempt_at <= ? ORDER BY attempts, seq LIMIT 1",
                (self._clock(),),
            ) as rows:
                row = await rows.fetchone()
            if row is None:
                break
            seq, tenant_id, blob, attempts = row
            if not await self._redeliver(
                seq, _Event(Request.FromString(blob), tenant_id), attempts
            ):
                break
        async with self._db.execute("SELECT MIN(next_attempt_at) FROM usage_outbox") as rows:
            (next_at,) = await rows.fetchone()  # type: ignore[misc]
        return None if next_at is None else max(0.0, next_at - self._clock())

    async def _redeliver(self, seq: int, event: _Event, attempts: int) -> bool:
        """One try of a stored row; False when cost accounting is still out of reach."""
        try:
            await self._call(event)
        except Exception as error:
            if is_permanent(error):
                self._reject(event, error)
                await self._delete(seq)
                return True
            self._failures += 1
            retry_at = self._clock() + self._backoff(self._failures + 1)
            await self._db.execute(
                "UPDATE usage_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (repr(error), seq),
            )
            # Down for this row is down for all: every row waits as long.
            await self._db.execute(
                "UPDATE usage_outbox SET next_attempt_at = MAX(next_attempt_at, ?)", (retry_at,)
            )
            log.info(
                "usage redelivery failed; retrying later",
                usage_id=event.request.usage_id,
                attempts=attempts + 1,
                retry_in_s=round(retry_at - self._clock(), 3),
                error=repr(error),
            )
            return False
        USAGE_DELIVERIES.labels("redelivered").inc()
        await self._delete(seq)
        if self._failures:
            await self._all_due()
        return True

    async def _delete(self, seq: int) -> None:
        cursor = await self._db.execute("DELETE FROM usage_outbox WHERE seq = ?", (seq,))
        if cursor.rowcount == 1:
            self._count(-1)
        await cursor.close()

    async def _all_due(self) -> None:
        """Cost accounting answered: every waiting row may be tried now."""
        self._failures = 0
        now = self._clock()
        await self._db.execute(
            "UPDATE usage_outbox SET next_attempt_at = ? WHERE next_attempt_at > ?", (now, now)
        )
        self._wake.set()

    def _backoff(self, attempts: int) -> float:
        return backoff_delay(attempts, self._first_retry, self._max_retry, self._rng)

    def _count(self, delta: int) -> None:
        self._pending += delta
        USAGE_OUTBOX_PENDING.inc(delta)

    # -- stopping -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop redelivering, let deliveries in flight finish for ``flush_seconds``, write
        the rest to the file, and close it."""
        if self._closing:
            return
        self._closing = True
        for batches in self._batches.values():
            batches.flush()  # what waits for company goes now
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._flush_seconds)
        # A delivery interrupted here writes its own event to the file; one not started
        # yet finds the outbox closing and writes it without trying.
        for task in set(self._sending):
            task.cancel()
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        for batches in self._batches.values():
            await batches.cancel()
        self._closed = True
        self._count(-self._pending)
        await self._db.close()


def costs_nothing(request: Request) -> bool:
    """A tool call priced at zero: no budget or spend moves with it, so its event may
    wait longer for company (``free_window``)."""
    return (
        request.kind == costs_pb2.USAGE_KIND_TOOL
        and request.tool_cost_nano_usd == 0
        and not request.HasField("usage")
    )


def _as_exception(error: BaseException) -> Exception:
    return error if isinstance(error, Exception) else RuntimeError(repr(error))


#: Entry reasons RecordUsages refuses with that are not INVALID_ARGUMENT.
_ENTRY_ERRORS = {"USAGE_ID_TAKEN": AlreadyExists}


def _entry_outcome(result: costs_pb2.RecordUsageResult) -> Response | Exception:
    """One entry's result as RecordUsage would have given it: a response, or the
    (permanent) refusal."""
    if result.HasField("error"):
        kind = _ENTRY_ERRORS.get(result.error.code, InvalidArgument)
        return kind(result.error.message, reason=result.error.code)
    return Response(cost_nano_usd=result.cost_nano_usd, duplicate=result.duplicate)


def _describe(request: Request, tenant_id: str) -> dict[str, object]:
    """The event's fields for a log line (so an operator can re-enter it by hand)."""
    fields: dict[str, object] = {
        "tenant_id": tenant_id,
        "run_id": request.run_id,
        "node_id": request.node_id,
        "kind": costs_pb2.UsageKind.Name(request.kind),
    }
    if request.kind == costs_pb2.USAGE_KIND_TOOL:
        fields.update(tool=request.tool, tool_cost_nano_usd=request.tool_cost_nano_usd)
    else:
        usage = request.usage
        fields.update(
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            estimated=request.estimated,
        )
    return fields
