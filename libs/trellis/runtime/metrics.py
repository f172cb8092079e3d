"""Prometheus metrics: every trellis_* (and gen_ai_*) metric is defined here, once.

Names carry units and counters end in ``_total`` (prometheus_client appends it);
labels are bounded (model, tool, outcome, ...). Each service process serves the
default registry on its own /metrics port.

The two OpenTelemetry GenAI client metrics are Prometheus histograms under the names
the OpenTelemetry Prometheus exporter gives them: ``gen_ai.client.token.usage`` (unit
``{token}``, which has no Prometheus suffix) is ``gen_ai_client_token_usage`` and
``gen_ai.client.operation.duration`` (unit ``s``) is
``gen_ai_client_operation_duration_seconds``; attribute names have their dots made
underscores. Buckets are the ones the semantic conventions advise.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

TOOL_CALLS = Counter(
    "trellis_tool_calls", "Tool calls by outcome and cache use.", ["tool", "outcome", "cache"]
)
TOOL_DURATION = Histogram(
    "trellis_tool_duration_seconds", "Time to run one tool call (cache hits included).", ["tool"]
)
TOOL_BATCH_SIZE = Histogram(
    "trellis_tool_batch_size",
    "Calls of a batching tool sent to its backend in one request (1: alone in its window).",
    ["tool"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
TOOL_BATCHES = Counter(
    "trellis_tool_batches", "Requests of batching tools (each carrying 1 or more calls).", ["tool"]
)
TOOL_BATCH_ITEMS = Counter(
    "trellis_tool_batch_items",
    "Calls of batching tools, counted when their request is sent.",
    ["tool"],
)
RUN_DURATION = Histogram(
    "trellis_run_duration_seconds",
    "Wall time of whole runs.",
    ["status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CACHE_REQUESTS = Counter("trellis_cache_requests", "Cache lookups by result.", ["result"])
CACHE_INVALIDATIONS = Counter(
    "trellis_cache_invalidations",
    "Invalidations of a tool's cached results, by cause: side_effect (a call of a tool whose"
    " invalidates names it), explicit (InvalidateCache), reload (the tool changed in the"
    " tools file); outcome ok, or error when the cache did not take it.",
    ["tool", "cause", "outcome"],
)
CACHE_WARM_CALLS = Counter(
    "trellis_cache_warm_calls",
    "Calls of the tools file's warm section: filled (ran, result cached), hit (already"
    " cached), failed, skipped (unknown, uncacheable, or not shared_cache without tenants).",
    ["tool", "outcome"],
)
CACHE_REFRESHES = Counter(
    "trellis_cache_refreshes",
    "Background refreshes of cached results (refresh_ahead), by outcome: refreshed, failed.",
    ["tool", "outcome"],
)
CACHE_STALE_SERVED = Counter(
    "trellis_cache_stale_served",
    "Cache hits answered from an entry in its refresh-ahead window (the last part of its"
    " TTL) while it is refreshed in the background.",
    ["tool"],
)
#: ``tenant`` is empty (absent, to Prometheus) unless cost accounting runs with
#: TRELLIS_METRICS_TENANT_LABEL=true: tenants are unbounded, so the label is opt-in.
TOKENS = Counter(
    "trellis_tokens",
    "Model tokens recorded in the ledger (tenant: only where configured).",
    ["model", "type", "tenant"],
)
COST_USD = Counter(
    "trellis_cost_usd",
    "Spend recorded in the ledger, USD (tenant: only where configured).",
    ["model", "kind", "tenant"],
)

TOOL_BREAKER_STATE = Gauge(
    "trellis_tool_breaker_state",
    "Circuit breaker of each tool: 0 closed, 1 half-open, 2 open.",
    ["tool"],
)
TOOL_SOURCE_UP = Gauge(
    "trellis_tool_source_up",
    "Each tool source of the gateway (MCP server, tool server): 1 when its last listing"
    " succeeded, 0 while connecting or down.",
    ["source"],
)
TOOL_NAME_COLLISIONS = Gauge(
    "trellis_tool_name_collisions",
    "Tools of each source not served because their name is taken (the tools file and"
    " earlier sources win; ListTools names them).",
    ["source"],
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


#: Attributes of both GenAI client metrics (``gen_ai.*`` with ``.`` -> ``_``).
GEN_AI_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
)
GEN_AI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per model call ({token}), by gen_ai_token_type input or output.",
    [*GEN_AI_LABELS, "gen_ai_token_type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
)
GEN_AI_OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of one model call, request to end of stream; error_type is empty on success.",
    [*GEN_AI_LABELS, "error_type"],
    buckets=tuple(0.01 * 2**i for i in range(14)),  # 0.01 s .. 81.92 s
)
MODEL_RATE_LIMITED = Counter(
    "trellis_model_rate_limited",
    "Model calls the planner's rate limits delayed (waited) or refused (rejected).",
    ["model", "outcome"],
)
MODEL_FALLBACKS = Counter(
    "trellis_model_fallbacks",
    "Model calls sent to a fallback model after the previous one failed.",
    ["model", "fallback"],
)
MODEL_BREAKER_STATE = Gauge(
    "trellis_model_breaker_state",
    "Circuit breaker of each model, as this planner last saw it: 0 closed, 1 half-open"
    " (one probe call), 2 open (skipped for the next fallback model).",
    ["model"],
)
BUDGET_REMAINING_USD = Gauge(
    "trellis_budget_remaining_usd",
    "Headroom left under a tenant's tightest budget limit after held estimates, USD"
    " (tenants with a budget only).",
    ["tenant"],
)
BUDGET_CHECKS = Counter(
    "trellis_budget_checks",
    "Budget checks made before a run or a model call, by outcome: allowed, denied (over"
    " budget), unavailable_allowed / unavailable_denied (cost accounting did not answer;"
    " TRELLIS_BUDGET_FAIL_OPEN decided).",
    ["outcome"],
)
USAGE_OUTBOX_PENDING = Gauge(
    "trellis_usage_outbox_pending",
    "Usage events waiting in this process's durable outbox for cost accounting.",
)
USAGE_DELIVERIES = Counter(
    "trellis_usage_deliveries",
    "Usage events sent to cost accounting: delivered, queued (kept in the outbox for a"
    " later try), redelivered (from the outbox) or rejected (refused for good; logged).",
    ["outcome"],
)
RPC_ERRORS = Counter(
    "trellis_rpc_errors",
    "Calls a Trellis server answered with an error, by method, gRPC code and ErrorInfo reason"
    " (refused keys, shed runs, budgets, contract violations...).",
    ["method", "code", "reason"],
)
