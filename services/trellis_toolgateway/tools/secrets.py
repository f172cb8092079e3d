"""``${VAR}`` secrets of the tools file: read from the environment, kept out of outputs.

HTTP tool headers, and an MCP server's ``env`` and ``headers``, may reference environment
variables (``Authorization: Bearer ${API_TOKEN}``) so that the file holds no secret. They
are resolved when the entry loads (a variable that is not set is a file error naming the
place), and every value read is registered with ``trellis.runtime.redact``, so the logs,
spans, errors and result cache of the whole process keep it out. A backend that echoes
what it was sent (a server printing its environment, an API echoing a header) cannot
leak it through a tool's output either: its tools pass their outputs and errors through
``scrub``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trellis.runtime.redact import register_secret
from trellis_toolgateway.tools.base import Json
from trellis_toolgateway.tools.config import ENV_REFERENCE

#: Shorter secrets are not scrubbed (replacing every "a" in an output helps nobody).
MIN_SCRUBBED_SECRET = 4
REDACTED = "[redacted]"


class MissingSecret(ValueError):
    """A template references an environment variable that is not set."""

    def __init__(self, key: str, variable: str) -> None:
        super().__init__(f"environment variable {variable} is not set")
        self.key = key
        self.variable = variable

    @property
    def header(self) -> str:
        """The key, under the name HTTP tools used for it."""
        return self.key


@dataclass(frozen=True)
class Resolved:
    """Templates with their ``${VAR}`` references filled in, and the values read."""

    values: dict[str, str]
    #: The values read (at least ``MIN_SCRUBBED_SECRET`` long), longest first.
    secrets: tuple[str, ...]

    def scrub(self, value: Json) -> Json:
        return scrub(value, self.secrets)


def resolve(templates: Mapping[str, str], environ: Mapping[str, str] | None = None) -> Resolved:
    """``templates`` with ``${VAR}`` read from ``environ`` (None: ``os.environ``);
    ``MissingSecret`` naming the key when a variable is not set."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    read: set[str] = set()
    for key, template in templates.items():
        for variable in ENV_REFERENCE.findall(template):
            if variable not in environ:
                raise MissingSecret(key, variable)
            read.add(environ[variable])
        values[key] = ENV_REFERENCE.sub(lambda m: environ[m.group(1)], template)
    kept = (secret for secret in read if len(secret) >= MIN_SCRUBBED_SECRET)
    secrets = tuple(sorted(kept, key=len, reverse=True))
    for secret in secrets:
        register_secret(secret)
    return Resolved(values, secrets)


def scrub(value: Json, secrets: Sequence[str]) -> Json:
    """``value`` with every secret replaced by ``[redacted]`` (strings, keys, nested)."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    return value
