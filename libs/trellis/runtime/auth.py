"""API keys: who is calling, and so which tenant a request acts for.

A client presents its key as gRPC metadata ``authorization: Bearer <key>`` (the HTTP
convention, so Envoy, grpcurl ``-H`` and every gRPC library pass it unchanged). The
server knows keys only by their SHA-256 (lowercase hex), each mapped to one tenant:

- ``TRELLIS_API_KEYS``: a JSON object ``{"<sha256 hex>": "<tenant>", ...}``;
- ``TRELLIS_API_KEYS_FILE``: lines ``<sha256 hex> <tenant>`` (``#`` starts a comment),
  the line ``trellis keys new --tenant T`` prints.

Both may be given; a hash listed twice must name the same tenant. Several keys may map
to one tenant (rotation: add the new key, move clients, remove the old one).

Why a plain SHA-256 and a dict lookup: keys are generated with 256 bits of randomness
(``new_key``), so there is nothing to brute-force and no need for a slow, salted
password hash; a leaked key table gives no key. The presented key is hashed before
anything is compared, and the digest is looked up in a dict. A timing difference can
then only tell an attacker something about the digests of their own guesses, never
bytes of a valid key, and learning (part of) a stored digest does not help to find a
key with that digest (SHA-256 preimage resistance). So no byte-by-byte comparison of
secret material happens, and ``hmac.compare_digest`` over every configured hash (an
O(n) scan per call) would add nothing.

This module is gRPC-free: the server's rules interceptor
(``trellis.runtime.interceptors``) calls ``ApiKeys.authenticate`` with the metadata
value and runs the handler as the returned tenant.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trellis.runtime.errors import Unauthenticated, quote
from trellis.runtime.settings import json_object
from trellis.runtime.validation import TENANT_ID

#: The metadata key a client sends its key in, as ``Bearer <key>``.
AUTHORIZATION_METADATA_KEY = "authorization"
SCHEME = "Bearer"
#: Prefix of generated keys (recognisable in a secret scanner, never in a hash).
KEY_PREFIX = "trk_"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class KeyConfigError(ValueError):
    """A key table that cannot be used (bad hash, bad tenant, conflicting entries)."""


def new_key() -> str:
    """A fresh API key: ``trk_`` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 (lowercase hex) under which a key is configured."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> str:
    """The ``authorization`` metadata value carrying ``key``."""
    return f"{SCHEME} {key}"


def key_line(key_hash: str, tenant: str) -> str:
    """One line of a keys file."""
    return f"{key_hash} {tenant}"


def validate_tenant(tenant: str) -> str:
    """``tenant`` if it follows ``TENANT_ID`` (it ends up in metadata, cache keys, ledger
    rows and metric labels); ``KeyConfigError`` otherwise."""
    if not TENANT_ID.pattern.fullmatch(tenant):
        raise KeyConfigError(f"tenant {quote(tenant)} must be {TENANT_ID.rule}")
    return tenant


def _entry(key_hash: str, tenant: object, where: str) -> tuple[str, str]:
    normalized = key_hash.strip().lower()
    if not _SHA256_HEX.fullmatch(normalized):
        raise KeyConfigError(
            f"{where}: {key_hash!r} is not a SHA-256 hex digest (64 hex characters; "
            "configure the hash of a key, never the key: `trellis keys hash`)"
        )
    if not isinstance(tenant, str):
        raise KeyConfigError(f"{where}: the tenant must be a string, not {tenant!r}")
    try:
        return normalized, validate_tenant(tenant.strip())
    except KeyConfigError as error:
        raise KeyConfigError(f"{where}: {error}") from None


def _merge(into: dict[str, str], key_hash: str, tenant: str, where: str) -> None:
    known = into.setdefault(key_hash, tenant)
    if known != tenant:
        raise KeyConfigError(
            f"{where}: key {key_hash[:12]}... is mapped to both {known!r} and {tenant!r}"
        )


def parse_key_map(value: object) -> dict[str, str]:
    """``TRELLIS_API_KEYS``: a JSON object (text or already decoded) of hash -> tenant."""
    try:
        entries = json_object(value, '{"<sha256 hex>": "<tenant>"}')
    except ValueError as error:
        raise KeyConfigError(str(error)) from None
    keys: dict[str, str] = {}
    for raw_hash, tenant in entries.items():
        key_hash, tenant = _entry(str(raw_hash), tenant, f"entry {str(raw_hash)[:12]!r}")
        _merge(keys, key_hash, tenant, f"entry {str(raw_hash)[:12]!r}")
    return keys


def parse_keys_file(text: str) -> dict[str, str]:
    """A keys file's text: ``<sha256 hex> <tenant>`` per line, ``#`` comments, blank lines."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyConfigError(f"line {number}: expected '<sha256 hex> <tenant>'")
        key_hash, tenant = _entry(parts[0], parts[1], f"line {number}")
        _merge(keys, key_hash, tenant, f"line {number}")
    return keys


def read_keys_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise KeyConfigError(f"{path}: cannot read ({error})") from None
    try:
        return parse_keys_file(text)
    except KeyConfigError as error:
        raise KeyConfigError(f"{path}: {error}") from None


def _parse_authorization(value: str) -> str | None:
    """The key of ``Bearer <key>`` (scheme case-insensitive); None if not that shape."""
    scheme, _, key = value.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != SCHEME.lower() or not key or " " in key:
        return None
    return key


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys (by hash) and the tenant of each."""

    tenants: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, keys: Mapping[str, str] | None = None, path: Path | None = None) -> ApiKeys:
        """Keys from a hash -> tenant mapping and/or a keys file; a conflict is an error."""
        merged = parse_key_map(dict(keys or {}))
        if path is not None:
            for key_hash, tenant in read_keys_file(path).items():
                _merge(merged, key_hash, tenant, str(path))
        return cls(merged)

    def __len__(self) -> int:
        return len(self.tenants)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of ``key``, or None when it is not a configured key."""
        return self.tenants.get(hash_key(key))

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of the ``authorization`` metadata value, or ``Unauthenticated``
        with reason ``API_KEY_MISSING`` (no value) or ``API_KEY_INVALID``."""
        metadata = {"metadata_key": AUTHORIZATION_METADATA_KEY, "scheme": SCHEME}
        if not authorization or not authorization.strip():
            raise Unauthenticated(
                f"an API key is required: send metadata '{AUTHORIZATION_METADATA_KEY}: "
                f"{SCHEME} <key>'",
                reason="API_KEY_MISSING",
                metadata=metadata,
            )
        key = _parse_authorization(authorization)
        tenant = None if key is None else self.tenant_of(key)
        if tenant is None:
            message = (
                "the API key is not valid"
                if key is not None
                else f"'{AUTHORIZATION_METADATA_KEY}' must be '{SCHEME} <key>'"
            )
            raise Unauthenticated(message, reason="API_KEY_INVALID", metadata=metadata)
        return tenant
