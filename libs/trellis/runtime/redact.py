"""Secrets kept out of everything Trellis writes about a request: the one home of redaction.

A secret is

- a *registered value*: every ``SecretStr``/``SecretBytes`` of a service's settings
  (``register_settings``, called by the server bootstrap at start-up) and any value a
  module knows to be secret (``register_secret``: the ``${ENV}`` header values of HTTP
  tools, the API keys of the auth layer). Values shorter than ``MIN_SECRET_LENGTH`` are
  not registered: masking every occurrence of a short word would wreck logs and still
  protect nothing (no real credential is that short);
- the value of a field whose *name* says it is one (``sensitive_key``): authorization,
  api_key, x-api-key, password, secret, token, cookie, private_key, ...;
- a credential recognisable by its shape in any text: ``Bearer <token>`` and OpenAI-style
  ``sk-...`` keys (``redact_text``).

Where redaction is applied, each a one-line hook into this module:

- logs: ``redact_event`` is the last structlog processor before rendering (``logs.py``),
  so every line, stdlib loggers' and tracebacks included, is scrubbed;
- spans: exporters only see ``redact_span`` copies (``telemetry.py``): name, attributes,
  events (recorded exceptions) and status description;
- errors: ``to_status`` (``errors.py``) scrubs the message, ErrorInfo metadata and
  BadRequest violations of every error leaving a server; the executor and gateway scrub
  the ``Error`` of a run and of a node the same way (``redact_text``/``redact_details``);
- the result cache: the gateway never stores a result in which ``contains_secret`` finds a
  registered value (it is not cached, ``trellis_cache_requests_total{result="secret"}``).

Not redacted, on purpose: a tool's output, a run's plan and its answer are the data the
caller asked for. They are returned to the caller and kept in the run store (``GetRun``)
as they are, and they are never logged, put on spans, or cached when they hold a secret.
Each process redacts the secrets *it* knows (its own settings and registrations).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Status
from pydantic import BaseModel, SecretBytes, SecretStr

REDACTED = "[redacted]"
#: Shorter values are not registered (see the module docstring).
MIN_SECRET_LENGTH = 8

#: Field names whose values are secret whatever they hold; the name's last word decides,
#: so ``gen_ai.usage.input_tokens`` is not a token but ``http.request.header.authorization``
#: and ``openai_api_key`` are secret.
_SENSITIVE_KEY = re.compile(
    r"(?:^|[._\-\s/])(?:"
    r"authorization|proxy[_-]authorization|x[_-]api[_-]keys?|api[_-]?keys?|access[_-]?keys?"
    r"|secret[_-]?keys?|private[_-]?keys?|client[_-]?secrets?|secrets?|passwords?|passwd"
    r"|passphrase|token|access[_-]?tokens?|refresh[_-]?tokens?|id[_-]?tokens?"
    r"|session[_-]?tokens?|bearer|cookies?|set[_-]cookie|credentials?"
    r")$",
    re.IGNORECASE,
)

#: Credentials recognisable by their shape: ``Bearer <token>`` and OpenAI-style keys.
_SHAPES = (
    r"(?P<scheme>\b[Bb]earer\s+)[A-Za-z0-9\-._~+/]{8,}=*",
    r"\bsk-[A-Za-z0-9_\-]{16,}",
)

#: ``scheme://user:password@`` and ``?key=value`` / ``&key=value`` of a URL.
_URL_PASSWORD = re.compile(r"^(?P<user>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@]*):[^/?#]*@")
_URL_PARAMETER = re.compile(r"(?P<sep>[?&])(?P<key>[^=&#]+)=[^&#]*")

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_text_pattern: re.Pattern[str] = re.compile("|".join(_SHAPES))
_bytes_pattern: re.Pattern[bytes] | None = None


def _install(secrets: frozenset[str]) -> None:
    """Make ``secrets`` the registered set: the patterns first, then the set that
    ``has_secret`` reads, so a reader never finds a secret the patterns do not know."""
    global _secrets, _text_pattern, _bytes_pattern
    ordered = sorted(secrets, key=len, reverse=True)  # longest first: no partial leftovers
    values = [re.escape(s) for s in ordered]
    _text_pattern = re.compile("|".join([*values, *_SHAPES]))
    _bytes_pattern = (
        re.compile(b"|".join(re.escape(s.encode()) for s in ordered)) if ordered else None
    )
    _secrets = secrets


def register_secret(value: str | bytes | SecretStr | SecretBytes | None) -> bool:
    """Treat ``value`` as a secret from now on, in this process; True if it was registered
    (empty and short values are not, see ``MIN_SECRET_LENGTH``). Safe to repeat."""
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="ignore")
    if not value or len(value) < MIN_SECRET_LENGTH:
        return False
    with _lock:
        if value not in _secrets:
            _install(_secrets | {value})
    return True


def register_settings(settings: BaseModel) -> int:
    """Register every ``SecretStr``/``SecretBytes`` in ``settings`` (nested models, lists
    and dicts included); returns how many values were registered."""
    return sum(register_secret(value) for value in _secret_values(settings))


def _secret_values(value: Any) -> Iterable[SecretStr | SecretBytes]:
    if isinstance(value, SecretStr | SecretBytes):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_values(getattr(value, name, None))
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secret_values(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _secret_values(item)


def secret_count() -> int:
    """How many secret values are registered in this process (for status and tests)."""
    return len(_secrets)


@lru_cache(maxsize=4096)
def sensitive_key(key: str) -> bool:
    """Whether a field named ``key`` holds a secret by its name alone."""
    return bool(_SENSITIVE_KEY.search(key.strip()))


def _replace(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    return f"{scheme}{REDACTED}" if scheme else REDACTED


def redact_text(text: str) -> str:
    """``text`` with registered secrets and credential shapes replaced by ``[redacted]``."""
    if not has_secret(text):
        return text
    return _text_pattern.sub(_replace, text)


def has_secret(text: str) -> bool:
    """Whether ``redact_text`` would change ``text``. Fast when it would not (the common
    case, e.g. on every span): plain substring tests first, the expression only then."""
    if not text:
        return False
    for secret in _secrets:
        if secret in text:
            return True
    if "earer" in text or "sk-" in text:  # what every credential shape contains
        return _text_pattern.search(text) is not None
    return False


def contains_secret(data: bytes | str) -> bool:
    """Whether ``data`` (e.g. a serialized tool result) contains a *registered* value."""
    pattern = _bytes_pattern
    if pattern is None or not data:
        return False
    if isinstance(data, str):
        data = data.encode()
    return pattern.search(data) is not None


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or a query parameter such as
    ``?password=``) replaced by ``[redacted]``; user, host, path and the rest stay as
    written, so a message about a connection can still say which one."""
    url = _URL_PASSWORD.sub(rf"\g<user>:{REDACTED}@", url, count=1)

    def query(match: re.Match[str]) -> str:
        key = match.group("key")
        return f"{match.group('sep')}{key}={REDACTED}" if sensitive_key(unquote(key)) else match[0]

    return _URL_PARAMETER.sub(query, url)


def _masked(value: Any) -> Any:
    """The stand-in for the value of a sensitive field (None and flags say nothing)."""
    return value if value is None or isinstance(value, bool) else REDACTED


def redact_value(value: Any) -> Any:
    """``value`` with secrets removed from every string in it (dicts, lists, tuples);
    a dict entry whose key is sensitive is masked whole."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: _masked(v) if isinstance(k, str) and sensitive_key(k) else redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v) for v in value)
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
        return redact_text(text) if has_secret(text) else value
    return value


def redact_details(details: Mapping[str, str]) -> dict[str, str]:
    """A string map (ErrorInfo metadata, ``Error.details``) safe to hand out."""
    return {k: REDACTED if sensitive_key(k) else redact_text(v) for k, v in details.items()}


_JSON_NATIVE = (str, int, float, bool, type(None), dict, list, tuple)


def redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every field of a log event, redacted. Values JSON cannot
    render are rendered here (``repr``, as the JSON renderer would) so they are scrubbed too.
    """
    out: dict[str, Any] = {}
    for key, value in event.items():
        if sensitive_key(key):
            out[key] = _masked(value)
        elif isinstance(value, _JSON_NATIVE):
            out[key] = redact_value(value)
        else:
            out[key] = redact_text(repr(value))
    return out


# -- spans ---------------------------------------------------------------------------------


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Redacted span/event attributes, or None when nothing needs redacting (decided
    first, with one search over all the strings, without copying: the common case)."""
    if not attributes or not _dirty(attributes):
        return None
    return {key: _clean(key, value) for key, value in attributes.items()}


def _dirty(attributes: Mapping[str, Any]) -> bool:
    texts: list[str] = []
    for key, value in attributes.items():
        if sensitive_key(key) and _masked(value) is not value:
            return True
        if type(value) is str:
            texts.append(value)
        elif isinstance(value, _SEQUENCES):
            texts.extend(v for v in value if type(v) is str)
    return has_secret("\x00".join(texts))  # NUL: no shape spans two values


def _clean(key: str, value: Any) -> Any:
    if sensitive_key(key):
        return _masked(value)
    if type(value) is str:
        return redact_text(value)
    if isinstance(value, _SEQUENCES):
        return tuple(redact_text(v) if type(v) is str else v for v in value)
    return value


_SEQUENCES = (list, tuple)


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` itself when it holds no secret (the common case: a substring test per
    string), else a copy whose name, attributes, events and status description are
    redacted."""
    attributes = _attributes(span.attributes)
    events: list[Event] = []
    events_changed = False
    for event in span.events:
        event_attributes = _attributes(event.attributes)
        if event_attributes is None and not has_secret(event.name):
            events.append(event)
            continue
        events_changed = True
        events.append(
            Event(
                redact_text(event.name),
                event_attributes if event_attributes is not None else event.attributes,
                timestamp=event.timestamp,
            )
        )
    status = span.status
    description = status.description or ""
    dirty_name, dirty_status = has_secret(span.name), has_secret(description)
    if attributes is None and not events_changed and not dirty_name and not dirty_status:
        return span
    if dirty_status:
        status = Status(status.status_code, redact_text(description))
    return ReadableSpan(
        name=redact_text(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes if attributes is not None else span.attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "contains_secret",
    "has_secret",
    "redact_details",
    "redact_event",
    "redact_span",
    "redact_text",
    "redact_url",
    "redact_value",
    "register_secret",
    "register_settings",
    "secret_count",
    "sensitive_key",
]
