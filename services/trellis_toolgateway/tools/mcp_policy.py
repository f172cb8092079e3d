"""The execution policy of each MCP tool: its server's annotations, the file's overrides.

An MCP server says how each tool behaves through annotation hints (``readOnlyHint``,
``destructiveHint``, ``idempotentHint``); the gateway turns them into policy:

- read-only: no side effects; cacheable when the server entry or the tool sets a
  ``cache_ttl``; safe to send again after a lost connection;
- destructive, or not idempotent (the spec's defaults once a tool is not read-only):
  ``side_effects`` (an idempotency key, never cached) and never retried;
- idempotent and not destructive: no side effects but never cached (it writes), retried
  as the entry says, safe to send again.

A tool whose server gives none of the three hints follows its server entry (as the
gateway has always done): ``side_effects`` as the entry says (false by default), and it
is not sent again after a lost connection (nobody said it is safe). A server entry's
``side_effects: true`` makes every tool side-effecting whatever its hints say (the safe
direction). Per tool, ``tools.<name>`` in the entry has the last word: ``read_only``,
``destructive`` and ``idempotent`` replace the server's hints, and any policy field given
(``side_effects``, ``cache_ttl``, ``retries``, ``timeout``, ``description``, ...) replaces
the result; a tool that ends up side-effecting is still never cached, and not retried
unless its override gives ``retries``.

``include``/``exclude`` (shell-style patterns of the server's names) choose which tools
are served at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import mcp.types as mcp_types

from trellis_toolgateway.tools.config import McpServer, McpToolPolicy

#: The ``Spec`` fields the file decides for an MCP tool (the contract is the server's).
_POLICY_FIELDS = (
    "version",
    "side_effects",
    "cache_ttl",
    "timeout",
    "max_concurrency",
    "cost_nano_usd",
    "shared_cache",
    "retries",
    "max_result_bytes",
)


@dataclass(frozen=True)
class Hints:
    """A tool's behaviour hints; None where nobody said."""

    read_only: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None

    @classmethod
    def of(
        cls, annotations: mcp_types.ToolAnnotations | None, override: McpToolPolicy | None
    ) -> Hints:
        """The server's hints, each replaced by the file's where it gives one."""
        given = override.model_fields_set if override is not None else set()

        def hint(name: str, server_value: bool | None) -> bool | None:
            return getattr(override, name) if name in given else server_value

        a = annotations
        return cls(
            read_only=hint("read_only", a.read_only_hint if a else None),
            destructive=hint("destructive", a.destructive_hint if a else None),
            idempotent=hint("idempotent", a.idempotent_hint if a else None),
        )

    @property
    def known(self) -> bool:
        return (self.read_only, self.destructive, self.idempotent) != (None, None, None)

    @property
    def side_effects(self) -> bool:
        """What the hints say, with the spec's defaults for the missing ones."""
        if self.read_only:
            return False
        destructive = True if self.destructive is None else self.destructive
        return destructive or not self.idempotent

    @property
    def safe_to_repeat(self) -> bool:
        """Whether sending the call twice does no harm (read-only or idempotent)."""
        return bool(self.read_only or self.idempotent)


def policy_of(
    config: McpServer, name: str, annotations: mcp_types.ToolAnnotations | None
) -> tuple[dict[str, Any], bool]:
    """The ``Spec`` fields of the server's tool ``name`` the file and hints decide
    (``description`` only when the file overrides it), and whether a call of it is safe
    to send again (see the module docstring)."""
    override = config.tools.get(name)
    hints = Hints.of(annotations, override)
    policy: dict[str, Any] = {field: getattr(config, field) for field in _POLICY_FIELDS}
    if hints.known:
        explicit = config.side_effects and "side_effects" in config.model_fields_set
        policy["side_effects"] = hints.side_effects or explicit
        if not hints.read_only:
            policy["cache_ttl"] = 0.0  # a write is never served from the cache
    given = override.model_fields_set if override is not None else set()
    for field in (*_POLICY_FIELDS, "description"):
        if field in given and getattr(override, field) is not None:
            policy[field] = getattr(override, field)
    if policy["side_effects"]:
        policy["cache_ttl"] = 0.0  # never cached, whatever TTL was given
        if "retries" not in given:
            policy["retries"] = 0  # it may have taken effect: never run again by a retry
    policy["max_result_bytes"] = policy["max_result_bytes"] or 0  # 0: the gateway's default
    return policy, hints.safe_to_repeat


def served(config: McpServer, name: str) -> bool:
    """Whether the server's tool ``name`` passes the entry's ``include``/``exclude``."""
    if config.include and not any(fnmatchcase(name, p) for p in config.include):
        return False
    return not any(fnmatchcase(name, p) for p in config.exclude)


def unknown_overrides(config: McpServer, names: set[str]) -> list[str]:
    """``tools.<name>`` overrides naming no tool the server lists (a typo, most likely)."""
    return sorted(set(config.tools) - names)
