"""Prometheus metrics: every trellis_* metric is defined here, once.

Names carry units and counters end in ``_total`` (prometheus_client appends it);
labels are bounded (model, tool, outcome, ...). Each service process serves the
default registry on its own /metrics port.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TOOL_CALLS = Counter(
    "trellis_tool_calls", "Tool calls by outcome and cache use.", ["tool", "outcome", "cache"]
)
TOOL_DURATION = Histogram(
    "trellis_tool_duration_seconds", "Time to run one tool call (cache hits included).", ["tool"]
)
RUN_DURATION = Histogram(
    "trellis_run_duration_seconds",
    "Wall time of whole runs.",
    ["status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CACHE_REQUESTS = Counter("trellis_cache_requests", "Cache lookups by result.", ["result"])
TOKENS = Counter("trellis_tokens", "Model tokens recorded in the ledger.", ["model", "type"])
COST_USD = Counter("trellis_cost_usd", "Spend recorded in the ledger, USD.", ["model", "kind"])

TOOL_BREAKER_STATE = Gauge(
    "trellis_tool_breaker_state",
    "Circuit breaker of each tool: 0 closed, 1 half-open, 2 open.",
    ["tool"],
)
UNKNOWN_MODEL_PRICES = Counter(
    "trellis_unknown_model_prices",
    "Usage events recorded at cost 0 because the model has no price.",
    ["model"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics on ``port`` (0 = off); return the port served."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
