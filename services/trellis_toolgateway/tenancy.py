"""Which tools each tenant may use (``TRELLIS_TENANT_TOOLS``), decided at the gateway.

Configuration, a JSON object of tenant -> list of tool names or shell-style patterns
(``fnmatch``: ``"files_*"``, ``"*"`` for every tool)::

    {"acme": ["arithmetic", "run_command"], "beta": ["*"], "*": ["echo"]}

The ``"*"`` entry is the policy of every tenant not listed. Without it, unlisted
tenants may use every tool, and an empty object (the default) restricts nobody; write
``"*": []`` to deny by default.

Complete mediation: the gateway checks every ``InvokeTool`` against the tenant of the
call, whatever planned it (a model, an explicit plan from a client, a resumed run), and
raises ``PermissionDenied`` (reason ``TOOL_NOT_ALLOWED``) before the tool is looked up,
so a denied tenant learns nothing about which other tools exist. ``ListTools`` answers
only with the tenant's tools, so a planner never sees (or proposes) the others and the
executor refuses an explicit plan naming them; that is convenience, the check here is
the guarantee. The tenant is the call's ``x-tenant-id``, set by the executor from the
caller's API key (``trellis.runtime.auth``). No gRPC here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol, TypeVar

from trellis.runtime.auth import KeyConfigError, validate_tenant
from trellis.runtime.errors import PermissionDenied
from trellis.runtime.settings import json_object

#: The entry that applies to every tenant not listed.
OTHER_TENANTS = "*"
_WILDCARDS = frozenset("*?[")


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def parse_tenant_tools(value: object) -> dict[str, list[str]]:
    """``TRELLIS_TENANT_TOOLS`` (JSON text or decoded) checked and normalised; ValueError
    naming the bad entry otherwise."""
    entries = json_object(value, '{"<tenant>": ["<tool or pattern>", ...]}')
    rules: dict[str, list[str]] = {}
    for tenant, tools in entries.items():
        if tenant != OTHER_TENANTS:
            try:
                validate_tenant(str(tenant))
            except KeyConfigError as error:
                raise ValueError(str(error)) from None
        if not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools):
            raise ValueError(f"{tenant!r}: expected a list of tool names or patterns")
        rules[str(tenant)] = [t.strip() for t in tools]
    return rules


def parse_tenant_list(value: object) -> list[str]:
    """A list of tenants (comma-separated or JSON text, or decoded), each checked;
    ValueError naming the bad one otherwise."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else text.split(",") if text else []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("expected tenants, comma-separated or as a JSON list")
    tenants = [t.strip() for t in value]
    for tenant in tenants:
        try:
            validate_tenant(tenant)
        except KeyConfigError as error:
            raise ValueError(str(error)) from None
    return list(dict.fromkeys(tenants))


@dataclass(frozen=True)
class _Allowed:
    """One tenant's allow-list: exact names, and patterns."""

    names: frozenset[str]
    patterns: tuple[str, ...]

    @classmethod
    def of(cls, entries: Iterable[str]) -> _Allowed:
        entries = list(entries)
        return cls(
            frozenset(e for e in entries if not _WILDCARDS & set(e)),
            tuple(e for e in entries if _WILDCARDS & set(e)),
        )

    def __contains__(self, tool: str) -> bool:
        return tool in self.names or any(fnmatchcase(tool, p) for p in self.patterns)


@dataclass(frozen=True)
class TenantTools:
    """The policy: ``allows(tenant, tool)``; built once from the settings."""

    rules: Mapping[str, _Allowed] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Mapping[str, Iterable[str]]) -> TenantTools:
        return cls({tenant: _Allowed.of(tools) for tenant, tools in config.items()})

    def allows(self, tenant: str, tool: str) -> bool:
        allowed = self.rules.get(tenant, self.rules.get(OTHER_TENANTS))
        return allowed is None or tool in allowed

    def restricted(self, tenant: str) -> bool:
        """Whether a rule limits ``tenant`` (then it sees only what concerns its tools)."""
        allowed = self.rules.get(tenant, self.rules.get(OTHER_TENANTS))
        return allowed is not None and "*" not in allowed.patterns

    def check(self, tenant: str, tool: str) -> None:
        """Raise ``PermissionDenied`` (TOOL_NOT_ALLOWED) unless ``tenant`` may use ``tool``."""
        if not self.allows(tenant, tool):
            raise PermissionDenied(
                f"tenant {tenant!r} may not use tool {tool!r}",
                reason="TOOL_NOT_ALLOWED",
                metadata={"tenant": tenant, "tool": tool},
            )

    def visible(self, tenant: str, specs: Iterable[N]) -> list[N]:
        """The tools (specs) among ``specs`` that ``tenant`` may use."""
        return [spec for spec in specs if self.allows(tenant, spec.name)]
