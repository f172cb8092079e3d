"""Result-cache keys and tags for tool calls.

The key is a hash of everything that determines a result: the tenant (tenants never
see each other's results), the tool and its version (a new version must not serve
old outputs) and the arguments in canonical JSON (key order and spacing do not
matter). Tags let an operator drop every result of one tool or one tenant at once.
"""

from __future__ import annotations

import hashlib
import json

from trellis_toolgateway.tools.base import Json


def canonical_json(value: Json) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def cache_key(tenant: str, tool: str, version: str, args: Json) -> str:
    """sha256 hex of ``[tenant, tool, version, args]`` as canonical JSON."""
    return hashlib.sha256(canonical_json([tenant, tool, version, args]).encode()).hexdigest()


def cache_tags(tool: str, tenant: str) -> list[str]:
    return [f"tool:{tool}", f"tenant:{tenant}"]
