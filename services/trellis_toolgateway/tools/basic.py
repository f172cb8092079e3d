"""``sleep`` and ``echo``: trivial tools for tests, benchmarks and demos of the DAG.

``sleep`` makes critical paths measurable (two parallel 200 ms sleeps should take
200 ms, not 400); ``echo`` hands a value through unchanged, e.g. to exercise
``$n1`` references. Neither is cached: their point is to run.
"""

from __future__ import annotations

import asyncio

from trellis_toolgateway.tools.base import Json, Spec, Tool

MAX_SLEEP_MS = 60_000


class SleepTool(Tool):
    spec = Spec(
        name="sleep",
        description="Wait for the given number of milliseconds, then return it. For tests.",
        input_schema={
            "type": "object",
            "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}},
            "required": ["ms"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"slept_ms": {"type": "integer"}},
            "required": ["slept_ms"],
            "additionalProperties": False,
        },
        cache_ttl=0.0,
        timeout=MAX_SLEEP_MS / 1000 + 5.0,
    )

    async def run(self, args: dict[str, Json]) -> Json:
        ms = int(args["ms"])
        await asyncio.sleep(ms / 1000)
        return {"slept_ms": ms}


class EchoTool(Tool):
    spec = Spec(
        name="echo",
        description="Return the given value unchanged.",
        input_schema={
            "type": "object",
            "properties": {"value": {"description": "Any JSON value."}},
            "required": ["value"],
            "additionalProperties": False,
        },
        output_schema={"description": "The value given."},
        cache_ttl=0.0,
        timeout=1.0,
    )

    async def run(self, args: dict[str, Json]) -> Json:
        return args["value"]
