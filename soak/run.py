"""``run_soak``: the stack as processes, N clients for T seconds, then the verdict.

Each client task loops until the time is up: it picks a kind of run (``workload.MIX``),
makes it with its own ``run_id`` over one shared channel, and records how it ended and
how long the call took. A shed run (RESOURCE_EXHAUSTED, ``RUN_CAPACITY``) is followed by
a pause of its RetryInfo delay (with jitter) before the client's next run, as a
well-behaved client does. Runs in flight when the time is up finish (they are not cut).

Then every ``run_id`` a client used is read back with GetRun. A run is *lost* when its
client saw ``started`` but the store has no terminal state for it (missing, or still
RUNNING after ``SETTLE_SECONDS``); a run the client never saw start but that the store
holds unfinished is *stuck*. Both must be 0. So must timeouts (a DEADLINE_EXCEEDED no
kind asked for) and unexpected outcomes, and every service must still be SERVING.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from grpc import aio

from soak import workload
from soak.rss import RssSampler
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import timestamp_seconds
from trellis.runtime.errors import from_rpc_error
from trellis_cli.processes import ProcessStack, start_process_stack

RunStatus = executor_pb2.RunStatus
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
#: How long runs left unfinished after the soak get to reach a terminal state.
SETTLE_SECONDS = 20.0
#: Kinds whose runs should succeed: their latency is the soak's latency figure.
SUCCESS_KINDS = ("demo", "arithmetic", "parallel")
#: The tenant the soak's API key acts for.
TENANT = "soak"


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 50
    seconds: float = 60.0
    #: TRELLIS_MAX_ACTIVE_RUNS of the executor (None: its default).
    max_active_runs: int | None = 16
    #: Time each plan line of the offline model takes, so runs last 100s of ms.
    model_line_delay_ms: float = 100.0
    seed: int | None = None
    #: Where the processes keep their SQLite files and logs (None: a temporary dir).
    workdir: Path | None = None
    rss_interval: float = 1.0


@dataclass
class RunRecord:
    kind: str
    run_id: str
    #: Seconds since the soak began, when the call was made.
    at: float
    latency_s: float = 0.0
    started: bool = False
    #: The ``finished`` event's status (SUCCEEDED...), None if none came.
    status: str | None = None
    run_error: str = ""
    #: Error codes of the nodes that did not succeed.
    node_errors: list[str] = field(default_factory=list)
    #: gRPC status of the call when not OK, its ErrorInfo reason and RetryInfo delay.
    code: str | None = None
    reason: str = ""
    retry_delay: float | None = None
    cancel_code: str | None = None
    outcome: str = ""


@dataclass
class _Soak:
    stub: executor_pb2_grpc.ExecutorServiceStub
    metadata: tuple[tuple[str, str], ...]
    t0: float
    until: float
    records: list[RunRecord] = field(default_factory=list)

    async def client(self, index: int, rng: random.Random) -> None:
        count = 0
        while time.monotonic() < self.until:
            kind = workload.pick_kind(rng)
            run_id = f"soak-{index}-{count}-{uuid.uuid4().hex[:8]}"
            count += 1
            record = await self.one(workload.plan_run(kind, run_id, rng))
            self.records.append(record)
            if record.outcome == workload.SHED:
                await asyncio.sleep((record.retry_delay or 1.0) * rng.uniform(0.5, 1.5))

    async def one(self, planned: workload.Planned) -> RunRecord:
        request = planned.request
        record = RunRecord(planned.kind, request.run_id, round(time.monotonic() - self.t0, 3))
        began = time.monotonic()
        cancel: asyncio.Future[Any] | None = None
        call = self.stub.Run(request, timeout=planned.timeout, metadata=self.metadata)
        try:
            async for event in call:
                which = event.WhichOneof("event")
                if which == "started":
                    record.started = True
                elif which == "node_started" and planned.cancel and cancel is None:
                    cancel = asyncio.ensure_future(
                        self.stub.CancelRun(
                            executor_pb2.CancelRunRequest(run_id=request.run_id),
                            timeout=30,
                            metadata=self.metadata,
                        )
                    )
                elif which == "node_finished":
                    outcome = event.node_finished.outcome
                    if outcome.status != common_pb2.NODE_STATUS_SUCCEEDED:
                        record.node_errors.append(outcome.error.code or "NO_CODE")
                elif which == "finished":
                    record.status = RunStatus.Name(event.finished.status).removeprefix(
                        "RUN_STATUS_"
                    )
                    record.run_error = event.finished.error.code
        except aio.AioRpcError as error:
            domain = from_rpc_error(error)
            record.code, record.reason = error.code().name, domain.reason
            record.retry_delay = domain.retry_delay
        finally:
            record.latency_s = time.monotonic() - began
        if cancel is not None:
            try:
                await cancel
            except aio.AioRpcError as error:
                record.cancel_code = error.code().name
        record.outcome = workload.classify(
            planned.kind,
            record.code,
            record.reason,
            record.status,
            record.run_error,
            record.node_errors,
        )
        if planned.cancel and record.outcome == workload.EXPECTED and cancel is None:
            record.outcome = workload.UNEXPECTED  # cancelled, but not by us
        if record.cancel_code is not None:
            record.outcome = workload.UNEXPECTED
        return record


@dataclass(frozen=True)
class Stored:
    """A run as GetRun reads it back: status name (``MISSING``: NOT_FOUND) and the
    wall-clock seconds it was created and finished at (0 when not)."""

    status: str
    created: float = 0.0
    finished: float = 0.0


async def _stored_runs(
    stub: executor_pb2_grpc.ExecutorServiceStub,
    metadata: tuple[tuple[str, str], ...],
    run_ids: list[str],
) -> dict[str, Stored]:
    """Every run as stored, after giving unfinished ones up to ``SETTLE_SECONDS`` to end."""
    gate = asyncio.Semaphore(16)

    async def read(run_id: str) -> Stored:
        async with gate:
            try:
                reply = await stub.GetRun(
                    executor_pb2.GetRunRequest(run_id=run_id), timeout=30, metadata=metadata
                )
            except aio.AioRpcError as error:
                if error.code().name == "NOT_FOUND":
                    return Stored("MISSING")
                return Stored(f"ERROR:{error.code().name}")
        run = reply.run
        return Stored(
            RunStatus.Name(run.status).removeprefix("RUN_STATUS_"),
            timestamp_seconds(run.created_at),
            timestamp_seconds(run.finished_at),
        )

    stored = dict(zip(run_ids, await asyncio.gather(*map(read, run_ids)), strict=True))
    deadline = time.monotonic() + SETTLE_SECONDS
    while (pending := [r for r, s in stored.items() if s.status == "RUNNING"]) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.5)
        stored.update(zip(pending, await asyncio.gather(*map(read, pending)), strict=True))
    return stored


def peak_active(stored: Iterable[Stored]) -> int:
    """Most runs alive at once per the store (created → finished): the server's view of
    how many runs it executed together, which admission control bounds."""
    edges = [(s.created, 1) for s in stored if s.created and s.finished]
    edges += [(s.finished, -1) for s in stored if s.created and s.finished]
    peak = now = 0
    for _, step in sorted(edges):  # at a tie, an end (-1) sorts before a start
        now += step
        peak = max(peak, now)
    return peak


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]

    return {
        "n": len(ordered),
        "p50": round(rank(50) * 1000, 1),
        "p99": round(rank(99) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def summarize(
    config: SoakConfig,
    records: list[RunRecord],
    stored: dict[str, Stored],
    elapsed: float,
    rss: dict[str, dict[str, Any]],
    serving: dict[str, bool],
) -> dict[str, Any]:
    """The soak's figures and checks (JSON-ready)."""
    states = {run_id: s.status for run_id, s in stored.items()}
    peak = peak_active(stored.values())
    outcomes = Counter(r.outcome for r in records)
    lost = [
        r.run_id for r in records if r.started and states.get(r.run_id, "MISSING") not in TERMINAL
    ]
    stuck = [
        r.run_id
        for r in records
        if not r.started and states.get(r.run_id, "MISSING") not in (TERMINAL | {"MISSING"})
    ]
    mismatched = [
        r.run_id for r in records if r.status is not None and states.get(r.run_id) != r.status
    ]
    completed = [r for r in records if r.status is not None]
    ended = Counter(r.status if r.code is None else r.code for r in records)
    by_reason = Counter(f"{r.code}/{r.reason}" for r in records if r.code is not None)
    by_reason.update(f"run {r.status}/{r.run_error}" for r in completed if r.run_error)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in workload.MIX:
        mine = [r for r in records if r.kind == kind]
        kinds[kind] = {
            "runs": len(mine),
            **{
                name: sum(1 for r in mine if r.outcome == name)
                for name in (
                    workload.EXPECTED,
                    workload.SHED,
                    workload.TIMEOUT,
                    workload.UNEXPECTED,
                )
            },
            "latency_ms": _percentiles(
                [r.latency_s for r in mine if r.outcome == workload.EXPECTED]
            ),
        }
    succeeded = [r for r in records if r.kind in SUCCESS_KINDS and r.status == "SUCCEEDED"]
    shed = [r for r in records if r.outcome == workload.SHED]
    unexpected = [r for r in records if r.outcome == workload.UNEXPECTED]
    runs = {
        "attempted": len(records),
        "completed": len(completed),
        "succeeded": sum(1 for r in completed if r.status == "SUCCEEDED"),
        "expected": outcomes[workload.EXPECTED],
        "shed": len(shed),
        "timeouts": outcomes[workload.TIMEOUT],
        "unexpected": len(unexpected),
        "lost": len(lost),
        "stuck": len(stuck),
        "store_mismatches": len(mismatched),
        "peak_active_runs": peak,
        "throughput_completed_per_s": round(len(completed) / elapsed, 2) if elapsed else 0.0,
    }
    checks = {
        "no_lost_runs": not lost and not stuck,
        "no_timeouts": runs["timeouts"] == 0,
        "no_unexpected_outcomes": not unexpected,
        "store_agrees": not mismatched,
        "runs_completed": runs["completed"] > 0,
        "services_serving": bool(serving) and all(serving.values()),
        "memory_flat": all(s["verdict"] == "flat" for s in rss.values()),
    }
    if config.max_active_runs is not None:
        checks["active_within_capacity"] = peak <= config.max_active_runs
    return {
        "config": {
            "clients": config.clients,
            "seconds": config.seconds,
            "max_active_runs": config.max_active_runs,
            "model_line_delay_ms": config.model_line_delay_ms,
            "seed": config.seed,
            "mix": workload.MIX,
        },
        "elapsed_s": round(elapsed, 2),
        "runs": runs,
        "ended_by": dict(sorted(ended.items())),
        "errors_by_reason": dict(sorted(by_reason.items())),
        "node_errors": dict(sorted(Counter(c for r in records for c in r.node_errors).items())),
        "latency_ms": _percentiles([r.latency_s for r in succeeded]),
        "shed_latency_ms": _percentiles([r.latency_s for r in shed]),
        "kinds": kinds,
        "rss": rss,
        "services_serving": serving,
        "lost_run_ids": lost[:20],
        "stuck_run_ids": stuck[:20],
        "mismatched_run_ids": mismatched[:20],
        "unexpected_examples": [asdict(r) for r in unexpected[:10]],
        "checks": checks,
    }


async def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Start the stack, soak it, check it, stop it; return the summary."""
    if config.workdir is None:
        with tempfile.TemporaryDirectory(prefix="trellis-soak-") as tmp:
            return await _soak_in(config, Path(tmp))
    return await _soak_in(config, config.workdir)


async def _soak_in(config: SoakConfig, workdir: Path) -> dict[str, Any]:
    # The clients call as a real one does, with an API key (generated like
    # ``trellis keys new``: the executor knows only its SHA-256, for tenant "soak").
    key = "trk_" + secrets.token_urlsafe(32)
    executor_env = {
        "TRELLIS_API_KEYS": json.dumps({hashlib.sha256(key.encode()).hexdigest(): TENANT})
    }
    if config.max_active_runs is not None:
        executor_env["TRELLIS_MAX_ACTIVE_RUNS"] = str(config.max_active_runs)
    stack = await start_process_stack(
        workdir,
        model_line_delay_ms=config.model_line_delay_ms,
        per_service={"executor": executor_env},
    )
    try:
        return await _drive(config, stack, (("authorization", f"Bearer {key}"),))
    finally:
        await stack.stop()


async def _drive(
    config: SoakConfig, stack: ProcessStack, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    sampler = RssSampler(stack.pids, interval=config.rss_interval)
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    config = replace(config, seed=seed)
    async with aio.insecure_channel(stack.executor_target) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        sampler.start()
        t0 = time.monotonic()
        soak = _Soak(stub, metadata, t0, t0 + config.seconds)
        await asyncio.gather(
            *(soak.client(i, random.Random(seed * 1000 + i)) for i in range(config.clients))
        )
        elapsed = time.monotonic() - t0
        await sampler.stop()
        stored = await _stored_runs(stub, metadata, [r.run_id for r in soak.records])
    serving = await stack.serving()
    return summarize(
        config,
        soak.records,
        stored,
        elapsed,
        sampler.summary(),
        serving,
    )
