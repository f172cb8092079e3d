"""A short soak in ``make test``: the stack as processes, 10 clients for 8 s.

The executor is capped at 3 active runs, so it is overloaded throughout: the test holds
it to shedding that overload with RESOURCE_EXHAUSTED ``RUN_CAPACITY`` (at once, with a
RetryInfo) instead of letting calls time out, and to losing no run on the way. The full
soak (50 clients x 60 s) is ``make soak``.
"""

from __future__ import annotations

from pathlib import Path

from soak.run import SoakConfig, run_soak

CLIENTS, SECONDS, MAX_ACTIVE_RUNS = 10, 8.0, 3
#: Every way a call or run may end in the soak without being a failure (workload.py).
ALLOWED_ENDINGS = {
    "INVALID_ARGUMENT/INVALID_PLAN",
    "INVALID_ARGUMENT/TOO_MANY_NODES",
    "DEADLINE_EXCEEDED/DEADLINE_EXCEEDED",  # client_deadline: the call's own 500 ms deadline
    "RESOURCE_EXHAUSTED/RUN_CAPACITY",
    "run CANCELLED/CANCELLED",
    "run FAILED/DEADLINE_EXCEEDED",  # deadline: the run's own 300 ms timeout
}


def logs(workdir: Path) -> str:
    """The end of each process's log, to show when the soak fails."""
    return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(workdir.glob("*.log")))


async def test_short_soak_sheds_overload_and_loses_no_run(tmp_path: Path) -> None:
    summary = await run_soak(
        SoakConfig(
            clients=CLIENTS,
            seconds=SECONDS,
            max_active_runs=MAX_ACTIVE_RUNS,
            seed=8,
            workdir=tmp_path,
        )
    )
    runs, checks = summary["runs"], summary["checks"]
    context = f"{summary['unexpected_examples']}\n{summary['errors_by_reason']}\n{logs(tmp_path)}"

    assert runs["lost"] == 0 and runs["stuck"] == 0, summary["lost_run_ids"]
    assert runs["timeouts"] == 0, context
    assert runs["unexpected"] == 0, context
    assert set(summary["errors_by_reason"]) <= ALLOWED_ENDINGS, context
    assert runs["store_mismatches"] == 0, summary["mismatched_run_ids"]
    assert runs["completed"] > 0 and runs["succeeded"] > 0
    # overloaded on purpose: the overload was shed, and admitted runs stayed under the cap
    assert runs["shed"] > 0
    assert summary["errors_by_reason"]["RESOURCE_EXHAUSTED/RUN_CAPACITY"] == runs["shed"]
    assert 0 < runs["peak_active_runs"] <= MAX_ACTIVE_RUNS
    assert runs["expected"] == runs["attempted"] - runs["shed"]
    assert summary["services_serving"] and all(summary["services_serving"].values())
    assert checks["services_serving"] and checks["no_lost_runs"]
