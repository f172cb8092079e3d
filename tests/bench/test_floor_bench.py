"""The floor benchmark: the process benchmark's DAGs over two bare grpc.aio processes.

Checks that a Trellis plan becomes the floor executor's nodes as it should (sleeps keep
their ms, dependencies kept, other tools take 0 ms), that the floor executor really runs
the DAG (a chain of sleeps takes at least its sum, independent sleeps overlap), and that
a tiny measurement gives every figure as a finite number, and that a node that fails ends
its Run at once (a floor run never hangs until its timeout). No speed is held to here.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest
from grpc import aio

from bench import floor_bench
from bench.dag_common import call, skewed_plan


def test_a_plan_becomes_floor_nodes() -> None:
    nodes = json.loads(floor_bench.floor_nodes(skewed_plan()))
    by_id = {node["id"]: node for node in nodes}
    assert by_id["slow"] == {"id": "slow", "ms": 300, "deps": []}
    assert by_id["c2"] == {"id": "c2", "ms": 50, "deps": ["c1"]}
    assert by_id["join"] == {"id": "join", "ms": 0, "deps": ["slow", "c4"]}  # echo: no sleep


@pytest.mark.timeout(60)
async def test_the_floor_executor_runs_the_dag() -> None:
    chain = [call(f"s{i}", "sleep", [f"s{i - 1}"] if i else [], ms=40) for i in range(3)]
    fan = [call(f"f{i}", "sleep", ms=40) for i in range(3)]
    async with floor_bench.floor_stack() as (run, pids):
        assert set(pids) == {"gateway", "executor"}
        chain_ms = await run(floor_bench.floor_nodes(chain))
        fan_ms = await run(floor_bench.floor_nodes(fan))
    assert chain_ms >= 120  # one after another
    assert fan_ms < 120  # side by side


@pytest.mark.timeout(120)
async def test_a_tiny_floor_measurement_gives_every_figure() -> None:
    figures = await floor_bench.measure(samples=1, clients=2, runs_each=2)
    for name in ("skewed_dag", "chain", "fan_out"):
        assert math.isfinite(figures[name]["measured_ms"]) and figures[name]["measured_ms"] > 0
    assert figures["skewed_dag"]["trellis_over_critical"] >= 1
    assert figures["throughput"]["nodes"] == 2 * 2 * 5
    assert figures["throughput"]["nodes_per_s"] > 0
    # /proc counts CPU in clock ticks (10 ms): 20 echo nodes may round to 0
    assert math.isfinite(figures["cpu_ms_per_node"]) and figures["cpu_ms_per_node"] >= 0


@pytest.mark.timeout(60)
async def test_a_failing_floor_node_fails_the_run_at_once() -> None:
    bad = json.dumps([{"id": "a", "ms": 0, "deps": ["nowhere"]}]).encode()
    async with floor_bench.floor_stack() as (run, _):
        with pytest.raises(aio.AioRpcError) as failed:
            await run(bad)
    assert failed.value.code() == grpc.StatusCode.UNKNOWN  # the bare server's own answer
