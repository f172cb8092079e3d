"""The HTTP face of the rule model: OpenAI's chat completions API, streamed or not.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/embeddings``
(``generating.vectors``, float or base64) and ``POST /v1/chat/completions``
(``stream`` true: SSE ``data: {chunk}`` lines ending with ``data: [DONE]``, plus a final
usage chunk with empty ``choices`` when ``stream_options.include_usage``; false: one
``chat.completion``; a scripted broken stream ends with one ``data:`` line that is not
JSON, as a truncating proxy or a faulty provider sends it). Whatever model a request
names, the answer comes from the rules and says so in ``model`` (a model tool's request
for structured output is answered by ``generating``). ``start_offline_model`` embeds it
in any asyncio program.

The chunks have the shapes of OpenAI's streaming API (checked against the ``openai``
package's own types in the tests): a first delta with the ``role``; text as ``content``
pieces; tool calls as deltas keyed by ``index``, the first with the call's ``id``,
``type`` and function ``name`` (arguments ``""``), then argument fragments; then an empty
delta with ``finish_reason`` (``tool_calls`` or ``stop``).

Pacing (``ModelState``, changeable while serving): ``delay_ms`` before every streamed
piece (a slow model); ``line_delay_ms``: each node of a *plan* (a JSON Lines line, a
node object of a ``{"nodes"}`` document, a tool call) takes that long to stream, its
pieces spread evenly over it, so a plan's nodes arrive one per ``line_delay_ms``, token
by token, as from a model that writes a node at a steady pace; ``on_plan_node`` is
called with each node's index in the reply and its text (the line, the object, the
call's arguments) right after its last piece was written, for benchmarks that time what
happens downstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from trellis.runtime.logs import get_logger
from trellis_offline_model import generating
from trellis_offline_model.behaviour import Behaviour
from trellis_offline_model.conversation import message_text
from trellis_offline_model.rules import MODEL_ID, Reply, as_text, render, respond
from trellis_offline_model.tokens import count_tokens, pieces

log = get_logger(__name__)

MODEL_CARD = {
    "id": MODEL_ID,
    "object": "model",
    "created": 0,
    "owned_by": "trellis",
    "description": (
        "Trellis offline rules model: rule-based and deterministic, not an LLM. It plans "
        "and joins Trellis runs by keyword rules so demos and tests need no network."
    ),
}

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "model_not_found"),
    408: ("timeout_error", None),
    429: ("requests", "rate_limit_exceeded"),
}

#: How many request bodies a server remembers for tests to inspect.
RECORDED_REQUESTS = 100


@dataclass(eq=False)  # one per server, told apart by identity
class ModelState:
    """Per-server state: stream pacing, behaviours on cue, the requests seen."""

    #: Pause before each streamed piece.
    delay_ms: float = 0.0
    #: How long each node of a plan (a line, a node object, a tool call) takes to stream.
    line_delay_ms: float = 0.0
    #: Called with (index, text) of each plan node once it has been written to the stream.
    on_plan_node: Callable[[int, str], None] | None = None
    #: What to do instead of the rules for the next request, given its body.
    next_behaviour: Callable[[Mapping[str, Any]], Behaviour | None] = lambda body: None
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECORDED_REQUESTS))


STATE = web.AppKey("state", ModelState)


def error_response(
    status: int, message: str, *, retry_after_ms: int | None = None, param: str | None = None
) -> web.Response:
    """An OpenAI-shaped error body, so the openai client raises the matching exception."""
    kind, code = _ERROR_TYPES.get(status, ("server_error", None))
    headers = {"retry-after-ms": str(retry_after_ms)} if retry_after_ms else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [MODEL_CARD]})


async def get_model(request: web.Request) -> web.Response:
    if request.match_info["model"] != MODEL_ID:
        return error_response(404, f"The model {request.match_info['model']!r} does not exist")
    return web.json_response(MODEL_CARD)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(
    delta_or_message: dict[str, Any], finish: str | None, *, stream: bool
) -> dict[str, Any]:
    key = "delta" if stream else "message"
    return {"index": 0, key: delta_or_message, "logprobs": None, "finish_reason": finish}


def _parse(body: Any) -> tuple[list[Mapping[str, Any]], str | None]:
    """The messages of a request body, or an error message."""
    if not isinstance(body, Mapping):
        return [], "The request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return [], "'messages' must be a non-empty array"
    if not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        return [], "every message must be an object with a 'role'"
    return messages, None


async def _scripted_failure(behaviour: Behaviour) -> web.Response | None:
    """What a test scripted for this request before any answer: a stall, then an error."""
    if behaviour.stall_seconds:
        await asyncio.sleep(behaviour.stall_seconds)
    if behaviour.status:
        return error_response(
            behaviour.status, behaviour.message, retry_after_ms=behaviour.retry_after_ms
        )
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "The request body is not valid JSON")
    _, problem = _parse(body)
    if problem:
        return error_response(400, problem, param="messages")
    state.requests.append(body)

    behaviour = state.next_behaviour(body) or Behaviour()
    if (failed := await _scripted_failure(behaviour)) is not None:
        return failed
    if behaviour.plan is not None:
        reply = render(body, list(behaviour.plan))
    elif behaviour.text is not None:
        reply = as_text(body, behaviour.text)
    elif behaviour.deltas is not None:
        reply = Reply()
    elif (structured := generating.answer(body)) is not None:
        reply = as_text(body, structured)  # a model tool's structured output
    else:
        reply = respond(body)
    written = _written(reply, behaviour)
    usage = _usage(prompt_tokens(body), count_tokens(written))
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": MODEL_ID,
        "system_fingerprint": None,
    }
    calls = [_call(i, c.name, c.arguments) for i, c in enumerate(reply.tool_calls)]
    finish = behaviour.finish_reason or ("tool_calls" if _calls_in(reply, behaviour) else "stop")
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        elif message["content"] is None:
            message["content"] = ""
        return web.json_response(
            {
                **head,
                "object": "chat.completion",
                "choices": [_choice(message, finish, stream=False)],
                "usage": usage,
            }
        )
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
    stream = _Stream(request, state, head, usage if include_usage else None, behaviour)
    return await stream.run(reply, finish)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens of a (valid) chat request: the messages' text, tool calls, and
    the tools or response schema it sends."""
    messages: list[Mapping[str, Any]] = body["messages"]
    total = sum(count_tokens(message_text(m)) for m in messages)
    for message in messages:
        if message.get("tool_calls"):
            total += count_tokens(json.dumps(message["tool_calls"]))
    for key in ("tools", "response_format"):
        if body.get(key):
            total += count_tokens(json.dumps(body[key]))
    return total


def _written(reply: Reply, behaviour: Behaviour) -> str:
    """Everything the reply writes (what its completion tokens count)."""
    out = reply.text + "".join(c.name + c.arguments for c in reply.tool_calls)
    for delta in behaviour.deltas or ():
        out += str(delta.get("content") or "") + str(delta.get("refusal") or "")
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            out += str(function.get("name") or "") + str(function.get("arguments") or "")
    return out


def _calls_in(reply: Reply, behaviour: Behaviour) -> bool:
    return bool(reply.tool_calls) or any(d.get("tool_calls") for d in behaviour.deltas or ())


def _call(index: int, name: str, arguments: str) -> dict[str, Any]:
    """A tool call as its first streamed delta has it (with ``arguments`` when whole)."""
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _fragment(index: int, piece: str) -> dict[str, Any]:
    """The delta of a piece of call ``index``'s arguments."""
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


class _Stream:
    """One SSE response: the role chunk, the reply's pieces, the finish, the usage."""

    def __init__(
        self,
        request: web.Request,
        state: ModelState,
        head: dict[str, Any],
        usage: dict[str, int] | None,
        behaviour: Behaviour,
    ) -> None:
        self._request = request
        self._state = state
        self._usage = usage
        self._behaviour = behaviour
        self._base = {**head, "object": "chat.completion.chunk"}
        if usage is not None:
            self._base["usage"] = None  # as OpenAI does: usage only on the last chunk
        self._response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self._sent = 0

    async def _send(self, payload: object) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await self._response.write(f"data: {data}\n\n".encode())

    async def _delta(self, delta: dict[str, Any], finish: str | None = None) -> None:
        await self._send({**self._base, "choices": [_choice(delta, finish, stream=True)]})

    @property
    def _broken(self) -> bool:
        return self._sent == self._behaviour.break_after_pieces

    async def _paced(self, deltas: list[dict[str, Any]]) -> None:
        """Send ``deltas`` spread over ``line_delay_ms`` (on a schedule, so the sleeps'
        overshoot does not add up), each after ``delay_ms``."""
        loop = asyncio.get_running_loop()
        step = self._state.line_delay_ms / 1000 / len(deltas) if deltas else 0
        started = loop.time()
        for i, delta in enumerate(deltas, 1):
            if self._broken:
                return
            if self._state.delay_ms:
                await asyncio.sleep(self._state.delay_ms / 1000)
            if step:
                await asyncio.sleep(max(0.0, started + i * step - loop.time()))
            await self._delta(delta)
            self._sent += 1

    async def _plain(self, text: str) -> None:
        for piece in pieces(text):
            if self._broken:
                return
            if self._state.delay_ms:
                await asyncio.sleep(self._state.delay_ms / 1000)
            await self._delta({"content": piece})
            self._sent += 1

    def _emitted(self, index: int, text: str) -> None:
        if self._state.on_plan_node is not None and not self._broken:
            self._state.on_plan_node(index, text)

    async def _text(self, reply: Reply) -> None:
        if not reply.units:
            await self._plain(reply.text)
            return
        for index, unit in enumerate(reply.units):
            await self._plain(reply.separators[index])
            await self._paced([{"content": piece} for piece in pieces(unit)])
            self._emitted(index, unit)
        await self._plain(reply.separators[-1])

    async def _tool_calls(self, reply: Reply) -> None:
        """Each call: its first delta (id, name), then its arguments' fragments, the
        whole paced like one node of a plan."""
        for index, call in enumerate(reply.tool_calls):
            if self._broken:
                return
            fragments = [_fragment(index, piece) for piece in pieces(call.arguments)]
            await self._paced([{"tool_calls": [_call(index, call.name, "")]}, *fragments])
            self._emitted(index, call.arguments)

    async def run(self, reply: Reply, finish: str) -> web.StreamResponse:
        await self._response.prepare(self._request)
        behaviour = self._behaviour
        try:
            calls = bool(reply.tool_calls) or _calls_in(reply, behaviour)
            await self._delta({"role": "assistant", "content": None if calls else ""})
            if behaviour.deltas is not None:
                for delta in behaviour.deltas:
                    if self._broken:
                        break
                    await self._delta(dict(delta))
                    self._sent += 1
            await self._text(reply)
            await self._tool_calls(reply)
            if behaviour.break_after_pieces is not None:  # a broken stream: no stop, no usage
                await self._send(behaviour.broken_event)  # as it is: not JSON
                await self._response.write_eof()
                return self._response
            await self._delta({}, finish)
            if self._usage is not None:
                await self._send({**self._base, "choices": [], "usage": self._usage})
            await self._send("[DONE]")
            await self._response.write_eof()
        except ConnectionResetError:
            log.debug("client went away mid-stream")
        return self._response


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI's embeddings API over ``generating.vectors``; behaviours apply as to chats."""
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "The request body is not valid JSON")
    parsed = generating.embedding_request(body)
    if isinstance(parsed, str):
        return error_response(400, parsed, param="input")
    texts, dimensions = parsed
    state.requests.append(body)
    behaviour = state.next_behaviour(body) or Behaviour()
    if (failed := await _scripted_failure(behaviour)) is not None:
        return failed
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, vector in enumerate(generating.vectors(texts, dimensions)):
        packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        embedding: object = packed if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(count_tokens(text) for text in texts)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": generating.EMBEDDING_MODEL_ID,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def create_app(state: ModelState | None = None) -> web.Application:
    app = web.Application()
    app[STATE] = state or ModelState()
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


@dataclass
class RunningModel:
    """A started offline model server; ``stop()`` it when done."""

    runner: web.AppRunner
    host: str
    port: int
    state: ModelState

    @property
    def base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` should be to reach this server."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    @property
    def requests(self) -> deque[dict[str, Any]]:
        """The latest request bodies received, oldest first (tests)."""
        return self.state.requests

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_offline_model(
    host: str = "127.0.0.1", port: int = 0, delay_ms: float = 0, line_delay_ms: float = 0
) -> RunningModel:
    """Serve the rule model on ``host:port`` (0 picks a free port) in the running loop.

    ``delay_ms`` paces every streamed piece, ``line_delay_ms`` every line of a plan.
    """
    state = ModelState(delay_ms=delay_ms, line_delay_ms=line_delay_ms)
    runner = web.AppRunner(create_app(state), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.create_server((host, port), reuse_port=False)
    try:
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound_port = sock.getsockname()[1]
    log.info("offline model serving", model=MODEL_ID, host=host, port=bound_port)
    return RunningModel(runner, host, bound_port, state)
