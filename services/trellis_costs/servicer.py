"""CostAccountingService over gRPC: protos in, ``Budgets``/``Ledger`` calls, protos out.

Contract checks live here because they name proto fields: a bad field is
INVALID_ARGUMENT with a stable reason and BadRequest violations naming every bad field
(INVALID_USAGE, USAGE_ID_REQUIRED, INVALID_ESTIMATE, INVALID_BUDGET, INVALID_DAY,
RUN_ID_REQUIRED; an id against ``trellis.runtime.validation``'s rules is one of them, a
bad tenant_id is INVALID_ID). The tenant comes from the request scope (``x-tenant-id``).
Rows are written through ``Budgets`` so each settles its call's hold. Prometheus cost and
token counters move only when a new ledger row is written, so retries and resumes never
inflate them; ``trellis_budget_remaining_usd{tenant}`` follows tenants that have a
budget (``headroom.py``).
"""

from __future__ import annotations

from datetime import UTC

from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.runtime.context import tenant as current_tenant
from trellis.runtime.errors import FieldViolation, InvalidArgument, TrellisError
from trellis.runtime.logs import get_logger
from trellis.runtime.metrics import COST_USD, TOKENS, UNKNOWN_MODEL_PRICES
from trellis.runtime.validation import (
    MODEL_NAME,
    NODE_ID,
    RUN_ID,
    SESSION_ID,
    TENANT_ID,
    TOOL_NAME,
    USAGE_ID,
    Problems,
    id_violations,
)
from trellis_costs.budgets import Budgets
from trellis_costs.headroom import HeadroomGauge
from trellis_costs.ledger import (
    BUDGET_LIMITS,
    Budget,
    Ledger,
    Recorded,
    UsageEvent,
    UsageKind,
    UsageRow,
    parse_day,
)
from trellis_costs.prices import PriceTable

log = get_logger(__name__)

_KINDS = {costs_pb2.USAGE_KIND_MODEL: UsageKind.MODEL, costs_pb2.USAGE_KIND_TOOL: UsageKind.TOOL}
#: Most events one RecordUsages may carry.
MAX_BATCH = 1000
#: Bound on the models remembered for warn-once; past it every unknown model warns.
_MAX_WARNED_MODELS = 1024


class CostAccountingServicer(costs_pb2_grpc.CostAccountingServiceServicer):
    def __init__(
        self,
        ledger: Ledger,
        budgets: Budgets,
        prices: PriceTable,
        headroom: HeadroomGauge,
        *,
        tenant_label: bool = False,
    ) -> None:
        self._ledger = ledger
        self._budgets = budgets
        self._headroom = headroom
        self._prices = prices
        self._tenant_label = tenant_label
        self._warned_models: set[str] = set()

    async def RecordUsage(
        self, request: costs_pb2.RecordUsageRequest, context: aio.ServicerContext
    ) -> costs_pb2.RecordUsageResponse:
        """Record one event once (idempotent on usage_id); it settles the CheckBudget
        hold whose reservation_id is this usage_id. A usage_id another tenant used is
        ALREADY_EXISTS, reason USAGE_ID_TAKEN."""
        event = _usage_event(request, current_tenant())
        recorded = await self._budgets.record(event)
        self._counted(event, recorded)
        await self._publish_headroom(event.tenant_id)
        return costs_pb2.RecordUsageResponse(
            cost_nano_usd=recorded.cost_nano_usd, duplicate=recorded.duplicate
        )

    async def RecordUsages(
        self, request: costs_pb2.RecordUsagesRequest, context: aio.ServicerContext
    ) -> costs_pb2.RecordUsagesResponse:
        """RecordUsage of every entry in one ledger transaction. Each entry gets its own
        result: a bad one (INVALID_USAGE, USAGE_ID_REQUIRED, USAGE_ID_TAKEN) is refused
        in it and the others are recorded. No entries, or more than MAX_BATCH, is
        INVALID_ARGUMENT, reason INVALID_USAGE_BATCH. The tenant's headroom is
        published once per batch."""
        count = len(request.entries)
        if not 0 < count <= MAX_BATCH:
            raise _invalid(
                "entries", f"must hold 1 to {MAX_BATCH} events", reason="INVALID_USAGE_BATCH"
            )
        tenant_id = current_tenant()
        results = [costs_pb2.RecordUsageResult(usage_id=e.usage_id) for e in request.entries]
        events: list[tuple[int, UsageEvent]] = []
        for index, entry in enumerate(request.entries):
            try:
                events.append((index, _usage_event(entry, tenant_id)))
            except InvalidArgument as error:
                results[index].error.CopyFrom(_entry_error(error))
        recorded = await self._budgets.record_many([event for _i, event in events])
        for (index, event), outcome in zip(events, recorded, strict=True):
            if isinstance(outcome, TrellisError):
                results[index].error.CopyFrom(_entry_error(outcome))
                continue
            self._counted(event, outcome)
            results[index].cost_nano_usd = outcome.cost_nano_usd
            results[index].duplicate = outcome.duplicate
        if events:
            await self._publish_headroom(tenant_id)
        return costs_pb2.RecordUsagesResponse(results=results)

    def _counted(self, event: UsageEvent, recorded: Recorded) -> None:
        """Move the cost and token counters for a new row (never for a repeat)."""
        if recorded.duplicate:
            return
        _count(event, recorded.cost_nano_usd, event.tenant_id if self._tenant_label else "")
        if not recorded.price_known:
            UNKNOWN_MODEL_PRICES.labels(model=event.model).inc()
            self._warn_unknown_model(event)

    async def _publish_headroom(self, tenant_id: str) -> None:
        """After a recording: the tenant's headroom, read again only when the gauge
        follows it (it has a budget). A tenant budgeted at another replica is picked up
        by the gauge's periodic refresh, so a tenant without a budget costs no read."""
        if self._headroom.follows(tenant_id):
            self._headroom.publish(tenant_id, await self._budgets.headroom(tenant_id))

    async def CheckBudget(
        self, request: costs_pb2.CheckBudgetRequest, context: aio.ServicerContext
    ) -> costs_pb2.CheckBudgetResponse:
        """Whether the tenant may spend the estimate (estimated_cost_nano_usd plus the
        priced estimated_usage) under its daily and monthly limits, after the estimates
        held for other calls; allowed with a reservation_id, the estimate is held."""
        tenant_id = current_tenant()
        estimate = _estimate(request, self._prices)
        check = await self._budgets.check(tenant_id, estimate, request.reservation_id)
        self._headroom.publish(tenant_id, check.headroom_after)
        return costs_pb2.CheckBudgetResponse(
            allowed=check.allowed,
            daily_limit_nano_usd=check.daily_limit_nano_usd,
            spent_today_nano_usd=check.spent_today_nano_usd,
            remaining_nano_usd=check.remaining_nano_usd,
            monthly_limit_nano_usd=check.monthly_limit_nano_usd,
            spent_this_month_nano_usd=check.spent_this_month_nano_usd,
            reserved_nano_usd=check.reserved_nano_usd,
            estimated_cost_nano_usd=check.estimated_cost_nano_usd,
        )

    async def SetBudget(
        self, request: costs_pb2.SetBudgetRequest, context: aio.ServicerContext
    ) -> costs_pb2.SetBudgetResponse:
        """Set the limits of ``tenant_id`` (empty: the caller's tenant) that
        ``update_mask`` names (empty: both); 0 means no limit of that kind, and a budget
        left with both 0 is removed."""
        limits = _budget_limits(request)
        tenant_id = _tenant(request.tenant_id)
        await self._budgets.set_budget(
            Budget(tenant_id, request.daily_limit_nano_usd, request.monthly_limit_nano_usd),
            limits,
        )
        self._headroom.publish(tenant_id, await self._budgets.headroom(tenant_id))
        return costs_pb2.SetBudgetResponse()

    async def GetUsage(
        self, request: costs_pb2.GetUsageRequest, context: aio.ServicerContext
    ) -> costs_pb2.GetUsageResponse:
        """Totals of ``tenant_id`` (empty: the caller's) by UTC day, kind and model or
        tool over the inclusive window of days (empty: today)."""
        start_day, end_day = _window(request, self._budgets.today())
        report = await self._ledger.usage(
            _tenant(request.tenant_id), start_day, end_day, request.session_id
        )
        return costs_pb2.GetUsageResponse(
            rows=[_usage_row(row) for row in report.rows],
            total_cost_nano_usd=report.total_cost_nano_usd,
            total_input_tokens=report.total_input_tokens,
            total_output_tokens=report.total_output_tokens,
            estimated_events=report.estimated_events,
        )

    async def GetRunUsage(
        self, request: costs_pb2.GetRunUsageRequest, context: aio.ServicerContext
    ) -> costs_pb2.GetRunUsageResponse:
        """What the ledger holds for one run of the caller's tenant; another tenant's
        run (or an unknown one) is an empty answer, not an error."""
        if not request.run_id:
            raise _invalid("run_id", "is required", reason="RUN_ID_REQUIRED")
        problems = Problems()
        problems.check_id("run_id", request.run_id, RUN_ID)
        problems.refuse("request")
        run = await self._ledger.run_usage(current_tenant(), request.run_id)
        if not run.usage_ids:
            return costs_pb2.GetRunUsageResponse()
        return costs_pb2.GetRunUsageResponse(
            model_usage=common_pb2.Usage(
                model=run.model,
                input_tokens=run.input_tokens,
                output_tokens=run.output_tokens,
                cached_input_tokens=run.cached_input_tokens,
                cost_nano_usd=run.model_cost_nano_usd,
                estimated=run.estimated,
            ),
            tool_cost_nano_usd=run.tool_cost_nano_usd,
            cost_nano_usd=run.cost_nano_usd,
            usage_ids=run.usage_ids,
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


def _tenant(tenant_id: str) -> str:
    """A request's ``tenant_id`` (empty: the caller's); ``INVALID_ID`` if it is not one."""
    problems = Problems()
    problems.check_id("tenant_id", tenant_id, TENANT_ID)
    problems.refuse("request")
    return tenant_id or current_tenant()


def _entry_error(error: TrellisError) -> common_pb2.Error:
    """A refused entry's result: the stable reason, and the bad fields in details."""
    return common_pb2.Error(
        code=error.reason,
        message=error.message,
        details={v.field: v.description for v in error.violations},
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
    violations += id_violations(
        ("usage_id", request.usage_id, USAGE_ID),
        ("run_id", request.run_id, RUN_ID),
        ("node_id", request.node_id, NODE_ID),
        ("tool", request.tool, TOOL_NAME),
        ("usage.model", usage.model, MODEL_NAME),
        ("session_id", request.session_id, SESSION_ID),
    )
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
        session_id=request.session_id,
    )


def _count(event: UsageEvent, cost_nano_usd: int, tenant: str) -> None:
    COST_USD.labels(model=event.name, kind=event.kind.value, tenant=tenant).inc(cost_nano_usd / 1e9)
    if event.kind is UsageKind.MODEL:
        for kind, tokens in (
            ("input", event.input_tokens),
            ("output", event.output_tokens),
            ("cached_input", event.cached_input_tokens),
        ):
            TOKENS.labels(model=event.model, type=kind, tenant=tenant).inc(tokens)


def _estimate(request: costs_pb2.CheckBudgetRequest, prices: PriceTable) -> int:
    """estimated_cost_nano_usd plus estimated_usage priced (an unknown model adds 0),
    or InvalidArgument listing every bad field."""
    usage = request.estimated_usage
    violations = [
        FieldViolation(name, "must be >= 0")
        for name, value in (
            ("estimated_cost_nano_usd", request.estimated_cost_nano_usd),
            ("estimated_usage.input_tokens", usage.input_tokens),
            ("estimated_usage.output_tokens", usage.output_tokens),
            ("estimated_usage.cached_input_tokens", usage.cached_input_tokens),
        )
        if value < 0
    ]
    violations += id_violations(
        ("reservation_id", request.reservation_id, USAGE_ID),
        ("estimated_usage.model", usage.model, MODEL_NAME),
    )
    if usage.cached_input_tokens > max(usage.input_tokens, 0):
        violations.append(
            FieldViolation(
                "estimated_usage.cached_input_tokens",
                "must not exceed estimated_usage.input_tokens",
            )
        )
    if violations:
        raise InvalidArgument(
            "budget estimate breaks its contract", reason="INVALID_ESTIMATE", violations=violations
        )
    priced, _known = prices.cost_nano_usd(
        usage.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
    )
    return request.estimated_cost_nano_usd + priced


def _budget_limits(request: costs_pb2.SetBudgetRequest) -> tuple[str, ...]:
    """The limits the request writes (its update_mask, or both), or InvalidArgument
    naming unknown mask paths and negative limits."""
    paths = tuple(request.update_mask.paths) or BUDGET_LIMITS
    violations = [
        FieldViolation(f"update_mask.paths[{i}]", f"{path!r} is not one of {BUDGET_LIMITS}")
        for i, path in enumerate(request.update_mask.paths)
        if path not in BUDGET_LIMITS
    ]
    violations += [
        FieldViolation(name, "must be >= 0 (0 = no limit)")
        for name in BUDGET_LIMITS
        if name in paths and getattr(request, name) < 0
    ]
    if violations:
        raise InvalidArgument(
            "bad budget: limits must be >= 0 and update_mask may name only the limits",
            reason="INVALID_BUDGET",
            violations=violations,
        )
    return paths


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
    session = id_violations(("session_id", request.session_id, SESSION_ID))
    if session:
        raise InvalidArgument("bad session id", reason="INVALID_ID", violations=session)
    return days["start_day"], days["end_day"]


def _usage_row(row: UsageRow) -> costs_pb2.UsageRow:
    tool = row.kind is UsageKind.TOOL
    return costs_pb2.UsageRow(
        tenant_id=row.tenant_id,
        day=row.day,
        kind=costs_pb2.USAGE_KIND_TOOL if tool else costs_pb2.USAGE_KIND_MODEL,
        model="" if tool else row.name,
        tool=row.name if tool else "",
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_input_tokens=row.cached_input_tokens,
        cost_nano_usd=row.cost_nano_usd,
        events=row.events,
        estimated_events=row.estimated_events,
        estimated_input_tokens=row.estimated_input_tokens,
        estimated_output_tokens=row.estimated_output_tokens,
    )
