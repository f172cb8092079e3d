"""Executor figures (issue 4), timed at a gRPC client of the full embedded stack.

One ``trellis_cli.stack.start_stack`` (five services + the offline model, real gRPC between
them, SQLite run store in a temporary directory) serves every section; tracing is on
throughout (every service's spans go to an in-memory exporter through a
``BatchSpanProcessor``). Runs use explicit plans (``RunRequest.plan``) except
``streamed_plan``, which goes through the planner and the offline model.

- ``skewed_dag``: one 300 ms ``sleep`` beside a chain of four 50 ms ``sleep``s, joined by an
  ``echo`` depending on both. ``trellis_ms``: median of 5 runs, Run request → ``finished``
  at the client. ``critical_path_ms`` is the ideal max(300, 4x50) + 0 (join ≈ 0).
  ``sequential_ms`` is *measured*: the same six calls sent one after another straight to the
  gateway (InvokeTool), summed; ``sequential_ideal_ms`` is 500. ``langgraph_ms``: the same
  DAG as a LangGraph StateGraph of async sleeping nodes (median of 5).
- ``fan_out``: 50 independent 100 ms sleeps with ``RunOptions.max_parallel = 50`` (the
  executor's default is 16, which would make the ideal 4 x 100 ms); ``chain``: 20 x 10 ms.
- ``streamed_plan``: per plan format (``streamed_plan.<format>.*``), see ``bench.streamed_plan``.
- ``throughput``: 50 concurrent clients x 20 runs of a 5-node ``echo`` plan.
  ``overhead_*`` is each run's wall time minus its ideal (0 ms).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench import baselines, streamed_plan
from bench.dag_common import (
    SKEWED_CRITICAL_MS,
    SKEWED_SEQUENTIAL_IDEAL_MS,
    call,
    median,
    percentile_ms,
    r,
    skewed_plan,
    timed_run,
)
from trellis.clients.executor import ExecutorClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cli.stack import start_stack

#: figure -> (comparison, bound)
TARGETS: dict[str, tuple[str, float]] = {
    "skewed_dag.trellis_over_critical": ("<=", 1.05),
    **{
        f"streamed_plan.{fmt}.emit_to_start_p50_ms": ("<=", 2.0)
        for fmt in streamed_plan.FORMAT_MODELS
    },
}

GANTT_PATH = Path(__file__).parent / "results" / "skewed_dag_gantt.png"
#: The sections this module measures (``python -m bench --only <section>``).
SECTIONS = ("skewed_dag", "fan_out", "chain", "streamed_plan", "throughput")
FAN_OUT, FAN_OUT_MS = 50, 100
CHAIN, CHAIN_STEP_MS = 20, 10


async def measure_skewed(
    client: ExecutorClient, gateway: ToolGatewayClient, samples: int
) -> dict[str, Any]:
    await timed_run(client, executor_pb2.RunRequest(plan=skewed_plan()))  # warm-up
    runs = [
        await timed_run(client, executor_pb2.RunRequest(plan=skewed_plan())) for _ in range(samples)
    ]
    walls = [run.wall_ms for run in runs]
    trellis_ms = median(walls)
    typical = min(runs, key=lambda run: abs(run.wall_ms - trellis_ms))
    intervals = typical.intervals_ms()
    baselines.gantt(
        intervals,
        typical.wall_ms,
        GANTT_PATH,
        f"Trellis, skewed DAG: finished at {typical.wall_ms:.1f} ms "
        f"(critical path {SKEWED_CRITICAL_MS} ms)",
    )
    sequential = await sequential_through_gateway(gateway)
    langgraph_ms = median(await baselines.langgraph_skewed_ms(samples))
    join_start = intervals["join"][0]
    return {
        "critical_path_ms": SKEWED_CRITICAL_MS,
        "trellis_ms": r(trellis_ms),
        "trellis_min_ms": r(min(walls)),
        "trellis_max_ms": r(max(walls)),
        # from the median run's NodeOutcome timestamps, ms since the Run request
        "slow_started_at_ms": r(intervals["slow"][0]),
        "slow_finished_at_ms": r(intervals["slow"][1]),
        "join_started_at_ms": r(join_start),
        "sequential_ms": r(sequential),
        "sequential_ideal_ms": SKEWED_SEQUENTIAL_IDEAL_MS,
        "langgraph_ms": r(langgraph_ms),
        "trellis_over_critical": r(trellis_ms / SKEWED_CRITICAL_MS, 4),
        "langgraph_over_critical": r(langgraph_ms / SKEWED_CRITICAL_MS, 4),
        "runs": samples,
    }


async def sequential_through_gateway(gateway: ToolGatewayClient) -> float:
    """The six calls of the skewed DAG, one after another, InvokeTool straight to the gateway."""
    run_id = f"bench-seq-{uuid.uuid4().hex[:8]}"
    total = 0.0
    for node in skewed_plan():
        if node.tool == "echo":
            node = call(node.node_id, "echo", value="300+50")  # refs are the executor's job
        request = toolgateway_pb2.InvokeToolRequest(
            call=node, run_id=run_id, idempotency_key=f"{run_id}/{node.node_id}"
        )
        t0 = time.perf_counter()
        await gateway.invoke(request)
        total += (time.perf_counter() - t0) * 1000
    return total


async def measure_shape(
    client: ExecutorClient, plan_of, ideal_ms: float, samples: int, max_parallel: int = 0
) -> dict[str, Any]:
    options = executor_pb2.RunOptions(max_parallel=max_parallel)
    await timed_run(client, executor_pb2.RunRequest(plan=plan_of(), options=options))  # warm-up
    runs = [
        await timed_run(client, executor_pb2.RunRequest(plan=plan_of(), options=options))
        for _ in range(samples)
    ]
    walls = [run.wall_ms for run in runs]
    measured = median(walls)
    typical = min(runs, key=lambda run: abs(run.wall_ms - measured))
    spans = typical.intervals_ms().values()
    starts = [start for start, _ in spans]
    figures = {
        "ideal_ms": ideal_ms,
        "measured_ms": r(measured),
        "ratio": r(measured / ideal_ms, 4),
        "overhead_per_node_ms": r((measured - ideal_ms) / len(starts), 3),
        # tool start times (gateway clock) in the median run: how spread out dispatch was
        "first_tool_start_ms": r(min(starts)),
        "last_tool_start_ms": r(max(starts)),
        "last_tool_end_ms": r(max(end for _, end in spans)),
        "runs": samples,
    }
    if max_parallel:
        figures["max_parallel"] = max_parallel
    return figures


def fan_out_plan():
    return [call(f"f{i}", "sleep", ms=FAN_OUT_MS) for i in range(FAN_OUT)]


def chain_plan():
    return [
        call(f"s{i}", "sleep", [f"s{i - 1}"] if i else [], ms=CHAIN_STEP_MS) for i in range(CHAIN)
    ]


def echo_plan():
    return [
        call("e1", "echo", value=1),
        call("e2", "echo", value=2),
        call("e3", "echo", value=3),
        call("e4", "echo", ["e1", "e2"], value="${e1}+${e2}"),
        call("e5", "echo", ["e3", "e4"], value="$e4"),
    ]


async def drive_echo_runs(
    client: ExecutorClient, clients: int, runs_each: int
) -> tuple[list[float], float]:
    """``clients`` concurrent clients each running ``runs_each`` echo plans one after
    another: every run's wall time (ms) and the elapsed seconds of the whole load."""
    walls: list[float] = []

    async def one_client() -> None:
        for _ in range(runs_each):
            run = await timed_run(client, executor_pb2.RunRequest(plan=echo_plan()))
            walls.append(run.wall_ms)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return walls, time.perf_counter() - t0


def throughput_figures(walls: list[float], elapsed: float, clients: int) -> dict[str, Any]:
    nodes = len(walls) * len(echo_plan())
    return {
        "concurrent_clients": clients,
        "runs": len(walls),
        "nodes": nodes,
        "nodes_per_run": len(echo_plan()),
        "elapsed_s": r(elapsed, 3),
        "nodes_per_s": r(nodes / elapsed, 1),
        "runs_per_s": r(len(walls) / elapsed, 1),
        "overhead_p50_ms": r(percentile_ms(walls, 50)),
        "overhead_p99_ms": r(percentile_ms(walls, 99)),
    }


async def measure_throughput(
    client: ExecutorClient, exporter: InMemorySpanExporter, clients: int, runs_each: int
) -> dict[str, Any]:
    await timed_run(client, executor_pb2.RunRequest(plan=echo_plan()))
    exporter.clear()
    walls, elapsed = await drive_echo_runs(client, clients, runs_each)
    return {
        **throughput_figures(walls, elapsed, clients),
        "tracing": "on (BatchSpanProcessor -> in-memory exporter)",
    }


async def run(*, quick: bool = False, only: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every section, or those in ``only``."""
    wanted = set(only or SECTIONS)
    samples = 3 if quick else 5
    exporter = InMemorySpanExporter()
    processor = BatchSpanProcessor(exporter)
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trellis-bench-") as tmp:
        stack = await start_stack(
            database_url=f"sqlite:///{tmp}/bench.db",
            span_processors=[processor],
            model_plan_formats={m: f for f, m in streamed_plan.FORMAT_MODELS.items()},
        )
        channels = Channels()
        try:
            client = ExecutorClient(channels.get(stack.executor_target))
            gateway = ToolGatewayClient(channels.get(stack.target("toolgateway")))
            if "skewed_dag" in wanted:
                sections["skewed_dag"] = await measure_skewed(client, gateway, samples)
            if "fan_out" in wanted:
                sections["fan_out"] = await measure_shape(
                    client, fan_out_plan, FAN_OUT_MS, samples, max_parallel=FAN_OUT
                )
                sections["fan_out"]["nodes"] = FAN_OUT
            if "chain" in wanted:
                sections["chain"] = await measure_shape(
                    client, chain_plan, CHAIN * CHAIN_STEP_MS, samples
                )
                sections["chain"]["nodes"] = CHAIN
            if "streamed_plan" in wanted:
                sections["streamed_plan"] = await streamed_plan.measure(
                    stack, client, 2 if quick else 3
                )
            if "throughput" in wanted:
                exporter.clear()
                sections["throughput"] = await measure_throughput(
                    client, exporter, clients=50, runs_each=4 if quick else 20
                )
                processor.force_flush()
                sections["throughput"]["spans_exported"] = len(exporter.get_finished_spans())
        finally:
            await channels.close()
            await stack.stop()
            processor.shutdown()
    return sections
