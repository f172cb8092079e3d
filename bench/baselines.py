"""Figures around the Trellis runs: the LangGraph baseline and the Gantt chart.

Both need the ``bench`` extra (``pip install -e '.[bench]'``; ``make bench`` does it).
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import time
from pathlib import Path
from typing import Annotated, TypedDict

from bench.dag_common import CHAIN_LEN, CHAIN_MS, SKEWED_CRITICAL_MS, SLOW_MS


class _State(TypedDict):
    done: Annotated[list[str], operator.add]  # concurrent branches append, never overwrite


def _sleeper(name: str, ms: int):
    async def node(state: _State) -> dict[str, list[str]]:
        await asyncio.sleep(ms / 1000)
        return {"done": [name]}

    return node


def build_skewed_graph():
    """The skewed DAG as a LangGraph StateGraph: async sleeping nodes, join waits for both."""
    from langgraph.graph import END, START, StateGraph

    graph = StateGraph(_State)
    graph.add_node("slow", _sleeper("slow", SLOW_MS))
    chain = [f"c{i}" for i in range(1, CHAIN_LEN + 1)]
    for name in chain:
        graph.add_node(name, _sleeper(name, CHAIN_MS))
    graph.add_node("join", _sleeper("join", 0))
    graph.add_edge(START, "slow")
    graph.add_edge(START, chain[0])
    for a, b in itertools.pairwise(chain):
        graph.add_edge(a, b)
    graph.add_edge(["slow", chain[-1]], "join")  # waits for both branches
    graph.add_edge("join", END)
    return graph.compile()


async def langgraph_skewed_ms(samples: int) -> list[float]:
    """Wall time of ``samples`` invocations of the compiled graph (after one warm-up)."""
    app = build_skewed_graph()
    await app.ainvoke({"done": []})
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        result = await app.ainvoke({"done": []})
        times.append((time.perf_counter() - t0) * 1000)
        assert result["done"][-1] == "join" and len(result["done"]) == CHAIN_LEN + 2, result
    return times


def gantt(
    intervals: dict[str, tuple[float, float]], wall_ms: float, path: Path, title: str
) -> None:
    """A PNG Gantt chart of one run's nodes (ms since the request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(intervals, key=lambda n: (intervals[n][0], n))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(order) + 1.4))
    for row, node in enumerate(order):
        start, end = intervals[node]
        ax.barh(row, max(end - start, 1.0), left=start, height=0.6, color="tab:blue")
        ax.text(end + 4, row, f"{end - start:.0f} ms", va="center", fontsize=8)
    ax.axvline(SKEWED_CRITICAL_MS, color="tab:green", ls="--", lw=1, label="critical path")
    ax.axvline(wall_ms, color="tab:red", ls=":", lw=1, label="finished at client")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("ms since Run request")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    ax.set_xlim(0, max(wall_ms, SKEWED_CRITICAL_MS) * 1.12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
