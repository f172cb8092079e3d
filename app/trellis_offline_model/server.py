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

Pacing (``ModelState``, changeable while serving): ``delay_ms`` before every streamed
piece (a slow model); ``line_delay_ms``: each line of a *plan* (the answer to a planning
prompt, scripted or not) takes that long to stream, its pieces spread evenly over it, so
a plan's nodes arrive one per ``line_delay_ms``, token by token, as from a model that
writes a node at a steady pace; ``on_plan_line`` is called with each plan line right
after its last piece was written, for benchmarks that time what happens downstream.
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
from trellis_offline_model.prompt import message_text
from trellis_offline_model.rules import MODEL_ID, is_plan_prompt, respond
from trellis_offline_model.tokens import count_tokens, lines, pieces

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
    #: How long each line of a plan (JSONL: one node per line) takes to stream.
    line_delay_ms: float = 0.0
    #: Called with each plan line once it has been written to the stream.
    on_plan_line: Callable[[str], None] | None = None
    #: What to do instead of the rules for the next request (``behaviour.py``).
    next_behaviour: Callable[[], Behaviour | None] = lambda: None
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "The request body is not valid JSON")
    messages, problem = _parse(body)
    if problem:
        return error_response(400, problem, param="messages")
    state.requests.append(body)

    behaviour = state.next_behaviour() or Behaviour()
    if behaviour.stall_seconds:
        await asyncio.sleep(behaviour.stall_seconds)
    if behaviour.status:
        return error_response(
            behaviour.status, behaviour.message, retry_after_ms=behaviour.retry_after_ms
        )
    text = behaviour.text
    if text is None:
        text = generating.answer(body) or respond(messages)
    usage = _usage(sum(count_tokens(message_text(m)) for m in messages), count_tokens(text))
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": MODEL_ID,
        "system_fingerprint": None,
    }
    if not body.get("stream"):
        return web.json_response(
            {
                **head,
                "object": "chat.completion",
                "choices": [_choice({"role": "assistant", "content": text}, "stop", stream=False)],
                "usage": usage,
            }
        )
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
    plan = is_plan_prompt(messages)
    return await _stream(
        request, state, head, text, usage if include_usage else None, plan=plan, behaviour=behaviour
    )


async def _stream(
    request: web.Request,
    state: ModelState,
    head: dict[str, Any],
    text: str,
    usage: dict[str, int] | None,
    *,
    plan: bool,
    behaviour: Behaviour,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    base = {**head, "object": "chat.completion.chunk"}
    if usage is not None:
        base["usage"] = None  # as OpenAI does: usage only on the last chunk

    async def send(payload: object) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [_choice(delta, finish, stream=True)]}

    sent = 0
    try:
        await send(chunk({"role": "assistant", "content": ""}))
        loop = asyncio.get_running_loop()
        for line in lines(text):
            line_pieces = pieces(line)
            # a paced plan line takes line_delay_ms, its pieces spread evenly over it
            # (on a schedule, so the sleeps' overshoot does not add up)
            step = state.line_delay_ms / 1000 / len(line_pieces) if plan and line_pieces else 0
            started = loop.time()
            for i, piece in enumerate(line_pieces, 1):
                if sent == behaviour.break_after_pieces:
                    break
                if state.delay_ms:
                    await asyncio.sleep(state.delay_ms / 1000)
                if step:
                    await asyncio.sleep(max(0.0, started + i * step - loop.time()))
                await send(chunk({"content": piece}))
                sent += 1
            if sent == behaviour.break_after_pieces:
                break
            if plan and state.on_plan_line is not None:
                state.on_plan_line(line)
        if behaviour.break_after_pieces is not None:  # a broken stream: no stop, no usage
            await send(behaviour.broken_event)  # as it is: not JSON
            await response.write_eof()
            return response
        await send(chunk({}, "stop"))
        if usage is not None:
            await send({**base, "choices": [], "usage": usage})
        await send("[DONE]")
        await response.write_eof()
    except ConnectionResetError:
        log.debug("client went away mid-stream")
    return response


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
    behaviour = state.next_behaviour() or Behaviour()
    if behaviour.stall_seconds:
        await asyncio.sleep(behaviour.stall_seconds)
    if behaviour.status:
        return error_response(
            behaviour.status, behaviour.message, retry_after_ms=behaviour.retry_after_ms
        )
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
