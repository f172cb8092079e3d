"""How a run is judged at its end, its deadline decided, and its cost reconciled."""

from __future__ import annotations

import pytest

from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import duration
from trellis_executor import run_cost
from trellis_executor.ending import judged, unrecovered_failures
from trellis_executor.limits import Limits
from trellis_executor.run_cost import RunCost
from trellis_executor.settings import ExecutorSettings

OK, FAIL = common_pb2.NODE_STATUS_SUCCEEDED, common_pb2.NODE_STATUS_FAILED
SKIP = common_pb2.NODE_STATUS_SKIPPED


def calls(*tools: str) -> dict[str, common_pb2.ToolCall]:
    return {f"n{i}": common_pb2.ToolCall(node_id=f"n{i}", tool=t) for i, t in enumerate(tools, 1)}


def outcomes(*statuses: int) -> dict[str, common_pb2.NodeOutcome]:
    return {
        f"n{i}": common_pb2.NodeOutcome(
            node_id=f"n{i}", status=s, error=common_pb2.Error(code="" if s == OK else "BOOM")
        )
        for i, s in enumerate(statuses, 1)
    }


def test_skipped_nodes_do_not_count_their_failed_dependency_does() -> None:
    failures = unrecovered_failures(calls("a", "b", "c"), outcomes(OK, FAIL, SKIP))
    assert [f.node_id for f in failures] == ["n2"]


def test_a_later_round_running_the_same_tool_successfully_recovers_a_failure() -> None:
    plan = calls("http", "echo", "http")  # round 0: n1, n2; round 1: n3
    assert unrecovered_failures(plan, outcomes(FAIL, OK, OK), round_starts=(2,)) == []
    # the same tool succeeding in the same round is no replacement
    assert len(unrecovered_failures(plan, outcomes(FAIL, OK, OK))) == 1
    # nor a different tool in the later round
    other = calls("http", "echo", "sql")
    assert len(unrecovered_failures(other, outcomes(FAIL, OK, OK), round_starts=(2,))) == 1


def test_explicit_plans_fail_goal_runs_are_partial() -> None:
    plan = calls("arithmetic", "echo")
    failures = unrecovered_failures(plan, outcomes(FAIL, OK))
    explicit = judged(explicit=True, failures=failures, calls=plan, answer="")
    assert (explicit.status, explicit.failed_nodes) == (executor_pb2.RUN_STATUS_FAILED, 1)
    assert explicit.error.code == "BOOM" and explicit.error.details["node_id"] == "n1"
    assert explicit.error.message.startswith("node n1 (arithmetic) failed")
    goal = judged(explicit=False, failures=failures, calls=plan, answer="partly")
    assert (goal.status, goal.answer) == (executor_pb2.RUN_STATUS_PARTIAL, "partly")
    clean = judged(explicit=False, failures=[], calls=plan, answer="all good")
    assert clean.status == executor_pb2.RUN_STATUS_SUCCEEDED and not clean.HasField("error")


def test_a_partial_message_names_a_few_and_counts_the_rest() -> None:
    plan = calls(*["t"] * 8)
    failures = unrecovered_failures(plan, outcomes(*[FAIL] * 8))
    message = judged(explicit=False, failures=failures, calls=plan, answer="x").error.message
    assert message.startswith("answered, but 8 nodes failed: n1 (t: BOOM)")
    assert message.endswith("and 3 more")


@pytest.mark.parametrize(
    ("option", "caller", "expected"),
    [
        (0.0, None, 300.0),  # the server default
        (10.0, None, 10.0),  # the run's option
        (900.0, None, 300.0),  # capped by the server
        (10.0, 5.0, 4.8),  # the caller's deadline, less the margin (at most 0.2 s)
        (10.0, 1.0, 0.9),  # ... and at most a tenth of what is left
        (1.0, 50.0, 1.0),  # the option is the smaller one
    ],
)
def test_the_run_timeout_is_the_smallest_of_option_cap_and_caller(option, caller, expected):
    options = executor_pb2.RunOptions()
    if option:
        options.timeout.CopyFrom(duration(option))
    limits = Limits.of(options, ExecutorSettings(run_timeout_seconds=300), caller)
    assert limits.timeout == pytest.approx(expected)


class Ledger:
    def __init__(self, *answers: costs_pb2.GetRunUsageResponse | Exception) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def get_run_usage(self, run_id: str) -> costs_pb2.GetRunUsageResponse:
        self.asked += 1
        answer = self.answers[min(self.asked, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def report(usage_id: str, tokens: int = 0, cost: int = 0, **kw) -> planner_pb2.ModelCallUsage:
    usage = common_pb2.Usage(model="m", input_tokens=tokens, output_tokens=1, cost_nano_usd=cost)
    return planner_pb2.ModelCallUsage(usage_id=usage_id, usage=usage, **kw)


def held(*ids: str, tokens: int, cost: int, estimated: bool) -> costs_pb2.GetRunUsageResponse:
    usage = common_pb2.Usage(
        model="m", input_tokens=tokens, cost_nano_usd=cost, estimated=estimated
    )
    return costs_pb2.GetRunUsageResponse(model_usage=usage, cost_nano_usd=cost, usage_ids=ids)


async def test_a_run_whose_calls_all_reported_never_asks_the_ledger() -> None:
    cost = RunCost("m")
    assert cost.model_call(planner_pb2.ModelCallUsage(usage_id="r/plan/0", started=True)) == 0
    assert cost.model_call(report("r/plan/0", 10, 7)) == 7
    ledger = Ledger()
    await cost.settle(ledger, "r")
    assert ledger.asked == 0 and cost.model_usage().input_tokens == 10


async def test_a_call_cut_short_is_taken_from_the_ledger_once_it_is_there(monkeypatch) -> None:
    monkeypatch.setattr(run_cost, "SETTLE_POLL_SECONDS", 0.0)
    cost = RunCost("m")
    cost.model_call(report("r/plan/0", 10, 7))
    cost.model_call(planner_pb2.ModelCallUsage(usage_id="r/join/0", started=True))
    ledger = Ledger(
        held("r/plan/0", tokens=10, cost=7, estimated=False),  # the join not recorded yet
        held("r/plan/0", "r/join/0", tokens=25, cost=19, estimated=True),
    )
    await cost.settle(ledger, "r")
    usage = cost.model_usage()
    assert (ledger.asked, usage.input_tokens, usage.cost_nano_usd, usage.estimated) == (
        2,
        25,
        19,
        True,
    )


async def test_without_the_ledger_a_run_keeps_what_it_saw() -> None:
    cost = RunCost("m")
    cost.model_call(report("r/plan/0", 10, 0, cost_deferred=True))
    await cost.settle(Ledger(ConnectionError("down")), "r")
    assert cost.model_usage().input_tokens == 10 and not cost.settled


def test_a_run_no_model_could_answer_is_partial_with_its_results() -> None:
    from trellis.runtime.convert import to_struct, to_value
    from trellis.runtime.errors import Unavailable
    from trellis_executor.fallback_answer import fallback_answer, no_model_answered

    plan = {
        "n1": common_pb2.ToolCall(node_id="n1", tool="df", args=to_struct({"path": "/"})),
        "n2": common_pb2.ToolCall(node_id="n2", tool="http"),
        "n3": common_pb2.ToolCall(node_id="n3", tool="echo"),
    }
    done = {
        "n1": common_pb2.NodeOutcome(
            node_id="n1", status=OK, output=to_value({"used": "40%", "free": "60 GB"})
        ),
        "n2": common_pb2.NodeOutcome(
            node_id="n2", status=FAIL, error=common_pb2.Error(code="HTTP_5XX", message="502")
        ),
        "n3": common_pb2.NodeOutcome(node_id="n3", status=OK, output=to_value("x" * 900)),
    }
    error = Unavailable("model gpt-4o failed with HTTP 503", reason="MODEL_UNAVAILABLE")
    assert no_model_answered(error)
    assert not no_model_answered(Unavailable("x", reason="BUDGET_UNAVAILABLE"))
    text = fallback_answer(error, plan, done)
    lines = text.splitlines()
    assert lines[0] == (
        "No model could answer (MODEL_UNAVAILABLE: model gpt-4o failed with HTTP 503), so "
        "here is what each tool returned:"
    )
    assert lines[1] == '- n1 df {"path": "/"}: {"free": "60 GB", "used": "40%"}'
    assert lines[2] == "- n2 http: FAILED (HTTP_5XX: 502)"
    assert lines[3].startswith("- n3 echo: xxx") and lines[3].endswith("…") and len(lines[3]) < 520
    assert fallback_answer(error, {}, {}).endswith("and no tool ran.")
    failures = unrecovered_failures(plan, done)
    finished = judged(explicit=False, failures=failures, calls=plan, answer=text, unanswered=error)
    assert finished.status == executor_pb2.RUN_STATUS_PARTIAL and finished.answer == text
    assert finished.error.code == "MODEL_UNAVAILABLE" and finished.error.retryable
    assert dict(finished.error.details) == {"cause": "MODEL_UNAVAILABLE", "failed_nodes": "1"}
    assert finished.error.message.startswith("no model could answer (MODEL_UNAVAILABLE: ")
    assert finished.error.message.endswith("and 1 node failed: n2 (http: HTTP_5XX)")
    assert finished.failed_nodes == 1
