"""Who may drop whose cached results (``InvalidateCache``). No gRPC here.

A caller drops its own tenant's results. A caller whose tenant is one of the admin
tenants (``TRELLIS_CACHE_ADMIN_TENANTS``) may also name another tenant, or all of them.
The caller's tenant is its ``x-tenant-id``, which the gateway trusts like every
internal hop (README "Trust inside"): the gateway is reachable only inside the
deployment, so an operator calls it from there (``docker compose exec toolgateway
trellis cache invalidate ...``, ``kubectl exec``), and the admin list keeps one
tenant's tooling from dropping another's results by mistake.
"""

from __future__ import annotations

from collections.abc import Iterable

from trellis.runtime.errors import FieldViolation, InvalidArgument, PermissionDenied


class CacheAdmins:
    """The admin tenants, and the scope a request may reach."""

    def __init__(self, tenants: Iterable[str] = ()) -> None:
        self.tenants = frozenset(tenants)

    def scope(self, caller: str, tenant_id: str, all_tenants: bool) -> str | None:
        """Whose results: a tenant, or None for every tenant's.

        ``InvalidArgument`` for a malformed request; ``PermissionDenied``
        (``CACHE_ADMIN_REQUIRED``) when a caller who is not an admin reaches beyond its
        own tenant.
        """
        if tenant_id and all_tenants:
            raise InvalidArgument(
                "give tenant_id or all_tenants, not both",
                reason="TENANT_SCOPE_CONFLICT",
                violations=[FieldViolation("all_tenants", "set together with tenant_id")],
            )
        wanted = None if all_tenants else tenant_id or caller
        if wanted != caller and caller not in self.tenants:
            whose = "every tenant's" if wanted is None else f"tenant {wanted!r}'s"
            raise PermissionDenied(
                f"tenant {caller!r} may drop only its own cached results, not {whose};"
                " admin tenants are set with TRELLIS_CACHE_ADMIN_TENANTS",
                reason="CACHE_ADMIN_REQUIRED",
                metadata={"tenant": caller},
            )
        return wanted
