"""Answers to the gateway's model tools: strict structured output, made up by rules.

A chat request whose ``response_format`` is a JSON Schema (OpenAI's strict structured
output) and that is neither a Trellis plan nor a join prompt (no ``tools`` in the body,
no ``## Tools`` or ``## Outcomes`` section) is a model tool's call
(``trellis_toolgateway.tools.model``). The answer is a JSON value matching the schema,
made deterministically from the prompt's text: a string takes the text's first words
(its first sentence for a ``summary``), an integer counts words (characters for a
``chars`` or ``length``), a boolean is false, an enum its first value, an array of
strings the sentences. The same prompt always gets the same answer and different
prompts different ones, which is what caching and batching need to be tested.

A batch (a ``{"results": [...]}`` schema and a prompt with ``## Item <n>`` sections, each
with ``### <role>`` sections: the gateway's format) gets one answer per item, each made
from that item's own text.

Embeddings (``vectors``): each text hashed into a fixed-length vector (a feature hash of
its lower-cased words, L2-normalised), so equal texts get equal vectors and texts that
share words point the same way: enough for retrieval demos, with no weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trellis_offline_model.conversation import message_text

#: The name the planner gives its plan's JSON Schema (a json_schema plan request).
PLAN_SCHEMA_NAME = "trellis_plan"

EMBEDDING_MODEL_ID = "trellis-offline-embed-v1"
#: Length of the vectors when a request names no ``dimensions``.
DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 4096

_ITEM = re.compile(r"^##\s+Item\s+(\d+)\s*$")
_ROLE = re.compile(r"^###\s+(system|user|assistant)\s*$")
_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
#: Words a made-up string takes.
STRING_WORDS = 12
SUMMARY_WORDS = 20

Json = Any


def structured_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON Schema a model tool's request asks its answer to match, if it is one."""
    response_format = body.get("response_format")
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping) or body.get("tools"):
        return None
    if spec.get("name") == PLAN_SCHEMA_NAME:  # the planner asking for a plan, not a tool
        return None
    return schema


def answer(body: Mapping[str, Any]) -> str | None:
    """The structured answer to a model tool's request; None when it is not one."""
    schema = structured_schema(body)
    if schema is None:
        return None
    messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
    texts = [message_text(m) for m in messages if m.get("role") == "user"]
    text = texts[-1] if texts else ""
    items = batch_items(text)
    results = _results_schema(schema)
    if items and results is not None:
        value: Json = {"results": [fill(results, item) for item in items]}
    else:
        value = fill(schema, text)
    return json.dumps(value, ensure_ascii=False)


def batch_items(text: str) -> list[str]:
    """The text of each ``## Item <n>`` section (its user messages), in order."""
    items: list[list[str]] = []
    role = ""
    for line in text.splitlines():
        if _ITEM.match(line):
            items.append([])
            role = ""
        elif (heading := _ROLE.match(line)) is not None:
            role = heading.group(1)
        elif items and role in ("user", ""):
            items[-1].append(line)
    return ["\n".join(lines).strip() for lines in items]


def _results_schema(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    results = (schema.get("properties") or {}).get("results")
    if isinstance(results, Mapping) and results.get("type") == "array":
        items = results.get("items")
        return items if isinstance(items, Mapping) else {}
    return None


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _string(name: str, text: str) -> str:
    if "summary" in name:
        first = _sentences(text)[:1]
        return " ".join(" ".join(first).split()[:SUMMARY_WORDS])
    return " ".join(_words(text)[:STRING_WORDS])


def _count(name: str, text: str) -> int:
    if "char" in name or "length" in name:
        return len(text)
    return len(_words(text))


def fill(schema: Mapping[str, Any], text: str, name: str = "") -> Json:
    """A value matching ``schema`` (the subset strict structured output uses), from ``text``."""
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            return fill(options[0], text, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {
            key: fill(sub if isinstance(sub, Mapping) else {}, text, key.lower())
            for key, sub in properties.items()
        }
    if kind == "array":
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        least = int(schema.get("minItems") or 0)
        most = schema.get("maxItems")
        if items.get("type") == "string":
            values: list[Json] = _sentences(text)[:3] or [""]
        else:
            values = [fill(items, text, name)]
        while len(values) < least:
            values.append(values[-1])
        return values[: int(most)] if isinstance(most, int) else values
    if kind == "string":
        return _string(name, text)
    if kind in ("integer", "number"):
        return _count(name, text)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string(name, text)


def vectors(texts: Sequence[str], dimensions: int = DEFAULT_DIMENSIONS) -> list[list[float]]:
    """A unit vector of ``dimensions`` numbers per text (feature hashing of its words)."""
    out = []
    for text in texts:
        vector = [0.0] * dimensions
        for word in _words(text.lower()):
            digest = hashlib.sha256(word.encode()).digest()
            index = int.from_bytes(digest[:4], "big") % dimensions
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        out.append([v / norm for v in vector] if norm else vector)
    return out


def embedding_request(body: Any) -> tuple[list[str], int] | str:
    """The texts and vector length of an embeddings request body, or what is wrong with it."""
    if not isinstance(body, Mapping):
        return "The request body must be a JSON object"
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "'input' must be a string or a non-empty array of strings"
    if len(texts) > 2048:
        return "'input' may hold at most 2048 texts"
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        return "'dimensions' must be an integer"
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        return f"'dimensions' must be between 1 and {MAX_DIMENSIONS}"
    return texts, dimensions
