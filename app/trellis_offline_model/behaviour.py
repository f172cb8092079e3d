"""What the offline model does instead of its rules for one request: the hook that lets
a test or a benchmark make the development model answer a given text or plan, stream
given deltas, fail with an HTTP status, stall, or break its stream, on cue.

The server asks ``ModelState.next_behaviour(body)`` before each chat request; None (the
default) means "answer by the rules". Queues of behaviours (what tests script) live
with the tests, not in the shipped model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The ``data:`` of a broken stream event: a chunk cut off mid-JSON, as a proxy that
#: truncates a stream or a provider bug sends it.
BROKEN_EVENT = '{"id": "chatcmpl-broken", "object": "chat.completion.chunk", "choices": [{"del'


@dataclass(frozen=True)
class Behaviour:
    """What to do instead of the rules for one request."""

    #: Emit this text instead of the rules' output (streamed like any output).
    text: str | None = None
    #: Serve these nodes (``node_id``, ``tool``, ``args``, ``depends_on``) as the plan,
    #: in the format the request asks for (JSON Lines, a ``{"nodes"}`` document, tool
    #: calls), paced like the rules' plans.
    plan: tuple[dict[str, Any], ...] | None = None
    #: Stream exactly these ``delta`` objects, one chunk each (after the role chunk), as
    #: a provider would: text, ``tool_calls`` pieces keyed by ``index``, a ``refusal``.
    deltas: tuple[dict[str, Any], ...] | None = None
    #: The last chunk's ``finish_reason`` (None: ``tool_calls`` after tool calls, else
    #: ``stop``), e.g. ``length`` for an output cut by the token limit.
    finish_reason: str | None = None
    #: Answer with this HTTP error status (OpenAI-shaped error body) instead.
    status: int | None = None
    message: str = "scripted failure"
    #: ``retry-after-ms`` header on an error, so client retries are quick in tests.
    retry_after_ms: int | None = None
    #: Wait this long before answering (to trigger client timeouts).
    stall_seconds: float = 0.0
    #: Stream this many pieces of the output, then the event ``broken_event`` (not
    #: JSON), then end the response; None streams the whole output.
    break_after_pieces: int | None = None
    broken_event: str = BROKEN_EVENT
