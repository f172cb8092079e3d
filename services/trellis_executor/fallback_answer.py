"""The answer a run gives when no model could write one: its tool results, as they are.

When every model fails on the join (unavailable, timing out, broken streams, or the
planner itself out of reach) the tools have still run, and what they returned is what
the user asked for. So the executor — which owns the run's ending and needs no planner
for this — answers with a plain template: one line saying no model could answer and
why, then one line per node: its tool and args, then its output (clipped) or its error.
The run then ends PARTIAL with error MODEL_UNAVAILABLE (``ending.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct, from_value
from trellis.runtime.errors import TrellisError
from trellis.runtime.redact import redact_text

#: The reasons after which a run answers from its outcomes instead of failing.
MODEL_FAILURES = frozenset(
    {
        "MODEL_UNAVAILABLE",
        "MODEL_TIMEOUT",
        "MODEL_RATE_LIMITED",
        "MODEL_BAD_RESPONSE",
        "UNAVAILABLE",
    }
)
#: The error code of a run that answered with the template.
UNANSWERED = "MODEL_UNAVAILABLE"
#: Longest output (as JSON) shown for one node.
MAX_OUTPUT_CHARS = 500


def no_model_answered(error: BaseException) -> bool:
    """Whether ``error`` (from a join) means no model could answer."""
    return isinstance(error, TrellisError) and error.reason in MODEL_FAILURES


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_OUTPUT_CHARS else text[: MAX_OUTPUT_CHARS - 1] + "…"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _line(call: common_pb2.ToolCall | None, outcome: common_pb2.NodeOutcome) -> str:
    what = outcome.node_id
    if call is not None:
        args = from_struct(call.args)
        what = f"{outcome.node_id} {call.tool}" + (f" {_clip(_json(args))}" if args else "")
    status = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_")
    if outcome.status == common_pb2.NODE_STATUS_SUCCEEDED:
        output = from_value(outcome.output) if outcome.HasField("output") else None
        shown = output if isinstance(output, str) else _json(output)
        return f"- {what}: {_clip(shown)}"
    reason = ": ".join(p for p in (outcome.error.code, outcome.error.message) if p)
    return f"- {what}: {status}" + (f" ({_clip(reason)})" if reason else "")


def fallback_answer(
    error: TrellisError,
    calls: Mapping[str, common_pb2.ToolCall],
    outcomes: Mapping[str, common_pb2.NodeOutcome],
) -> str:
    """The template answer (see the module docstring), a line per node in plan order
    (not the order they finished in); secrets redacted."""
    cause = f"{error.reason}: {error.message}"
    if not outcomes:
        return redact_text(f"No model could answer ({_clip(cause)}), and no tool ran.")
    lines = [f"No model could answer ({_clip(cause)}), so here is what each tool returned:"]
    in_plan_order = [n for n in calls if n in outcomes] + [n for n in outcomes if n not in calls]
    lines.extend(_line(calls.get(node_id), outcomes[node_id]) for node_id in in_plan_order)
    return redact_text("\n".join(lines))
