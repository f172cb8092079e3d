"""``trellis tools``: the tool catalog the caller's tenant sees, through the executor.

The executor is the only service a client reaches in a deployment, so it answers
(ExecutorService.ListTools, the gateway's catalog as runs use it). The table shows each
tool's parameters from its input schema (``name?`` is optional), flags and the first line
of its description; ``--json`` prints every ToolSpec, schemas included, one per line.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, seconds
from trellis_cli.executor_call import DEFAULT_TARGET, ApiKey, Json, Target, Tenant, call
from trellis_cli.runs import to_json
from trellis_cli.view import WIDE_COLUMNS

console = Console()


def parameters(schema: dict[str, Any]) -> str:
    """``expression: string, path?: string`` from a JSON Schema of an object."""
    required = set(schema.get("required", []))
    parts = []
    for name, spec in (schema.get("properties") or {}).items():
        kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
        kind = "|".join(kind) if isinstance(kind, list) else str(kind)
        parts.append(f"{name}{'' if name in required else '?'}: {kind}")
    return ", ".join(parts) or "-"


def flags(spec: common_pb2.ToolSpec) -> str:
    found = []
    if spec.side_effects:
        found.append("side effects")
    if seconds(spec.cache_ttl):
        found.append(f"cached {seconds(spec.cache_ttl):g} s")
    return ", ".join(found)


def tools_table(specs: list[common_pb2.ToolSpec], width: int) -> Table:
    wide = width >= WIDE_COLUMNS
    table = Table(expand=True)
    table.add_column("tool", no_wrap=True)
    table.add_column("parameters", overflow="fold", max_width=48 if wide else 28)
    if wide:
        table.add_column("flags", no_wrap=True)
    table.add_column("description", ratio=1, overflow="fold")
    for spec in specs:
        first = (spec.description.strip().splitlines() or [""])[0]
        cells = [spec.name, parameters(from_struct(spec.input_schema))]
        if wide:
            cells.append(flags(spec))
        table.add_row(*cells, first)
    return table


def tools(
    as_json: Json = False,
    target: Target = DEFAULT_TARGET,
    api_key: ApiKey = "",
    tenant: Tenant = context.DEFAULT_TENANT,
    timeout: float = typer.Option(30.0, help="Seconds the call may take."),
) -> None:
    """The tools your tenant may use, with their parameters (--json: full schemas)."""

    specs = call(target, api_key, tenant, timeout, lambda client: client.list_tools())
    specs.sort(key=lambda spec: spec.name)
    if as_json:
        for spec in specs:
            typer.echo(to_json(spec))
        return
    console.print(tools_table(specs, console.width))
