"""HTTP tools against a real local HTTP server (aiohttp on 127.0.0.1, port 0): templating
and encoding, allowed hosts, no redirects, size cap, error mapping, one pooled client,
and secrets that reach the server but never an output, an error or a log line."""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.service import http_client
from trellis_toolgateway.tools.base import ToolError
from trellis_toolgateway.tools.config import HttpTool as HttpDecl
from trellis_toolgateway.tools.http import HttpTool
from trellis_toolgateway.tools.secrets import REDACTED

SECRET = "s3cr3t-token-value"
ENV = {"API_TOKEN": SECRET}


@dataclass
class Server:
    base: str
    port: int
    seen: list[web.Request] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def offhost() -> AsyncIterator[Server]:
    """Another server a redirect points to; it must never be called."""
    server = Server("", 0)

    async def anything(request: web.Request) -> web.Response:
        server.seen.append(request)
        return web.json_response({"stolen": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner, port = await _start(app)
    server.base, server.port = f"http://127.0.0.1:{port}", port
    yield server
    await runner.cleanup()


@pytest.fixture
async def server(offhost: Server) -> AsyncIterator[Server]:
    state = Server("", 0)

    def seen(request: web.Request) -> None:
        state.seen.append(request)
        state.peers.append(request.transport.get_extra_info("peername"))

    async def item(request: web.Request) -> web.Response:
        seen(request)
        return web.json_response(
            {
                "id": request.match_info["id"],
                "raw_path": request.raw_path,
                "query": dict(request.query),
                "auth": request.headers.get("Authorization"),
            }
        )

    async def echo(request: web.Request) -> web.Response:
        seen(request)
        return web.json_response(
            {"body": await request.json(), "auth": request.headers.get("Authorization")}
        )

    async def text(request: web.Request) -> web.Response:
        seen(request)
        return web.Response(text=f"plain text, auth={request.headers.get('Authorization')}")

    async def status(request: web.Request) -> web.Response:
        seen(request)
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"echo {request.headers.get('Authorization')}")

    async def redirect(request: web.Request) -> web.Response:
        seen(request)
        raise web.HTTPFound(f"{offhost.base}/steal")

    async def big(request: web.Request) -> web.Response:
        seen(request)
        return web.Response(body=b"x" * 10_000, content_type="application/octet-stream")

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        seen(request)
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/items/{id}", item)
    app.router.add_post("/echo", echo)
    app.router.add_get("/text", text)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    runner, port = await _start(app)
    state.base, state.port = f"http://127.0.0.1:{port}", port
    yield state
    release.set()
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with http_client() as pooled:
        yield pooled


def make(client: httpx.AsyncClient, url: str, **fields) -> HttpTool:
    decl = HttpDecl(
        name=fields.pop("name", "api"),
        url=url,
        allowed_hosts=fields.pop("allowed_hosts", ["127.0.0.1"]),
        headers=fields.pop("headers", {"Authorization": "Bearer ${API_TOKEN}"}),
        **fields,
    )
    return HttpTool(decl, client, environ=ENV)


async def test_get_fills_the_url_encodes_values_and_sends_query_args(
    server: Server, client: httpx.AsyncClient
) -> None:
    tool = make(client, server.base + "/items/{id}", body_args=["q", "n", "flag"])
    assert tool.spec.input_schema["required"] == ["id"]
    out = await tool.run({"id": "../admin?x=1#@evil", "q": "a b", "n": 3, "flag": True})
    assert out["id"] == "../admin?x=1#@evil"  # one path segment, whatever it contains
    assert out["raw_path"].startswith("/items/..%2Fadmin%3Fx%3D1%23%40evil?")
    assert out["query"] == {"q": "a b", "n": "3", "flag": "true"}
    # The server got the real secret; the output shows it redacted.
    assert server.seen[-1].headers["Authorization"] == f"Bearer {SECRET}"
    assert out["auth"] == f"Bearer {REDACTED}"


async def test_a_query_in_the_url_template_is_kept_beside_query_args(
    server: Server, client: httpx.AsyncClient
) -> None:
    tool = make(client, server.base + "/items/{id}?units=metric&near={place}")
    out = await tool.run({"id": "7", "place": "a&b=c"})
    assert out["query"] == {"units": "metric", "near": "a&b=c"}  # one value, whatever it holds
    both = make(client, server.base + "/items/{id}?units=metric", body_args=["q"])
    assert (await both.run({"id": "7", "q": "x"}))["query"] == {"units": "metric", "q": "x"}


async def test_post_sends_a_json_body_and_text_responses_are_strings(
    server: Server, client: httpx.AsyncClient
) -> None:
    post = make(client, server.base + "/echo", method="POST", body_args=["item", "count"])
    out = await post.run({"item": {"name": "widget", "tags": ["a"]}, "count": 2})
    assert out == {
        "body": {"item": {"name": "widget", "tags": ["a"]}, "count": 2},
        "auth": f"Bearer {REDACTED}",
    }
    text = await make(client, server.base + "/text").run({})
    assert text == f"plain text, auth=Bearer {REDACTED}"


async def test_error_statuses_map_to_stable_codes_without_the_secret(
    server: Server, client: httpx.AsyncClient
) -> None:
    tool = make(client, server.base + "/status/{code}")
    for code, expected, retryable in [
        (503, "HTTP_5XX", True),
        (500, "HTTP_5XX", True),
        (404, "HTTP_4XX", False),
        (401, "HTTP_4XX", False),
    ]:
        with pytest.raises(ToolError) as raised:
            await tool.run({"code": code})
        error = raised.value
        assert (error.code, error.retryable, error.details["status"]) == (
            expected,
            retryable,
            str(code),
        )
        assert SECRET not in error.message and REDACTED in error.message  # body echoed it


async def test_connection_failures_are_retryable_unavailable(client: httpx.AsyncClient) -> None:
    runner, port = await _start(web.Application())
    await runner.cleanup()  # nothing listens there any more
    with pytest.raises(ToolError) as raised:
        await make(client, f"http://127.0.0.1:{port}/x").run({})
    assert (raised.value.code, raised.value.retryable) == ("HTTP_UNAVAILABLE", True)
    assert SECRET not in raised.value.message


async def test_redirects_are_not_followed_off_host(
    server: Server, offhost: Server, client: httpx.AsyncClient
) -> None:
    with pytest.raises(ToolError) as raised:
        await make(client, server.base + "/redirect").run({})
    assert raised.value.code == "HTTP_REDIRECT"
    assert offhost.seen == []


async def test_only_allowed_hosts_are_called(
    server: Server, offhost: Server, client: httpx.AsyncClient
) -> None:
    tool = make(
        client,
        "http://{host}:{port}/items/1",
        allowed_hosts=[f"127.0.0.1:{server.port}"],
    )
    assert (await tool.run({"host": "127.0.0.1", "port": server.port}))["id"] == "1"
    for host, port in [
        ("localhost", server.port),
        ("127.0.0.1", offhost.port),
        ("evil.example", 80),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            await tool.run({"host": host, "port": port})
        assert raised.value.reason == "HOST_NOT_ALLOWED"
    assert offhost.seen == []
    # A value cannot smuggle a userinfo or another host into the authority either.
    sneaky = make(client, "http://127.0.0.1:{port}/items/1", allowed_hosts=["127.0.0.1"])
    with pytest.raises(InvalidArgument):
        await sneaky.run({"port": f"{server.port}@evil.example"})


async def test_response_size_is_capped(server: Server, client: httpx.AsyncClient) -> None:
    tool = make(client, server.base + "/big", max_response_bytes=1000)
    with pytest.raises(ToolError) as raised:
        await tool.run({})
    assert raised.value.code == "HTTP_RESPONSE_TOO_LARGE"
    assert len(await make(client, server.base + "/big").run({})) == 10_000


async def test_slow_server_is_bounded_by_the_tool_timeout(
    server: Server, client: httpx.AsyncClient
) -> None:
    with pytest.raises(ToolError) as raised:
        await make(client, server.base + "/slow", timeout=0.3).run({})
    assert (raised.value.code, raised.value.retryable) == ("HTTP_UNAVAILABLE", True)


async def test_tools_share_one_pooled_connection(server: Server, client: httpx.AsyncClient) -> None:
    first = make(client, server.base + "/items/{id}", name="first")
    second = make(client, server.base + "/text", name="second")
    for _ in range(3):
        await first.run({"id": "1"})
        await second.run({})
    assert len(server.peers) == 6 and len(set(server.peers)) == 1  # one keep-alive connection


async def test_secrets_never_reach_logs(
    server: Server, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tool = make(client, server.base + "/status/{code}")
    with capture_logs() as events:
        await make(client, server.base + "/items/{id}").run({"id": "1"})
        with pytest.raises(ToolError):
            await tool.run({"code": 500})
    assert server.seen[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text
    assert SECRET not in repr(events)


async def test_without_a_client_the_tool_fails_cleanly() -> None:
    decl = HttpDecl(name="api", url="http://127.0.0.1/x", allowed_hosts=["127.0.0.1"])
    with pytest.raises(ToolError) as raised:
        await HttpTool(decl, None, environ={}).run({})
    assert raised.value.code == "HTTP_UNAVAILABLE"
