"""Request-scoped state that must follow a request across hops: deadline, tenant, session.

Python gRPC does not propagate deadlines, so the server interceptor records the
incoming call's deadline here and the client interceptor shortens every onward call
to it. Tenant identity travels the same way as ``x-tenant-id`` metadata. Core code
never touches gRPC; it only reads ``remaining()`` and ``tenant()`` when it needs them. A
run's session id travels as ``x-trellis-session-id`` so that what the run's calls use is
recorded in the ledger under the session (``session()``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

TENANT_METADATA_KEY = "x-tenant-id"
DEFAULT_TENANT = "default"
SESSION_METADATA_KEY = "x-trellis-session-id"

_deadline: ContextVar[float | None] = ContextVar("trellis_deadline", default=None)
_tenant: ContextVar[str] = ContextVar("trellis_tenant", default=DEFAULT_TENANT)
_session: ContextVar[str] = ContextVar("trellis_session", default="")


def remaining() -> float | None:
    """Seconds left before the current request's deadline; None when it has none."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def call_timeout(default: float) -> float:
    """Timeout for an onward call: ``default``, shortened to the request's deadline."""
    left = remaining()
    return default if left is None else max(0.0, min(default, left))


def tenant() -> str:
    """The tenant the current request acts for."""
    return _tenant.get()


def session() -> str:
    """The session of the run the current request serves ("" when none)."""
    return _session.get()


@contextmanager
def request_scope(
    *,
    timeout: float | None = None,
    tenant_id: str | None = None,
    detached: bool = False,
    session_id: str | None = None,
) -> Iterator[None]:
    """Run a block as one request: with a deadline ``timeout`` seconds away and a tenant.

    A nested scope can only shorten the deadline, never extend it, unless it is
    ``detached``: work that must outlive the request that started it (recording what
    a finished call used) gets its own deadline, ``timeout`` or none.
    """
    tokens = []
    if detached:
        new_deadline = None if timeout is None else time.monotonic() + timeout
        tokens.append((_deadline, _deadline.set(new_deadline)))
    elif timeout is not None:
        new_deadline = time.monotonic() + timeout
        current = _deadline.get()
        if current is None or new_deadline < current:
            tokens.append((_deadline, _deadline.set(new_deadline)))
    if tenant_id:
        tokens.append((_tenant, _tenant.set(tenant_id)))
    if session_id is not None:
        tokens.append((_session, _session.set(session_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)  # type: ignore[attr-defined]
