"""Rules for any tool: match the goal's words to a tool, fill its arguments from the goal.

Deterministic word matching, not understanding:

- A word is a run of letters, lower-cased, of three letters or more, not a stop word,
  with a plural ``s`` dropped ("files" matches "file", "cities" "city"). A tool's *name
  words* are the words of its name (``read_file``, ``getWeather``, ``calc.add``),
  without verbs every tool could have (get, run, fetch, ...); its *other words* come
  from its description and its parameters' names and descriptions.
- Score: 3 for each goal word among the name words, 1 for each among the other words.
  A tool is matched when it scores at least 3 and at least half the best score.
- Arguments by schema type, from what the goal contains: quoted text, URLs, paths
  (``docs/a.md``, ``README.md``), numbers, capitalised words (``Paris``). A parameter
  whose name or description speaks of a URL takes a URL, of a path or file a path; an
  enum takes the value the goal names; a number the next number; other strings the
  next quoted text, else a URL, a path, a capitalised word. A value is used once, the
  required parameters first (in their listed order), then the others by name. A
  required parameter left without a value takes its default, else the tool is not
  planned (its call would be refused).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

STOP_WORDS = frozenset(
    """
    the and for with from into onto this that these those what which who whom whose
    when where why how are was were has have had does did not but you your yours our
    ours its their them they there here then than please can could would should will
    shall may might must all any each every some such only own same very just also
    about above after again against below between both during before under over out
    off more most other too one two use using via per tell show give let want need
    like get set got make made into inside thing things some
    """.split()
)
#: Verbs a tool name may carry that say nothing about what it does.
GENERIC_NAME_WORDS = frozenset("get set run fetch call make use tool show".split())

_LETTERS = re.compile(r"[^\W\d_]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']+)'|“([^”]+)”|`([^`]+)`|«\s*([^»]+?)\s*»")
_URL = re.compile(r"https?://[^\s\"'<>`]+")
_PATH = re.compile(
    r"(?<![\w/.-])(?:[\w.-]*/[\w./-]+|[\w-]+(?:\.[\w-]+)*\.[A-Za-z][\w]{0,7})(?![\w/])"
)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*[A-Za-z])")
_CAPITALISED = re.compile(r"(?<!^)(?<![.!?]\s)\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*\b")
_URL_WORDS = ("url", "uri", "link", "endpoint", "href", "address")
_PATH_WORDS = ("path", "file", "dir", "folder", "filename")


def words(text: str) -> list[str]:
    """The significant words of ``text``, normalised (see the module docstring)."""
    out = []
    for raw in _LETTERS.findall(_CAMEL.sub(" ", text)):
        word = raw.lower()
        if len(word) < 3 or word in STOP_WORDS:
            continue
        if len(word) > 4 and word.endswith("ies"):
            word = word[:-3] + "y"
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def parameters(schema: Any) -> dict[str, Any]:
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    return dict(properties) if isinstance(properties, Mapping) else {}


def tool_words(tool: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(name words, other words) of a tool spec ``{name, description, input_schema}``."""
    name = {w for w in words(str(tool.get("name", ""))) if w not in GENERIC_NAME_WORDS}
    other = set(words(str(tool.get("description", ""))))
    for param, schema in parameters(tool.get("input_schema")).items():
        other.update(words(param))
        if isinstance(schema, Mapping):
            other.update(words(str(schema.get("description", ""))))
    return name, other


def score(goal: str, tool: Mapping[str, Any]) -> int:
    goal_words = set(words(goal))
    name, other = tool_words(tool)
    return 3 * len(goal_words & name) + len(goal_words & other)


def matching(goal: str, tools: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The tools the goal speaks of, in catalog order."""
    scored = [(score(goal, tool), tool) for tool in tools]
    best = max((s for s, _ in scored), default=0)
    return [tool for s, tool in scored if s >= 3 and 2 * s >= best]


@dataclass
class GoalValues:
    """What the goal offers to fill arguments with; each value is taken once."""

    quoted: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    numbers: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, goal: str) -> GoalValues:
        values = cls()
        rest = goal
        for match in _QUOTED.finditer(goal):
            values.quoted.append(next(g for g in match.groups() if g is not None))
        rest = _QUOTED.sub(" ", rest)
        for match in _URL.finditer(rest):
            values.urls.append(match.group(0).rstrip(".,;:!?)]}"))
        rest = _URL.sub(" ", rest)
        values.paths = [m.group(0).rstrip(".") for m in _PATH.finditer(rest)]
        rest = _PATH.sub(" ", rest)
        values.numbers = _NUMBER.findall(rest)
        values.names = _CAPITALISED.findall(rest.strip())
        return values

    @staticmethod
    def take(pool: list[str]) -> str | None:
        return pool.pop(0) if pool else None


def _nullable(schema: Mapping[str, Any]) -> bool:
    """Whether a parameter may be null (a strict schema's way to say optional)."""
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    branches = schema.get("anyOf") or schema.get("oneOf") or []
    return any(isinstance(b, Mapping) and _nullable(b) for b in branches)


def _types(schema: Mapping[str, Any]) -> list[str]:
    """The JSON types a parameter takes (null and whole references left out)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        kinds = [kind]
    elif isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
    else:
        kinds = []
        for branch in schema.get("anyOf") or schema.get("oneOf") or []:
            if isinstance(branch, Mapping) and "pattern" not in branch:
                kinds.extend(_types(branch))
    return [k for k in kinds if k != "null"]


def _number(text: str, integer: bool) -> int | float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if integer:
        return int(value) if value.is_integer() else None
    return int(value) if value.is_integer() and "." not in text else value


def _string(name: str, schema: Mapping[str, Any], values: GoalValues) -> str | None:
    about = f"{name} {schema.get('description', '')} {schema.get('format', '')}".lower()
    if any(w in about for w in _URL_WORDS):
        return values.take(values.urls) or values.take(values.quoted)
    if any(w in about for w in _PATH_WORDS):
        return values.take(values.paths) or values.take(values.quoted)
    for pool in (values.quoted, values.urls, values.paths, values.names):
        if (found := values.take(pool)) is not None:
            return found
    return None


def _value(name: str, schema: Mapping[str, Any], goal: str, values: GoalValues) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        lowered = goal.lower()
        return next((v for v in enum if isinstance(v, str) and v.lower() in lowered), None)
    kinds = _types(schema) or ["string"]
    if ("integer" in kinds or "number" in kinds) and "string" not in kinds:
        while (text := values.take(values.numbers)) is not None:
            if (number := _number(text, "number" not in kinds)) is not None:
                return number
        return None
    if "string" in kinds:
        found = _string(name, schema, values)
        if found is None and ("integer" in kinds or "number" in kinds):
            text = values.take(values.numbers)
            return _number(text, "number" not in kinds) if text is not None else None
        return found
    return None


def fill(goal: str, schema: Any, values: GoalValues | None = None) -> dict[str, Any] | None:
    """Arguments for a tool of ``schema`` from the goal; None when a required parameter
    has no value (nor a default)."""
    values = values or GoalValues.of(goal)
    required = set(schema.get("required") or ()) if isinstance(schema, Mapping) else set()
    args: dict[str, Any] = {}
    properties = parameters(schema)
    # the required ones in their listed order, then the rest by name: a schema's
    # properties may arrive in any order (a protobuf Struct keeps none)
    order = [n for n in (schema.get("required") or ()) if n in properties]
    order += sorted(n for n in properties if n not in order)
    for name in order:
        sub = properties[name]
        sub = sub if isinstance(sub, Mapping) else {}
        value = _value(name, sub, goal, values)
        if value is None and name in required and not _nullable(sub):
            if "default" in sub:
                value = sub["default"]
            elif _types(sub) == ["boolean"]:
                value = False
            else:
                return None
        if value is not None:
            args[name] = value
    return args
