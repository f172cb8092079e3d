"""Result-cache keys and tags, and idempotency keys, for tool calls.

The cache key is a hash of everything that determines a result: the tenant (tenants
never see each other's results), the tool and its version (a new version must not
serve old outputs) and the arguments in canonical JSON (key order and spacing do not
matter). A tool whose output is the same for everyone (``shared_cache: true``) drops
the tenant: its slot holds JSON ``null``, which no tenant id (a string) can collide
with. Tags let an operator drop every result of one tool or one tenant at once, and
name results by argument for invalidation (``trellis_toolgateway.invalidation``):
``arg:`` one argument's value, ``under:`` a path argument at or below a directory,
hashed so any value fits the cache's tag rule.

Idempotency keys are the caller's key scoped the same way (tenant and tool), so one
tenant can never replay, or block, another tenant's side effects.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from trellis_toolgateway.tools.base import Json

#: Tag of results cached across tenants (``shared_cache``): not dropped with a tenant.
SHARED_TAG = "tenant:*shared*"


def canonical_json(value: Json) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(value: Json) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def cache_key(tenant: str, tool: str, version: str, args: Json, *, shared: bool = False) -> str:
    """sha256 hex of ``[tenant, tool, version, args]`` as canonical JSON.

    ``shared``: the result is the same for every tenant, so the tenant is left out.
    """
    return _digest([None if shared else tenant, tool, version, args])


def tool_tag(tool: str) -> str:
    return f"tool:{tool}"


def tenant_tag(tenant: str, *, shared: bool = False) -> str:
    return SHARED_TAG if shared else f"tenant:{tenant}"


def cache_tags(tool: str, tenant: str, *, shared: bool = False) -> list[str]:
    return [tool_tag(tool), tenant_tag(tenant, shared=shared)]


def arg_tag(tool: str, name: str, value: Json) -> str:
    """Results of ``tool`` whose argument ``name`` is ``value``."""
    return "arg:" + _digest([tool, name, value])


def under_tag(tool: str, name: str, directory: str) -> str:
    """Results of ``tool`` whose path argument ``name`` is ``directory`` or inside it."""
    return "under:" + _digest([tool, name, directory])


def normal_path(path: str) -> str:
    """``path`` lexically normal: ``a//b/./c/`` -> ``a/b/c``, empty -> ``.``."""
    return posixpath.normpath(path) if path else "."


def path_prefixes(path: str) -> list[str]:
    """The directories a normal ``path`` is in, then itself, outermost first:
    ``a/b`` -> ``[".", "a", "a/b"]``, ``/x/y`` -> ``["/", "/x", "/x/y"]``."""
    if path in (".", "/"):
        return [path]
    absolute = path.startswith("/")
    parts = path.strip("/").split("/")
    root = "/" if absolute else "."
    prefixes = [root]
    for i in range(1, len(parts) + 1):
        joined = "/".join(parts[:i])
        prefixes.append("/" + joined if absolute else joined)
    return prefixes


def idempotency_scope(tenant: str, tool: str, key: str) -> str:
    """The store key of a caller's idempotency ``key``: per tenant and tool."""
    return "idem:" + _digest([tenant, tool, key])


def args_fingerprint(args: Json) -> str:
    """Identifies a call's arguments, to catch one idempotency key reused for another call."""
    return _digest(args)
