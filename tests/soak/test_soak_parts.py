"""The soak's own arithmetic and judgement: memory trend and how runs are classified."""

from __future__ import annotations

import os

import pytest

from soak import workload
from soak.rss import GROWTH_LIMIT_MB_PER_MIN, RssSampler, rss_mb, slope_per_minute
from soak.run import Stored, peak_active


def test_slope_is_mb_per_minute_of_a_least_squares_line() -> None:
    assert slope_per_minute([(t, 100 + 0.05 * t) for t in range(60)]) == pytest.approx(3.0)
    # noise without a trend (1 MB up and down every second) has next to no slope
    assert abs(slope_per_minute([(t, 80.0 + (t % 2)) for t in range(60)])) < 0.1
    assert slope_per_minute([(0, 5.0)]) == 0.0


def test_verdict_uses_the_second_half_only() -> None:
    sampler = RssSampler({"svc": os.getpid()})
    warm_up = [(float(t), 50.0 + t) for t in range(30)]  # grows while warming up
    steady = [(float(t), 80.0) for t in range(30, 60)]  # then flat
    sampler.samples["svc"] = warm_up + steady
    summary = sampler.summary()["svc"]
    assert (summary["start_mb"], summary["peak_mb"], summary["end_mb"]) == (50.0, 80.0, 80.0)
    assert summary["verdict"] == "flat"
    leaking = [(float(t), 80.0 + t * GROWTH_LIMIT_MB_PER_MIN / 30) for t in range(60)]
    sampler.samples["svc"] = leaking
    assert sampler.summary()["svc"]["verdict"] == "growing"


def test_rss_of_this_process_and_of_a_gone_one() -> None:
    assert (rss_mb(os.getpid()) or 0) > 1
    assert rss_mb(2**22 + 12345) is None


@pytest.mark.parametrize(
    ("kind", "code", "reason", "status", "run_error", "nodes", "outcome"),
    [
        ("demo", None, "", "SUCCEEDED", "", [], workload.EXPECTED),
        ("parallel", None, "", "SUCCEEDED", "", ["TOOL_FAILED"], workload.UNEXPECTED),
        ("parallel", None, "", "SUCCEEDED", "", ["TOOL_TIMEOUT"], workload.TIMEOUT),
        ("demo", None, "", "FAILED", "DEADLINE_EXCEEDED", [], workload.TIMEOUT),
        ("arithmetic", "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", None, "", [], workload.TIMEOUT),
        ("demo", "RESOURCE_EXHAUSTED", "RUN_CAPACITY", None, "", [], workload.SHED),
        ("demo", "RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED", None, "", [], workload.UNEXPECTED),
        ("demo", "UNAVAILABLE", "UNAVAILABLE", None, "", [], workload.UNEXPECTED),
        ("cancel", None, "", "CANCELLED", "CANCELLED", ["CANCELLED"], workload.EXPECTED),
        ("cancel", None, "", "SUCCEEDED", "", [], workload.UNEXPECTED),
        ("deadline", None, "", "FAILED", "DEADLINE_EXCEEDED", ["CANCELLED"], workload.EXPECTED),
        ("client_deadline", "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", None, "", [], "expected"),
        ("client_deadline", None, "", "SUCCEEDED", "", ["TOOL_TIMEOUT"], workload.EXPECTED),
        ("client_deadline", None, "", "SUCCEEDED", "", [], workload.UNEXPECTED),
        ("invalid", "INVALID_ARGUMENT", "INVALID_PLAN", None, "", [], workload.EXPECTED),
        ("invalid", "INVALID_ARGUMENT", "TOO_MANY_NODES", None, "", [], workload.EXPECTED),
        ("invalid", None, "", "SUCCEEDED", "", [], workload.UNEXPECTED),
        ("demo", "INVALID_ARGUMENT", "INVALID_PLAN", None, "", [], workload.UNEXPECTED),
    ],
)
def test_classify(kind, code, reason, status, run_error, nodes, outcome) -> None:
    assert workload.classify(kind, code, reason, status, run_error, nodes) == outcome


def test_every_kind_of_the_mix_builds_a_request_with_its_run_id() -> None:
    import random

    rng = random.Random(1)
    for kind in workload.MIX:
        planned = workload.plan_run(kind, f"id-{kind}", rng)
        assert planned.kind == kind and planned.request.run_id == f"id-{kind}"
        assert planned.request.goal or planned.request.plan
        assert planned.timeout > 0


def test_peak_active_counts_overlapping_stored_runs() -> None:
    runs = [
        Stored("SUCCEEDED", 10.0, 12.0),
        Stored("SUCCEEDED", 11.0, 13.0),
        Stored("CANCELLED", 11.5, 11.6),
        Stored("SUCCEEDED", 13.0, 14.0),  # starts as the second ends: not at once
        Stored("MISSING"),  # refused runs were never stored
    ]
    assert peak_active(runs) == 3
    assert peak_active(runs[3:]) == 1
    assert peak_active([]) == 0
