"""What a request may carry: identifier rules, goal text, tool-call args (the one home).

Every service checks the values that arrive at its own entry against these rules before
it looks anything up, stores or runs it: the executor a whole ``RunRequest`` (its front
door), the planner its run id and goal, the gateway an InvokeTool's ids and args, cost
accounting its usage, run and tenant ids, the cache its keys, and the runtime's
interceptor every call's ``x-tenant-id``. A value that would break a store (NUL in a
PostgreSQL text column, an index row past its size limit), a trailer, a file name or a
composite key is then INVALID_ARGUMENT naming the field, never INTERNAL further in.

Identifiers are short ASCII on purpose: they end up in SQL text columns, Redis keys,
metric labels, span attributes and composite keys. Neither a run id nor a node id may
hold ``/``, so ``{run_id}/{node_id}`` (``node_idempotency_key``) names exactly one node
of one run. A session id follows the run id's rule.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument, quote


@dataclass(frozen=True)
class IdRule:
    """What one kind of identifier may look like."""

    pattern: re.Pattern[str]
    #: The rule in words, for error messages and docs.
    rule: str

    def problem(self, value: str, *, required: bool = False) -> str | None:
        """Why ``value`` breaks the rule (None if it does not; empty is fine unless
        ``required``)."""
        if not value:
            return "required" if required else None
        if self.pattern.fullmatch(value):
            return None
        return f"must be {self.rule}, got {quote(value)}"


def _rule(pattern: str, rule: str) -> IdRule:
    return IdRule(re.compile(pattern, re.ASCII), rule)


#: A run id: uuid4 hex (what the executor picks) and the usual client ids.
RUN_ID = _rule(r"[A-Za-z0-9_.:-]{1,128}", "1-128 letters, digits, '_', '-', '.' or ':'")
#: A session id (sessions reuse runs' rule).
SESSION_ID = RUN_ID
#: A plan node id (what the planner asks of the model, and of explicit plans).
NODE_ID = _rule(r"[A-Za-z0-9_-]{1,64}", "1-64 letters, digits, '_' or '-'")
#: A tool name (tools.yaml names, and MCP / tool-server names with their prefix).
TOOL_NAME = _rule(r"[A-Za-z0-9_.:-]{1,128}", "1-128 letters, digits, '_', '-', '.' or ':'")
#: A tenant id (x-tenant-id, API-key tenants, TRELLIS_TENANT_TOOLS keys).
TENANT_ID = _rule(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
    "1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)",
)
#: A usage id (ledger rows and budget reservations): derived from run and node ids.
USAGE_ID = _rule(r"[A-Za-z0-9_.:/-]{1,256}", "1-256 letters, digits, '_', '-', '.', ':' or '/'")
#: An idempotency key of a side-effecting tool call (the executor sends ``run_id/node_id``).
IDEMPOTENCY_KEY = USAGE_ID
#: A model name (``gpt-4o``, ``org/model``, ``ft:gpt-4o:acme::id``).
MODEL_NAME = _rule(r"[\x21-\x7e]{1,128}", "1-128 printable ASCII characters without spaces")
#: A cache key or tag.
CACHE_KEY = _rule(r"[\x21-\x7e]{1,256}", "1-256 printable ASCII characters without spaces")

#: Deepest args (the args object is level 1) a node may have: a Struct nested much
#: deeper no longer parses inside the messages that carry it (upb's depth limit of 100
#: is reached by GetRunResponse at 33 levels; the rest is headroom for outputs).
MAX_ARGS_DEPTH = 20
#: Largest args of one node, as a serialized Struct.
MAX_ARGS_BYTES = 256 * 1024
#: Goal bytes when a service is not told otherwise (TRELLIS_MAX_GOAL_BYTES).
DEFAULT_MAX_GOAL_BYTES = 32 * 1024
#: Control characters (Unicode category Cc) but \t, \n and \r: what a text may not hold.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MAX_DOUBLE = sys.float_info.max


def id_violations(*checks: tuple[str, str, IdRule]) -> list[FieldViolation]:
    """One violation per ``(field, value, rule)`` whose non-empty value breaks its rule."""
    return [
        FieldViolation(name, problem)
        for name, value, rule in checks
        if (problem := rule.problem(value)) is not None
    ]


def node_idempotency_key(run_id: str, node_id: str) -> str:
    """The idempotency key of a node of a run: ``{run_id}/{node_id}``.

    Unambiguous because neither id may hold ``/``: the key splits back into exactly
    one (run, node) pair, so two runs never share a key for different nodes.
    """
    return f"{run_id}/{node_id}"


def text_problem(text: str, max_bytes: int) -> tuple[str, str] | None:
    """``(reason, description)`` when ``text`` is over ``max_bytes`` UTF-8 bytes
    (``GOAL_TOO_LARGE``) or holds a control character other than \\n, \\r and \\t
    (``INVALID_GOAL``); None when it is fine. (Valid UTF-8 is the wire's job.)"""
    size = len(text.encode())
    if size > max_bytes:
        return "GOAL_TOO_LARGE", f"{size} bytes, over the limit of {max_bytes}"
    if (control := _CONTROL.search(text)) is not None:
        return (
            "INVALID_GOAL",
            f"control character U+{ord(control.group()):04X} at offset {control.start()}"
            " (only \\n, \\r and \\t are allowed)",
        )
    return None


def args_problem(args: Any) -> str | None:
    """Why JSON ``args`` cannot travel as a protobuf Struct (None if it can): a number
    that is not finite or too large for a double, or nesting deeper than
    ``MAX_ARGS_DEPTH``. Iterative, so arbitrarily deep input cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(args, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping | list):
            if depth > MAX_ARGS_DEPTH:
                return f"nested deeper than {MAX_ARGS_DEPTH} levels"
            items = value.values() if isinstance(value, Mapping) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a JSON number"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_DOUBLE:
            return "a number too large for a double"
    return None


def struct_args_problem(args: struct_pb2.Struct) -> str | None:
    """``args_problem`` of a Struct from the wire, and its size: at most
    ``MAX_ARGS_BYTES`` serialized."""
    size = args.ByteSize()
    if size > MAX_ARGS_BYTES:
        return f"{size} bytes, over the limit of {MAX_ARGS_BYTES}"
    try:
        value = from_struct(args)
    except ValueError as error:  # NaN or Infinity: a Struct may hold them, JSON may not
        return f"not JSON: {error}"
    return args_problem(value)


def call_violations(call: common_pb2.ToolCall, where: str) -> list[FieldViolation]:
    """The rules one ToolCall breaks on its own: node id, tool name, dependency ids and
    args bounds; named like ``plan[2].node_id``. (Whether the tool exists and the
    dependencies are earlier nodes is the plan checkers' business.)"""
    violations = [
        FieldViolation(f"{where}.{name}", problem)
        for name, problem in (
            ("node_id", NODE_ID.problem(call.node_id, required=True)),
            ("tool", TOOL_NAME.problem(call.tool, required=True)),
        )
        if problem is not None
    ]
    for index, dep in enumerate(call.depends_on):
        if (problem := NODE_ID.problem(dep, required=True)) is not None:
            violations.append(FieldViolation(f"{where}.depends_on[{index}]", problem))
    if (problem := struct_args_problem(call.args)) is not None:
        violations.append(FieldViolation(f"{where}.args", problem))
    return violations


@dataclass
class Problems:
    """What one request breaks, each violation with the reason it is refused for.

    ``refuse`` raises one ``InvalidArgument`` naming every field; its reason is the
    first violation's, so a caller checks fields in the order that matters most.
    """

    found: list[tuple[str, FieldViolation]] = field(default_factory=list)

    def add(self, reason: str, name: str, description: str) -> None:
        self.found.append((reason, FieldViolation(name, description)))

    def extend(self, reason: str, violations: Iterable[FieldViolation]) -> None:
        self.found.extend((reason, v) for v in violations)

    def check_id(
        self,
        name: str,
        value: str,
        rule: IdRule,
        *,
        required: bool = False,
        reason: str = "INVALID_ID",
    ) -> None:
        if (problem := rule.problem(value, required=required)) is not None:
            self.add(reason, name, problem)

    def check_text(self, name: str, text: str, max_bytes: int) -> None:
        if (found := text_problem(text, max_bytes)) is not None:
            self.add(found[0], name, found[1])

    def refuse(self, what: str) -> None:
        """Raise ``InvalidArgument`` if anything was found; ``what`` names the request."""
        if not self.found:
            return
        listed = "; ".join(f"{v.field}: {v.description}" for _, v in self.found[:3])
        more = f" (and {len(self.found) - 3} more)" if len(self.found) > 3 else ""
        raise InvalidArgument(
            f"{what} refused: {listed}{more}",
            reason=self.found[0][0],
            violations=[v for _, v in self.found],
        )


__all__ = [
    "CACHE_KEY",
    "DEFAULT_MAX_GOAL_BYTES",
    "IDEMPOTENCY_KEY",
    "MAX_ARGS_BYTES",
    "MAX_ARGS_DEPTH",
    "MODEL_NAME",
    "NODE_ID",
    "RUN_ID",
    "SESSION_ID",
    "TENANT_ID",
    "TOOL_NAME",
    "USAGE_ID",
    "IdRule",
    "Problems",
    "args_problem",
    "call_violations",
    "id_violations",
    "node_idempotency_key",
    "struct_args_problem",
    "text_problem",
]
