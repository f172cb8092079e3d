"""The floor figures: the process benchmark's DAGs over ``bench.floor_stack``.

Measured in the same run as the stack's figures (``processes.floor.*``), with the same
DAGs, samples and client load: skewed DAG over its critical path, chain overhead per
node, fan-out wall time, echo-run throughput and the CPU the two processes spent per
node. What a Trellis figure adds to these is Trellis's own cost; what these are is the
machine's (two Python gRPC hops per node, wake-ups of idle processes, timer slack).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from grpc import aio

from bench import proc_cpu
from bench.dag_common import SKEWED_CRITICAL_MS, r, skewed_plan
from bench.executor_bench import (
    CHAIN,
    CHAIN_STEP_MS,
    FAN_OUT,
    FAN_OUT_MS,
    chain_plan,
    echo_plan,
    fan_out_plan,
)
from bench.floor_stack import RUN_METHOD, identity
from trellis.common.v1 import common_pb2
from trellis.runtime.ports import free_port

_ROOT = Path(__file__).resolve().parent.parent
_READY_SECONDS = 20.0


def floor_nodes(plan: Sequence[common_pb2.ToolCall]) -> bytes:
    """A Trellis plan as the floor executor's nodes: a sleep sleeps its ``ms``, others 0."""
    nodes = [
        {
            "id": call.node_id,
            "ms": int(call.args["ms"]) if call.tool == "sleep" else 0,
            "deps": list(call.depends_on),
        }
        for call in plan
    ]
    return json.dumps(nodes).encode()


@asynccontextmanager
async def floor_stack() -> AsyncIterator[tuple[Callable[[bytes], Any], dict[str, int]]]:
    """Both floor processes, and a ``run(nodes) -> wall ms`` over them; stopped after."""
    gateway_port, executor_port = free_port(), free_port()
    # ``bench`` from this checkout; grpc from the same interpreter's packages
    path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    module = [sys.executable, "-m", "bench.floor_stack"]
    procs = {
        "gateway": await asyncio.create_subprocess_exec(
            *module, "gateway", str(gateway_port), env=env
        ),
        "executor": await asyncio.create_subprocess_exec(
            *module, "executor", str(executor_port), f"127.0.0.1:{gateway_port}", env=env
        ),
    }
    channel = aio.insecure_channel(f"127.0.0.1:{executor_port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), _READY_SECONDS)
        call = channel.unary_stream(
            RUN_METHOD, request_serializer=identity, response_deserializer=identity
        )

        async def run(nodes: bytes) -> float:
            t0 = time.perf_counter()
            async for _ in call(nodes, timeout=60):
                pass
            return (time.perf_counter() - t0) * 1000

        yield run, {name: proc.pid for name, proc in procs.items()}
    finally:
        await channel.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _median_wall(run: Callable[[bytes], Any], nodes: bytes, samples: int) -> float:
    await run(nodes)  # warm-up
    return statistics.median([await run(nodes) for _ in range(samples)])


async def measure(samples: int, clients: int, runs_each: int) -> dict[str, Any]:
    """The floor's figures, named as the stack's are."""
    async with floor_stack() as (run, pids):
        skewed = await _median_wall(run, floor_nodes(skewed_plan()), samples)
        chain = await _median_wall(run, floor_nodes(chain_plan()), samples)
        fan_out = await _median_wall(run, floor_nodes(fan_out_plan()), samples)
        echo = floor_nodes(echo_plan())
        await run(echo)
        before = proc_cpu.snapshot(pids)

        async def one_client() -> None:
            for _ in range(runs_each):
                await run(echo)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
        spent = proc_cpu.spent(before, proc_cpu.snapshot(pids))
    nodes = clients * runs_each * len(echo_plan())
    return {
        "what": "bare grpc.aio: an executor process streaming one message per node, "
        "a gateway process whose tool sleeps; no store, spans or checks",
        "skewed_dag": {
            "measured_ms": r(skewed),
            "trellis_over_critical": r(skewed / SKEWED_CRITICAL_MS, 4),
        },
        "chain": {
            "measured_ms": r(chain),
            "overhead_per_node_ms": r((chain - CHAIN * CHAIN_STEP_MS) / CHAIN, 3),
        },
        "fan_out": {"measured_ms": r(fan_out), "nodes": FAN_OUT, "ideal_ms": FAN_OUT_MS},
        "throughput": {"nodes": nodes, "nodes_per_s": r(nodes / elapsed, 1)},
        "cpu_ms_per_node": r(sum(spent.values()) / nodes, 3),
    }
