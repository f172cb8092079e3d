"""Each service serves Prometheus text on its /metrics port."""

import urllib.request

from trellis.runtime.metrics import TOOL_CALLS, serve_metrics
from trellis.runtime.ports import free_port


def test_metrics_endpoint_serves_trellis_counters() -> None:
    TOOL_CALLS.labels(tool="echo", outcome="succeeded", cache="miss").inc()
    port = serve_metrics(free_port())
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'trellis_tool_calls_total{cache="miss",outcome="succeeded",tool="echo"}' in body
    assert "trellis_cost_usd_total" in body or "# TYPE trellis_cost_usd counter" in body


def test_port_zero_means_off() -> None:
    assert serve_metrics(0) is None
