"""The planning prompt marks the tools the gateway batches, so a model emits one
independent call per item for them; other tools' catalog lines are unchanged."""

from __future__ import annotations

import json

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import to_struct
from trellis_planner.prompts import plan_messages


def catalog_lines(tools: list[common_pb2.ToolSpec]) -> dict[str, dict]:
    request = planner_pb2.PlanRequest(run_id="r1", goal="Summarise ten reports", tools=tools)
    system = plan_messages(request, max_nodes=20)[0]["content"]
    lines = system.split("## Tools", 1)[1].splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    return {line["name"]: line for line in found}


def test_batchable_tools_are_marked_in_the_catalog() -> None:
    schema = to_struct({"type": "object", "properties": {"text": {"type": "string"}}})
    tools = [
        common_pb2.ToolSpec(
            name="summarize", description="Sums up.", input_schema=schema, batch_max_items=16
        ),
        common_pb2.ToolSpec(name="echo", description="Echoes.", input_schema=schema),
    ]
    lines = catalog_lines(tools)
    assert "16 calls" in lines["summarize"]["batch"]
    assert "one independent call per item" in lines["summarize"]["batch"]
    assert set(lines["echo"]) == {"name", "description", "input_schema"}
