"""The process stack (``trellis up``'s, the benchmarks' and the soak's) stops callers
first, each after the one before it has gone: the gateway's last usage — zero-cost
tool calls wait for company, up to TRELLIS_USAGE_FREE_BATCH_SECONDS — still reaches
cost accounting, instead of a usage outbox file for a later process."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from pathlib import Path

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.convert import to_struct
from trellis_cli.processes import start_process_stack
from trellis_cli.up import SERVICES as SPECS

SERVICES = [spec.name for spec in SPECS]


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def test_a_stop_right_after_a_run_leaves_its_usage_in_the_ledger(tmp_path: Path) -> None:
    key = "trk_" + secrets.token_urlsafe(32)
    keys = json.dumps({hashlib.sha256(key.encode()).hexdigest(): "acme"})
    stack = await start_process_stack(
        tmp_path,
        common_env={"TRELLIS_USAGE_FREE_BATCH_SECONDS": "10"},
        per_service={"executor": {"TRELLIS_API_KEYS": keys}},
    )
    channels = Channels()
    try:
        client = ExecutorClient(channels.get(stack.executor_target), api_key=key, timeout=30)
        plan = [
            common_pb2.ToolCall(node_id=f"n{i}", tool="echo", args=to_struct({"value": i}))
            for i in range(3)
        ]
        events = [e async for e in client.run(executor_pb2.RunRequest(run_id="r1", plan=plan))]
        assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
    finally:
        await channels.close()
        await stack.stop()  # well within the 10 s the usage may wait
    exits = {name: proc.process.returncode for name, proc in stack.procs.items()}
    assert {name: code for name, code in exits.items() if name in SERVICES} == dict.fromkeys(
        SERVICES, 0
    )  # each stopped gracefully, none killed
    ledger = rows(tmp_path / "costs.db", "SELECT tenant_id, node_id FROM usage WHERE run_id = 'r1'")
    assert sorted(ledger) == [("acme", "n0"), ("acme", "n1"), ("acme", "n2")]
    outbox = tmp_path / "toolgateway-outbox.db"
    assert not outbox.exists() or rows(outbox, "SELECT COUNT(*) FROM usage_outbox") == [(0,)]
