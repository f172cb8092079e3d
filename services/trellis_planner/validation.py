"""Checks each planned node before it leaves the planner.

The executor starts a node as soon as it arrives, so a node must be valid on its own
and against the nodes before it: a known tool, a fresh id, args that match the tool's
input schema, dependencies only on earlier nodes (of this plan, or on a replan of the
earlier rounds' plans), and no more than ``max_nodes`` nodes. References in args
(``"$n1"``, ``"${n1.field}"``) must name earlier nodes; a reference the model forgot to
list in ``depends_on`` is added there, since the intent is unambiguous. Violations are
named like ``plan[2].tool`` or ``plan[2].args.ms`` (0-based index the node would take in
the plan) for the repair round to quote.

Against the input schema, a string that is exactly one reference stands for a value of
any type (its output is only known at run time), so every keyword accepts it; a string
with references inside it is text once interpolated, so only its ``type`` is checked.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from jsonschema import Draft202012Validator, SchemaError, ValidationError, validators
from jsonschema.protocols import Validator

from trellis.common.v1 import common_pb2
from trellis.contract.refs import referenced_nodes
from trellis.runtime.convert import from_struct, to_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis.runtime.logs import get_logger
from trellis.runtime.validation import NODE_ID, RUN_ID, Problems, args_problem

log = get_logger(__name__)

INVALID_PLAN = "INVALID_PLAN"


def invalid_plan(message: str, violations: Iterable[FieldViolation]) -> InvalidArgument:
    return InvalidArgument(message, reason=INVALID_PLAN, violations=list(violations))


def check_request(run_id: str, goal: str, max_goal_bytes: int) -> None:
    """A Plan or Join request's own fields: the run id's rule, and a goal that is given,
    at most ``max_goal_bytes`` and free of control characters (``GOAL_REQUIRED``,
    ``GOAL_TOO_LARGE``, ``INVALID_GOAL``, ``INVALID_ID``)."""
    problems = Problems()
    if not goal.strip():
        problems.add("GOAL_REQUIRED", "goal", "empty")
    problems.check_text("goal", goal, max_goal_bytes)
    problems.check_id("run_id", run_id, RUN_ID)
    problems.refuse("planner request")


def is_whole_reference(value: Any) -> bool:
    """``"$n1"`` or ``"${n1.a.b}"``: a string the executor replaces by a value of any type."""
    if not isinstance(value, str):
        return False
    refs = referenced_nodes(value)
    if len(refs) != 1:
        return False
    if value == f"${refs[0]}":
        return True
    return value.startswith(f"${{{refs[0]}") and value.endswith("}") and value.count("}") == 1


def _has_reference(value: Any) -> bool:
    return isinstance(value, str) and bool(referenced_nodes(value))


Keyword = Callable[[Any, Any, Any, dict[str, Any]], Iterator[ValidationError] | None]


def _reference_aware(keyword: str, check: Keyword) -> Keyword:
    def wrapped(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Any:
        if is_whole_reference(instance):
            return None
        if keyword != "type" and _has_reference(instance):
            return None
        return check(validator, value, instance, schema)

    return wrapped


_validator_classes: dict[type, type] = {}


def _args_validator(schema: Mapping[str, Any]) -> Validator | None:
    """A reference-aware validator for ``schema``; None for no schema or a broken one."""
    if not schema:
        return None
    return _cached_validator(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _cached_validator(schema_json: str) -> Validator | None:
    """Built once per distinct schema: every plan request carries the same catalog."""
    schema = json.loads(schema_json)
    base = validators.validator_for(schema, default=Draft202012Validator)
    try:
        base.check_schema(schema)
    except SchemaError as error:  # the tool's fault, not the model's: do not block plans
        log.warning("tool input schema is not valid JSON Schema", error=error.message)
        return None
    cls = _validator_classes.get(base)
    if cls is None:
        wrapped = {k: _reference_aware(k, v) for k, v in base.VALIDATORS.items()}
        cls = validators.extend(base, wrapped)
        _validator_classes[base] = cls
    return cls(schema)


def _field(prefix: str, path: Sequence[str | int]) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def schema_violations(
    validator: Validator, args: Mapping[str, Any], at: str
) -> list[FieldViolation]:
    """One violation per problem, named like ``plan[0].args.items[2]``; a missing
    property is reported on the property itself."""
    errors = sorted(validator.iter_errors(dict(args)), key=lambda e: [str(p) for p in e.path])
    violations: list[FieldViolation] = []
    for error in errors:
        path = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            missing = [n for n in error.validator_value if n not in error.instance]
            for name in missing:
                field = _field(f"{at}.args", [*path, name])
                violations.append(FieldViolation(field, f"{name!r} is a required property"))
            continue
        violations.append(FieldViolation(_field(f"{at}.args", path), error.message))
    return violations


class PlanValidator:
    """Validates the nodes of one plan in the order the model emits them.

    ``tools`` are ToolSpecs (whose input schemas are then enforced) or bare names. The
    validator keeps the accepted nodes, so a repair round continues the same plan.
    ``previous`` are the node ids of earlier rounds of the run (a replan): the new plan
    may depend on them but not reuse them, and they do not count toward ``max_nodes``.
    """

    def __init__(
        self,
        tools: Iterable[common_pb2.ToolSpec | str],
        max_nodes: int,
        *,
        previous: Iterable[str] = (),
    ) -> None:
        self._tools: set[str] = set()
        self._schemas: dict[str, Validator | None] = {}
        for tool in tools:
            if isinstance(tool, str):
                self._tools.add(tool)
            else:
                self._tools.add(tool.name)
                self._schemas[tool.name] = _args_validator(from_struct(tool.input_schema))
        self._max_nodes = max_nodes
        self._previous = set(previous)
        self._ids: list[str] = []  # accepted in this plan, in order
        self._accepted: list[tuple[common_pb2.ToolCall, str, dict[str, Any]]] = []

    @property
    def count(self) -> int:
        return len(self._ids)

    def _known(self, node_id: Any) -> bool:
        return isinstance(node_id, str) and (node_id in self._previous or node_id in self._ids)

    @property
    def max_nodes(self) -> int:
        return self._max_nodes

    @property
    def previous_ids(self) -> list[str]:
        """Ids of earlier rounds' nodes and of the nodes accepted so far."""
        return [*self._previous, *self._ids]

    @property
    def full(self) -> bool:
        """No more nodes fit: any further node is over ``max_nodes``."""
        return len(self._ids) >= self._max_nodes

    @property
    def accepted(self) -> list[common_pb2.ToolCall]:
        """The nodes accepted so far, in order."""
        return [call for call, _, _ in self._accepted]

    def is_repeat(self, value: Any) -> bool:
        """Whether ``value`` is an accepted node written again unchanged (same id, tool,
        args and dependencies): what a model often does when asked for the rest."""
        if not isinstance(value, Mapping) or value.get("node_id") not in self._ids:
            return False
        call, tool, args = self._accepted[self._ids.index(value["node_id"])]
        new_args = value.get("args") or {}
        depends = value.get("depends_on") or []
        if value.get("tool") != tool or new_args != args or not isinstance(depends, list):
            return False
        if not all(isinstance(dep, str) for dep in depends):
            return False
        return set(depends) | set(referenced_nodes(new_args)) == set(call.depends_on)

    def check(self, value: Any, line: int | str) -> common_pb2.ToolCall:
        """The node as a ToolCall, or ``InvalidArgument`` (reason INVALID_PLAN, or
        TOO_MANY_NODES past ``max_nodes``, the executor's reason for the same limit).
        ``line`` says where the model wrote it (a line number, or e.g. "tool call 2")."""
        where = f"line {line}" if isinstance(line, int) else line
        at = f"plan[{len(self._ids)}]"
        if self.full:
            raise InvalidArgument(
                f"plan has more than {self._max_nodes} nodes ({where})",
                reason="TOO_MANY_NODES",
                violations=[FieldViolation("plan", f"at most {self._max_nodes} nodes")],
            )
        if not isinstance(value, Mapping):
            raise invalid_plan(
                f"{at} ({where}) is not a JSON object",
                [FieldViolation(at, f"must be a JSON object, got {type(value).__name__}")],
            )
        violations: list[FieldViolation] = []
        node_id = value.get("node_id")
        if not isinstance(node_id, str) or NODE_ID.problem(node_id, required=True) is not None:
            violations.append(FieldViolation(f"{at}.node_id", f"must be {NODE_ID.rule}"))
        elif node_id in self._ids:
            violations.append(FieldViolation(f"{at}.node_id", f"duplicate node_id {node_id!r}"))
        elif node_id in self._previous:
            violations.append(
                FieldViolation(f"{at}.node_id", f"{node_id!r} is used by an earlier round's plan")
            )
        tool = value.get("tool")
        known_tool = isinstance(tool, str) and tool in self._tools
        if not known_tool:
            known = ", ".join(sorted(self._tools)) or "none"
            violations.append(
                FieldViolation(f"{at}.tool", f"unknown tool {quote(tool)} (known: {known})")
            )
        args = value.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            violations.append(FieldViolation(f"{at}.args", "must be a JSON object"))
            args = {}
        elif (problem := args_problem(args)) is not None:
            violations.append(FieldViolation(f"{at}.args", problem))
            args = {}
        elif known_tool and (schema := self._schemas.get(tool)) is not None:  # type: ignore[arg-type]
            violations.extend(schema_violations(schema, args, at))
        depends_on = value.get("depends_on", [])
        if depends_on is None:
            depends_on = []
        if not isinstance(depends_on, list):
            violations.append(FieldViolation(f"{at}.depends_on", "must be an array of node_ids"))
            depends_on = []
        for i, dep in enumerate(depends_on):
            if not self._known(dep):
                violations.append(
                    FieldViolation(
                        f"{at}.depends_on[{i}]", f"{quote(dep)} is not an earlier node_id"
                    )
                )
        for ref in referenced_nodes(args):
            if not self._known(ref):
                violations.append(
                    FieldViolation(f"{at}.args", f"references ${ref}, which is not an earlier node")
                )
        if violations:
            detail = "; ".join(f"{v.field}: {v.description}" for v in violations)
            raise invalid_plan(f"invalid plan node at {where}: {detail}", violations)
        deps = list(dict.fromkeys([*depends_on, *referenced_nodes(args)]))
        self._ids.append(node_id)  # type: ignore[arg-type]  # checked above
        call = common_pb2.ToolCall(
            node_id=node_id, tool=tool, args=to_struct(dict(args)), depends_on=deps
        )
        self._accepted.append((call, tool, dict(args)))  # type: ignore[arg-type]
        return call
