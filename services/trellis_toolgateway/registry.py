"""The set of tools one gateway serves, each with its compiled argument validator.

Schemas are checked and compiled once, when a tool is registered, so a bad schema
stops the service at start-up instead of failing calls, and each call only validates.
The later YAML registry adds tools here the same way the builtins are added.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from jsonschema import Draft202012Validator

from trellis_toolgateway.tools.arithmetic import ArithmeticTool
from trellis_toolgateway.tools.base import Spec, Tool
from trellis_toolgateway.tools.basic import EchoTool, SleepTool
from trellis_toolgateway.tools.command import CommandTool, Launcher


@dataclass(frozen=True)
class Entry:
    tool: Tool
    args_validator: Draft202012Validator
    output_validator: Draft202012Validator


class ToolRegistry:
    """Tools by name. Names are unique; registering a name twice is a bug."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        for tool in tools or ():
            self.register(tool)

    def register(self, tool: Tool) -> None:
        name = tool.spec.name
        if not name:
            raise ValueError("a tool needs a name")
        if name in self._entries:
            raise ValueError(f"tool {name!r} is registered twice")
        for which in ("input_schema", "output_schema"):
            # SchemaError names the broken keyword; let it stop start-up.
            Draft202012Validator.check_schema(getattr(tool.spec, which))
        self._entries[name] = Entry(
            tool,
            Draft202012Validator(tool.spec.input_schema),
            Draft202012Validator(tool.spec.output_schema),
        )

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def specs(self) -> list[Spec]:
        return [e.tool.spec for e in self._entries.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def builtin_registry(
    *,
    command_timeout: float = 10.0,
    command_max_output_bytes: int = 64 * 1024,
    launcher: Launcher | None = None,
) -> ToolRegistry:
    """The builtin tools: arithmetic, run_command, sleep, echo."""
    return ToolRegistry(
        [
            ArithmeticTool(),
            CommandTool(
                timeout=command_timeout,
                max_output_bytes=command_max_output_bytes,
                launcher=launcher,
            ),
            SleepTool(),
            EchoTool(),
        ]
    )
