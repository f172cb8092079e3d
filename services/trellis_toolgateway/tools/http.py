"""Declarative HTTP tools: a method, a URL template and allowed hosts, from the tools file.

Arguments fill the URL's ``{placeholders}`` (percent-encoded, so a value cannot add a
path segment, a query or a userinfo part) and the rest of ``body_args`` go in the JSON
body (POST/PUT/PATCH) or the query string (GET/DELETE). The final URL's host must be in
``allowed_hosts``, and redirects are never followed, so a tool cannot be steered to
another host. Header values may reference environment variables (``${API_TOKEN}``):
they are resolved when the file loads, and their values are scrubbed from every output
and error message (a server that echoes the request cannot leak them). All tools share
the gateway's one pooled ``httpx.AsyncClient``.

Batches (``batch`` in the file): several calls are one POST to ``batch_url`` (else
``url``) whose JSON body is ``{"items": [<args>, ...]}``; the answer is
``{"results": [...]}`` in the same order, each an output or ``{"error": {"code",
"message", "retryable"}}`` (an object with only that key) failing that call alone. A
call the answer has no result for fails ``BATCH_RESULT_MISSING``; an answer without a
``results`` list fails the whole request (``HTTP_BAD_BATCH``).

Errors: 5xx and transport failures are retryable (``HTTP_5XX``, ``HTTP_UNAVAILABLE``),
4xx are not (``HTTP_4XX``); a redirect is ``HTTP_REDIRECT``. The body is read in chunks
and never kept past a cap: ``max_response_bytes`` (``HTTP_RESPONSE_TOO_LARGE``) or, when
smaller, the tool's output cap ``max_result_bytes`` (``OUTPUT_TOO_LARGE``, the code every
kind of tool fails with when its output is too large). The header secrets are also
registered with ``trellis.runtime.redact``, so logs, spans, errors and the result cache of
the whole process keep them out too.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence

import httpx

from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis_toolgateway.tools import config
from trellis_toolgateway.tools.base import BatchItem, BatchTool, ItemResult, Json, Spec, ToolError
from trellis_toolgateway.tools.config import PLACEHOLDERS
from trellis_toolgateway.tools.secrets import MissingSecret as MissingSecret
from trellis_toolgateway.tools.secrets import resolve

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SNIPPET = 200
#: Longest error code taken from a batch answer.
_MAX_CODE = 64


def _as_text(value: Json) -> str:
    """A JSON value as it goes in a URL or query string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def default_input_schema(decl: config.HttpTool) -> dict[str, Json]:
    """URL placeholders are required scalars; body arguments are optional JSON values."""
    scalar = {"type": ["string", "integer", "number", "boolean"]}
    properties: dict[str, Json] = {name: dict(scalar) for name in decl.url_params}
    properties.update({name: {} for name in decl.body_args})
    return {
        "type": "object",
        "properties": properties,
        "required": decl.url_params,
        "additionalProperties": False,
    }


class HttpTool(BatchTool):
    """One HTTP endpoint as a tool (see the module docstring)."""

    def __init__(
        self,
        decl: config.HttpTool,
        client: httpx.AsyncClient | None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._decl = decl
        self._client = client
        resolved = resolve(decl.headers, environ)  # MissingSecret: a file error at load
        self._headers = resolved.values
        self._secrets = resolved
        self.spec = Spec(
            name=decl.name,
            description=decl.description or f"HTTP {decl.method} {decl.url}",
            input_schema=decl.input_schema or default_input_schema(decl),
            output_schema=decl.output_schema or {},
            timeout=decl.timeout,
        )
        self._batch_url = decl.batch_url or decl.url

    def scrub(self, value: Json) -> Json:
        """``value`` with every header secret replaced by ``[redacted]``."""
        return self._secrets.scrub(value)

    def _error(self, code: str, message: str, *, retryable: bool = False, **details: str):
        return ToolError(
            code,
            self.scrub(message),
            retryable=retryable,
            details={"tool": self.spec.name, **details},
        )

    def _url(self, args: dict[str, Json]) -> httpx.URL:
        missing = [name for name in self._decl.url_params if name not in args]
        if missing:
            raise InvalidArgument(
                f"{self.spec.name} needs {', '.join(missing)} for its URL",
                reason="ARGS_INVALID",
                violations=[FieldViolation(f"args.{n}", "required by the URL") for n in missing],
                metadata={"tool": self.spec.name},
            )
        text = PLACEHOLDERS.sub(
            lambda m: urllib.parse.quote(_as_text(args[m.group(1)]), safe=""), self._decl.url
        )
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as error:
            raise self._not_allowed(f"not a valid URL: {error}") from None
        if url.scheme not in ("http", "https") or not self._host_allowed(url):
            raise self._not_allowed(f"host {quote(url.host)} is not in allowed_hosts")
        return url

    def _host_allowed(self, url: httpx.URL) -> bool:
        host = url.host.lower()
        port = url.port or (443 if url.scheme == "https" else 80)
        return host in self._decl.allowed_hosts or f"{host}:{port}" in self._decl.allowed_hosts

    def _not_allowed(self, message: str) -> InvalidArgument:
        return InvalidArgument(
            message,
            reason="HOST_NOT_ALLOWED",
            violations=[FieldViolation("args", message)],
            metadata={"tool": self.spec.name},
        )

    async def run(self, args: dict[str, Json]) -> Json:
        client = self._http()
        url = self._url(args)
        extra = {name: args[name] for name in self._decl.body_args if name in args}
        method = self._decl.method
        if method not in _BODY_METHODS and extra:
            # merged into the URL's own query: httpx's ``params`` would replace it
            url = url.copy_merge_params({k: _as_text(v) for k, v in extra.items()})
        request = client.build_request(
            method,
            url,
            headers=self._headers,
            json=extra if method in _BODY_METHODS else None,
            timeout=self.spec.timeout,
        )
        return await self._exchange(client, request, f"{method} {url.copy_with(query=None)}", 1)

    async def run_batch(self, items: Sequence[BatchItem]) -> list[ItemResult]:
        client = self._http()
        url = httpx.URL(self._batch_url)
        if not self._host_allowed(url):
            raise self._not_allowed(f"host {quote(url.host)} is not in allowed_hosts")
        request = client.build_request(
            "POST",
            url,
            headers=self._headers,
            json={"items": [item.args for item in items]},
            timeout=self.spec.timeout,
        )
        shown = f"POST {url.copy_with(query=None)}"
        answer = await self._exchange(client, request, shown, len(items))
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            raise self._error("HTTP_BAD_BATCH", f"{shown} answered no results list")
        return [self._item(results, index, len(items), shown) for index in range(len(items))]

    def _item(self, results: list[Json], index: int, count: int, shown: str) -> ItemResult:
        if index >= len(results):
            return self._error(
                "BATCH_RESULT_MISSING", f"{shown} answered {len(results)} results for {count} calls"
            )
        value = results[index]
        if isinstance(value, dict) and set(value) == {"error"} and isinstance(value["error"], dict):
            error = value["error"]
            code = str(error.get("code") or "TOOL_FAILED")[:_MAX_CODE]
            message = str(error.get("message") or f"{self.spec.name} failed")
            return self._error(code, message, retryable=error.get("retryable") is True)
        return value

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise self._error("HTTP_UNAVAILABLE", "the gateway has no HTTP client")
        return self._client

    async def _exchange(
        self, client: httpx.AsyncClient, request: httpx.Request, shown: str, items: int
    ) -> Json:
        """Send ``request`` and decode the answer (``items``: how many calls it carries,
        which multiplies the size caps)."""
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TransportError as error:
            raise self._error(
                "HTTP_UNAVAILABLE",
                f"{shown} failed: {type(error).__name__}: {error}",
                retryable=True,
            ) from None
        try:
            body = await self._read(response, shown, items)
        finally:
            await response.aclose()
        return self._decode(response, body, shown)

    async def _read(self, response: httpx.Response, shown: str, items: int = 1) -> bytes:
        status = response.status_code
        if 300 <= status < 400:
            raise self._error(
                "HTTP_REDIRECT",
                f"{shown} answered {status}; redirects are not followed",
                status=str(status),
            )
        kept = bytearray()
        cap, code = self._decl.max_response_bytes, "HTTP_RESPONSE_TOO_LARGE"
        if 0 < self.spec.max_result_bytes < cap:
            cap, code = self.spec.max_result_bytes, "OUTPUT_TOO_LARGE"
        cap *= items
        try:
            async for chunk in response.aiter_bytes():
                kept += chunk
                if len(kept) > cap:
                    raise self._error(
                        code,
                        f"{shown} answered more than {cap} bytes",
                        limit_bytes=str(cap),
                    )
        except httpx.TransportError as error:
            raise self._error(
                "HTTP_UNAVAILABLE", f"{shown} failed while reading: {error}", retryable=True
            ) from None
        if status >= 500:
            raise self._error(
                "HTTP_5XX",
                f"{shown} answered {status}: {self._snippet(kept)}",
                retryable=True,
                status=str(status),
            )
        if status >= 400:
            raise self._error(
                "HTTP_4XX", f"{shown} answered {status}: {self._snippet(kept)}", status=str(status)
            )
        return bytes(kept)

    @staticmethod
    def _snippet(body: bytes) -> str:
        return body[:_SNIPPET].decode("utf-8", errors="replace")

    def _decode(self, response: httpx.Response, body: bytes, shown: str) -> Json:
        text = body.decode(response.encoding or "utf-8", errors="replace")
        if "json" in response.headers.get("content-type", "").lower():
            try:
                return self.scrub(json.loads(text))
            except ValueError as error:
                raise self._error(
                    "HTTP_BAD_JSON", f"{shown} answered invalid JSON: {error}"
                ) from None
        return self.scrub(text)
