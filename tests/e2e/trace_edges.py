"""The parent -> child hops between services that one planned run's trace must show.

Listed once, here, for every trace test (as the OpenTelemetry demo's telemetry tests
keep their service edges): the embedded stack's in-memory spans and the process
stack's spans received over OTLP. An edge is (service of the parent span, service of
the child span) for a child whose parent is in another service: a gRPC client span
and the server span it caused, or a Redis command span under the cache's RPC.
Redis is named as the child "service" of its command spans (``db.system`` redis),
the way Jaeger's dependency graph shows a database.

Cost accounting's run-time RPCs are bookkeeping (``trellis.runtime.rpc_spans``): they
make spans only when they fail, so the edges to ``costs`` are in a trace only then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Why each edge exists, by edge.
EDGES: Mapping[tuple[str, str], str] = {
    ("executor", "costs"): "CheckBudget before the run starts, when it fails",
    ("executor", "toolgateway"): "ListTools and InvokeTool, one per node",
    ("executor", "planner"): "Plan (streamed nodes) and Join (streamed answer)",
    (
        "planner",
        "costs",
    ): "CheckBudget before, RecordUsage(s) after a model call, if they fail",
    ("toolgateway", "planner"): "Generate (Embed) of a model (embed) tool: the planner owns models",
    ("toolgateway", "cache"): "Get before running a cacheable tool, Set after",
    (
        "toolgateway",
        "costs",
    ): "RecordUsages of tool executions (usage outbox batches), if it fails",
    ("cache", "redis"): "the cache's commands, when TRELLIS_REDIS_URL is set",
}

#: The edges only failed bookkeeping makes.
BOOKKEEPING_EDGES: frozenset[tuple[str, str]] = frozenset(e for e in EDGES if e[1] == "costs")
#: Every edge of a planned run whose bookkeeping succeeded, the cache on Redis.
EXPECTED_EDGES: frozenset[tuple[str, str]] = frozenset(EDGES) - BOOKKEEPING_EDGES
#: The edges that need the Redis backend (the embedded stack caches in memory).
REDIS_EDGES: frozenset[tuple[str, str]] = frozenset(e for e in EDGES if e[1] == "redis")
#: The edges only a model tool makes (a run of other tools has none).
MODEL_TOOL_EDGES: frozenset[tuple[str, str]] = frozenset({("toolgateway", "planner")})

REDIS = "redis"
#: The service whose run-time RPCs are bookkeeping, and the one span it had of its own.
_BOOKKEEPING = ("trellis.costs.v1.CostAccountingService/", "trellis.ledger.record")
#: The most of a run's spans bookkeeping may be (the issue's target).
MAX_BOOKKEEPING_SHARE = 0.15


def is_bookkeeping(name: str) -> bool:
    """Whether a span (by name) is budget or usage bookkeeping (GetUsage and SetBudget,
    which a person calls, never appear in a run's trace)."""
    return name.startswith(_BOOKKEEPING[0]) or name == _BOOKKEEPING[1]


def bookkeeping_share(names: Iterable[str]) -> float:
    """The share of spans, by name, that are bookkeeping."""
    names = list(names)
    return sum(map(is_bookkeeping, names)) / len(names)


def node_name(service: str, attributes: Mapping[str, object] | None) -> str:
    """The graph node a span belongs to: its service, or ``redis`` for a Redis command."""
    attributes = attributes or {}
    if REDIS in (attributes.get("db.system"), attributes.get("db.system.name")):
        return REDIS
    return service


def cross_edges(spans: Iterable[tuple[int | str, int | str | None, str]]) -> set[tuple[str, str]]:
    """(parent node, child node) pairs that differ, from (span id, parent id, node) rows."""
    rows = list(spans)
    node_of = {span_id: node for span_id, _, node in rows}
    return {
        (node_of[parent], node)
        for _, parent, node in rows
        if parent in node_of and node_of[parent] != node
    }
