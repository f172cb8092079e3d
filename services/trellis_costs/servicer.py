"""CostAccountingService over gRPC: protos in, ``Ledger`` calls, protos out.

Contract checks live here because they name proto fields; the tenant comes from the
request scope (``x-tenant-id``). Prometheus cost and token counters move only when a
new ledger row is written, so retries and resumes never inflate them.
"""

from __future__ import annotations

from datetime import UTC

from grpc import aio

from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.runtime.context import tenant as current_tenant
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import COST_USD, TOKENS, UNKNOWN_MODEL_PRICES
from trellis_costs.ledger import Budget, Ledger, UsageEvent, UsageKind, UsageRow, parse_day

log = get_logger(__name__)

_KINDS = {costs_pb2.USAGE_KIND_MODEL: UsageKind.MODEL, costs_pb2.USAGE_KIND_TOOL: UsageKind.TOOL}
#: Bound on the models remembered for warn-once; past it every unknown model warns.
_MAX_WARNED_MODELS = 1024


class CostAccountingServicer(costs_pb2_grpc.CostAccountingServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._warned_models: set[str] = set()

    async def RecordUsage(
        self, request: costs_pb2.RecordUsageRequest, context: aio.ServicerContext
    ) -> costs_pb2.RecordUsageResponse:
        event = _usage_event(request, current_tenant())
        recorded = await self._ledger.record(event)
        if not recorded.duplicate:
            _count(event, recorded.cost_nano_usd)
            if not recorded.price_known:
                UNKNOWN_MODEL_PRICES.labels(model=event.model).inc()
                self._warn_unknown_model(event)
        return costs_pb2.RecordUsageResponse(
            cost_nano_usd=recorded.cost_nano_usd, duplicate=recorded.duplicate
        )

    async def CheckBudget(
        self, request: costs_pb2.CheckBudgetRequest, context: aio.ServicerContext
    ) -> costs_pb2.CheckBudgetResponse:
        if request.estimated_cost_nano_usd < 0:
            raise _invalid("estimated_cost_nano_usd", "must be >= 0")
        check = await self._ledger.check_budget(current_tenant(), request.estimated_cost_nano_usd)
        return costs_pb2.CheckBudgetResponse(
            allowed=check.allowed,
            daily_limit_nano_usd=check.daily_limit_nano_usd,
            spent_today_nano_usd=check.spent_today_nano_usd,
            remaining_nano_usd=check.remaining_nano_usd,
        )

    async def SetBudget(
        self, request: costs_pb2.SetBudgetRequest, context: aio.ServicerContext
    ) -> costs_pb2.SetBudgetResponse:
        violations = [
            FieldViolation(name, "must be >= 0 (0 = no limit)")
            for name in ("daily_limit_nano_usd", "monthly_limit_nano_usd")
            if getattr(request, name) < 0
        ]
        if violations:
            raise InvalidArgument(
                "budget limits must not be negative", reason="INVALID_BUDGET", violations=violations
            )
        await self._ledger.set_budget(
            Budget(
                request.tenant_id or current_tenant(),
                request.daily_limit_nano_usd,
                request.monthly_limit_nano_usd,
            )
        )
        return costs_pb2.SetBudgetResponse()

    async def GetUsage(
        self, request: costs_pb2.GetUsageRequest, context: aio.ServicerContext
    ) -> costs_pb2.GetUsageResponse:
        start_day, end_day = _window(request, self._ledger.today())
        report = await self._ledger.usage(request.tenant_id or current_tenant(), start_day, end_day)
        return costs_pb2.GetUsageResponse(
            rows=[_usage_row(row) for row in report.rows],
            total_cost_nano_usd=report.total_cost_nano_usd,
        )

    def _warn_unknown_model(self, event: UsageEvent) -> None:
        if event.model in self._warned_models:
            return
        if len(self._warned_models) < _MAX_WARNED_MODELS:
            self._warned_models.add(event.model)
        log.warning(
            "no price for model; recorded at cost 0",
            model=event.model,
            usage_id=event.usage_id,
            tenant_id=event.tenant_id,
        )


def _invalid(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
    return InvalidArgument(
        f"{field} {description}", reason=reason, violations=[FieldViolation(field, description)]
    )


def _usage_event(request: costs_pb2.RecordUsageRequest, tenant_id: str) -> UsageEvent:
    """The request as a ledger event, or InvalidArgument listing every bad field."""
    if not request.usage_id:
        raise _invalid("usage_id", "is required", reason="USAGE_ID_REQUIRED")
    usage = request.usage
    kind = _KINDS.get(request.kind)
    violations: list[FieldViolation] = []
    if kind is None:
        violations.append(FieldViolation("kind", "must be USAGE_KIND_MODEL or USAGE_KIND_TOOL"))
    elif kind is UsageKind.MODEL and not usage.model:
        violations.append(FieldViolation("usage.model", "is required for a model call"))
    elif kind is UsageKind.TOOL and not request.tool:
        violations.append(FieldViolation("tool", "is required for a tool call"))
    for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
        if getattr(usage, name) < 0:
            violations.append(FieldViolation(f"usage.{name}", "must be >= 0"))
    if usage.cached_input_tokens > max(usage.input_tokens, 0):
        violations.append(
            FieldViolation("usage.cached_input_tokens", "must not exceed usage.input_tokens")
        )
    if request.tool_cost_nano_usd < 0:
        violations.append(FieldViolation("tool_cost_nano_usd", "must be >= 0"))
    if violations:
        raise InvalidArgument(
            "usage event breaks its contract", reason="INVALID_USAGE", violations=violations
        )
    assert kind is not None  # a missing kind is a violation above
    return UsageEvent(
        usage_id=request.usage_id,
        tenant_id=tenant_id,
        kind=kind,
        run_id=request.run_id,
        node_id=request.node_id,
        model=usage.model,
        tool=request.tool,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        tool_cost_nano_usd=request.tool_cost_nano_usd if kind is UsageKind.TOOL else 0,
        estimated=request.estimated,
        occurred_at=(
            request.occurred_at.ToDatetime(tzinfo=UTC) if request.HasField("occurred_at") else None
        ),
    )


def _count(event: UsageEvent, cost_nano_usd: int) -> None:
    COST_USD.labels(model=event.name, kind=event.kind.value).inc(cost_nano_usd / 1e9)
    if event.kind is UsageKind.MODEL:
        TOKENS.labels(model=event.model, type="input").inc(event.input_tokens)
        TOKENS.labels(model=event.model, type="output").inc(event.output_tokens)
        TOKENS.labels(model=event.model, type="cached_input").inc(event.cached_input_tokens)


def _window(request: costs_pb2.GetUsageRequest, today: str) -> tuple[str, str]:
    days: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for name in ("start_day", "end_day"):
        try:
            days[name] = parse_day(getattr(request, name) or today)
        except ValueError as error:
            violations.append(FieldViolation(name, str(error)))
    if not violations and days["start_day"] > days["end_day"]:
        violations.append(FieldViolation("end_day", "must not be before start_day"))
    if violations:
        raise InvalidArgument("bad window of days", reason="INVALID_DAY", violations=violations)
    return days["start_day"], days["end_day"]


def _usage_row(row: UsageRow) -> costs_pb2.UsageRow:
    # UsageRow has no kind field: tools are told apart from models by a prefix.
    name = f"tool:{row.name}" if row.kind is UsageKind.TOOL else row.name
    return costs_pb2.UsageRow(
        tenant_id=row.tenant_id,
        day=row.day,
        model=name,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_input_tokens=row.cached_input_tokens,
        cost_nano_usd=row.cost_nano_usd,
        events=row.events,
    )
