"""Executor figures in the deployed topology: the five services as processes (issue 20).

The stack is started as ``trellis up`` runs it (``trellis_cli.processes``: ``python -m
<service>`` per service on loopback ports) twice: over SQLite (a file per service), and
over PostgreSQL + Redis (the executor's runs and cost accounting's ledger in a database
made for the run and dropped after; the cache, the gateway's idempotency keys and the
planner's limits in Redis under keys of this run's own prefix, deleted after). API keys
are on (the executor's default), and tracing is on with 100 % sampling, exported by
each service's ``BatchSpanProcessor`` over OTLP/gRPC to ``bench.otlp_sink``.

The DAGs and figures are the embedded benchmark's (``bench.executor_bench``), timed at a
gRPC client in this process, medians of 5 after a warm-up run:

- ``skewed_dag``: 300 ms ‖ 4 x 50 ms chain, echo join; ``trellis_over_critical`` is the
  median wall time over the critical path (300 ms).
- ``chain`` (20 x 10 ms): ``overhead_per_node_ms`` = (median wall - 200 ms) / 20.
- ``fan_out`` (50 x 100 ms, ``max_parallel`` 50): ``measured_ms``.
- ``throughput``: 50 clients x 20 runs of the 5-node echo plan (zero-latency tools);
  ``cpu_ms_per_node`` is the user + system CPU the five service processes spent over
  that phase (``/proc/<pid>/stat``), divided by its nodes.
- ``floor``: the same DAGs and load over bare grpc.aio processes (``bench.floor_bench``),
  measured first in the same run: what the machine gives before any Trellis code.
- ``spans``: the skewed runs' traces as the sink received them once the stack stopped
  (a SIGTERM flushes every batched span): spans per run and the share of cost-accounting
  bookkeeping spans.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import floor_bench, proc_cpu
from bench.dag_common import SKEWED_CRITICAL_MS, r, skewed_plan, timed_run
from bench.executor_bench import (
    CHAIN,
    CHAIN_STEP_MS,
    FAN_OUT,
    FAN_OUT_MS,
    chain_plan,
    drive_echo_runs,
    echo_plan,
    fan_out_plan,
    measure_shape,
    throughput_figures,
)
from bench.otlp_sink import RunningSink, span_figures, start_sink
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis_cli.processes import ProcessStack, start_process_stack

BACKENDS = ("sqlite", "postgres")
#: Where the PostgreSQL backend makes its database, and the Redis it uses.
POSTGRES_ADMIN_URL = os.environ.get(
    "TRELLIS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TRELLIS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

#: figure -> (comparison, bound): the issue's targets for the deployed topology.
TARGETS: dict[str, tuple[str, float]] = {
    "processes.sqlite.skewed_dag.trellis_over_critical": ("<=", 1.02),
    "processes.postgres.skewed_dag.trellis_over_critical": ("<=", 1.03),
    "processes.sqlite.throughput.nodes_per_s": (">=", 1000.0),
    "processes.postgres.throughput.nodes_per_s": (">=", 800.0),
    **{
        f"processes.{backend}.{name}": bound
        for backend in BACKENDS
        for name, bound in (
            ("chain.overhead_per_node_ms", ("<=", 1.5)),
            ("fan_out.measured_ms", ("<=", 130.0)),
            ("spans.bookkeeping_span_share", ("<=", 0.15)),
        )
    },
}

#: Tracing as a deployment has it: every span sampled, exported in batches over OTLP/gRPC.
TRACING_ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    "OTEL_EXPORTER_OTLP_INSECURE": "true",
    "OTEL_TRACES_SAMPLER": "parentbased_always_on",
}


@dataclass(frozen=True)
class Workload:
    """How much each phase runs (``tiny`` for the test, ``quick`` for a smoke run)."""

    samples: int = 5
    clients: int = 50
    runs_each: int = 20

    @classmethod
    def quick(cls) -> Workload:
        return cls(samples=3, clients=50, runs_each=4)

    @classmethod
    def tiny(cls) -> Workload:
        return cls(samples=1, clients=2, runs_each=2)


@asynccontextmanager
async def backend_env(backend: str) -> AsyncIterator[dict[str, str]]:
    """The services' environment for ``backend``; what it made is removed afterwards.

    SQLite needs nothing (``start_process_stack`` gives each service its own files).
    PostgreSQL gets a database ``trellis_bench_<pid>_<random>`` for the executor and cost
    accounting (dropped after); Redis a key prefix of this run for the cache and the
    gateway's idempotency keys (deleted after).
    """
    if backend == "sqlite":
        yield {}
        return
    if backend != "postgres":
        raise ValueError(f"unknown backend {backend!r}")
    name = f"trellis_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    prefix = f"trellis-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}:"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        yield {
            "TRELLIS_DATABASE_URL": f"{base}/{name}",
            "TRELLIS_REDIS_URL": REDIS_URL,
            "TRELLIS_CACHE_REDIS_PREFIX": f"{prefix}cache:",
            "TRELLIS_IDEMPOTENCY_REDIS_PREFIX": f"{prefix}idem:",
        }
    finally:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
            await _delete_keys(prefix)


async def _delete_keys(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


def api_key_env() -> tuple[str, dict[str, str]]:
    """A new API key and the executor's ``TRELLIS_API_KEYS`` knowing its hash."""
    key = "trk_" + secrets.token_urlsafe(32)
    keys = json.dumps({hashlib.sha256(key.encode()).hexdigest(): "bench"})
    return key, {"TRELLIS_API_KEYS": keys}


@asynccontextmanager
async def running_stack(
    backend: str, workdir: Path, sink: RunningSink, tracing_env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[ProcessStack, ExecutorClient]]:
    """The stack as processes over ``backend``, tracing to ``sink``, and a client with
    an API key; stopped (spans flushed) on the way out."""
    key, executor_env = api_key_env()
    async with backend_env(backend) as store_env:
        stack = await start_process_stack(
            workdir,
            common_env={
                **store_env,
                **TRACING_ENV,
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                **(tracing_env or {}),
            },
            per_service={"executor": executor_env},
        )
        channels = Channels()
        try:
            yield stack, ExecutorClient(channels.get(stack.executor_target), api_key=key)
        finally:
            await channels.close()
            await stack.stop()


async def measure_throughput(
    stack: ProcessStack, client: ExecutorClient, workload: Workload
) -> dict[str, Any]:
    """Echo runs from many clients, with the CPU the services spent meanwhile."""
    await timed_run(client, executor_pb2.RunRequest(plan=echo_plan()))  # warm-up
    pids = stack.service_pids
    before, client_before = proc_cpu.snapshot(pids), proc_cpu.cpu_ms(os.getpid())
    walls, elapsed = await drive_echo_runs(client, workload.clients, workload.runs_each)
    spent = proc_cpu.spent(before, proc_cpu.snapshot(pids))
    client_spent = proc_cpu.cpu_ms(os.getpid()) - client_before
    figures = throughput_figures(walls, elapsed, workload.clients)
    nodes = figures["nodes"]
    figures["cpu_ms_per_node"] = r(sum(spent.values()) / nodes, 3)
    figures["cpu_ms_per_node_by_service"] = {name: r(ms / nodes, 3) for name, ms in spent.items()}
    # the benchmark's own process (client + sink) shares the two cores: shown, not counted
    figures["bench_process_cpu_ms_per_node"] = r(client_spent / nodes, 3)
    return figures


async def measure_backend(
    backend: str,
    sink: RunningSink,
    workload: Workload,
    workdir: Path,
    tracing_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every figure of one backend: latency shapes, throughput, then the spans."""
    figures: dict[str, Any] = {
        "store": "sqlite" if backend == "sqlite" else "postgresql + redis",
        "auth": "api key",
        "tracing": "100 % sampled, BatchSpanProcessor -> OTLP/gRPC -> sink",
    }
    trace_ids: list[str] = []
    async with running_stack(backend, workdir, sink, tracing_env) as (stack, client):
        skewed = await measure_shape(client, skewed_plan, SKEWED_CRITICAL_MS, workload.samples)
        skewed["critical_path_ms"] = SKEWED_CRITICAL_MS
        skewed["trellis_over_critical"] = skewed["ratio"]
        figures["skewed_dag"] = skewed
        for _ in range(workload.samples):  # runs whose traces are counted below
            run = await timed_run(client, executor_pb2.RunRequest(plan=skewed_plan()))
            trace_ids.append(run.events[0][1].started.trace_id)
        figures["chain"] = await measure_shape(
            client, chain_plan, CHAIN * CHAIN_STEP_MS, workload.samples
        )
        figures["chain"]["nodes"] = CHAIN
        figures["fan_out"] = await measure_shape(
            client, fan_out_plan, FAN_OUT_MS, workload.samples, max_parallel=FAN_OUT
        )
        figures["fan_out"]["nodes"] = FAN_OUT
        figures["throughput"] = await measure_throughput(stack, client, workload)
    # stopped: every service flushed its batched spans on SIGTERM
    await sink.sink.settle(trace_ids, quiet=0.5, within=15.0)
    traces = sink.sink.counts.of_traces(trace_ids)
    if not all(traces):
        raise RuntimeError(f"the OTLP sink received no spans for {traces.count({})} skewed runs")
    figures["spans"] = {"dag": "skewed_dag (6 nodes)", **span_figures(traces)}
    figures["cpu_ms_per_node"] = figures["throughput"]["cpu_ms_per_node"]
    return figures


async def run(*, quick: bool = False, workload: Workload | None = None) -> dict[str, Any]:
    """Both backends, one after the other, each with a fresh stack and sink."""
    workload = workload or (Workload.quick() if quick else Workload())
    results: dict[str, Any] = {
        "floor": await floor_bench.measure(workload.samples, workload.clients, workload.runs_each)
    }
    for backend in BACKENDS:
        sink = await start_sink()
        try:
            with tempfile.TemporaryDirectory(prefix=f"trellis-bench-{backend}-") as tmp:
                results[backend] = await measure_backend(backend, sink, workload, Path(tmp))
        finally:
            await sink.stop()
    return {"processes": results}
