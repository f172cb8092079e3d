"""One event of a model's stream (or a whole answer, unstreamed), read: only the fields
the planner uses, each checked.

The fields: the model, the content text, the refusal text, the tool-call deltas (keyed by
``index``: the first delta of a call brings its ``id`` and function ``name``, later ones
fragments of its ``arguments``), the finish reasons and the usage.

The openai client builds each chunk without validating it, so an event that is JSON but
not a ``chat.completion.chunk`` (a number, ``"choices": 5``, a ``"usage"`` string) would
reach the planner as an AttributeError (an INTERNAL error for the caller) or as a wrong
token count in the ledger. ``read_chunk`` raises ``MalformedChunk`` for those, which
``model_errors`` reports as the model's fault (MODEL_BAD_RESPONSE). Fields the planner
does not read are not checked, so a provider's harmless deviations (no ``created``, an
unusual ``finish_reason`` value) still work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as AnswerChoice
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.completion_usage import PromptTokensDetails


class MalformedChunk(ValueError):
    """An event of the model's stream that the planner cannot read."""


@dataclass(frozen=True)
class ChunkUsage:
    """The token counts of a stream's usage chunk."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one streamed tool call: ``index`` says which call it belongs to."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChunkParts:
    """What the planner takes from one chunk."""

    model: str
    text: str
    finish_reasons: tuple[str, ...]
    usage: ChunkUsage | None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    refusal: str = ""

    @property
    def output(self) -> bool:
        """Whether the chunk carries anything the model wrote."""
        return bool(self.text or self.tool_calls or self.refusal)


def _field(owner: object, name: str, kind: type, where: str) -> Any:
    """``owner.name`` if it is missing, null or of ``kind``; else MalformedChunk."""
    value = getattr(owner, name, None)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise MalformedChunk(f"{where}{name} is {type(value).__name__}, not {kind.__name__}")


def _count(owner: object, name: str, where: str) -> int:
    value = _field(owner, name, int, where) or 0
    if value < 0:
        raise MalformedChunk(f"{where}{name} is negative ({value})")
    return value


def _object(value: object, kind: type, where: str) -> None:
    """The client turns every JSON object into its model class: anything else is wrong."""
    if not isinstance(value, kind):
        raise MalformedChunk(f"{where} is {type(value).__name__}, not an object")


def _usage(usage: object) -> ChunkUsage | None:
    if usage is None:
        return None
    _object(usage, CompletionUsage, "usage")
    cached = 0
    if (details := getattr(usage, "prompt_tokens_details", None)) is not None:
        _object(details, PromptTokensDetails, "usage.prompt_tokens_details")
        cached = _count(details, "cached_tokens", "usage.prompt_tokens_details.")
    return ChunkUsage(
        input_tokens=_count(usage, "prompt_tokens", "usage."),
        output_tokens=_count(usage, "completion_tokens", "usage."),
        cached_input_tokens=cached,
    )


def _tool_calls(delta: ChoiceDelta, where: str) -> list[ToolCallDelta]:
    calls = _field(delta, "tool_calls", list, where) or []
    out = []
    for number, call in enumerate(calls):
        at = f"{where}tool_calls[{number}]"
        _object(call, ChoiceDeltaToolCall, at)
        index = _field(call, "index", int, f"{at}.")
        if index is None or index < 0:
            raise MalformedChunk(f"{at}.index is missing or negative")
        name = arguments = ""
        if (function := getattr(call, "function", None)) is not None:
            _object(function, ChoiceDeltaToolCallFunction, f"{at}.function")
            name = _field(function, "name", str, f"{at}.function.") or ""
            arguments = _field(function, "arguments", str, f"{at}.function.") or ""
        call_id = _field(call, "id", str, f"{at}.") or ""
        out.append(ToolCallDelta(index, call_id, name, arguments))
    return out


def read_chunk(chunk: object) -> ChunkParts:
    """The model name, text, refusal, tool-call deltas, finish reasons and usage of one
    chunk; MalformedChunk if any of them is not what the chat completions API sends."""
    if not isinstance(chunk, ChatCompletionChunk):
        raise MalformedChunk(f"an event is {type(chunk).__name__}, not a chunk object")
    model = _field(chunk, "model", str, "") or ""
    choices = _field(chunk, "choices", list, "") or []
    text: list[str] = []
    refusal: list[str] = []
    calls: list[ToolCallDelta] = []
    finish_reasons: list[str] = []
    for index, choice in enumerate(choices):
        where = f"choices[{index}]."
        _object(choice, Choice, f"choices[{index}]")
        delta = getattr(choice, "delta", None)
        if delta is not None:
            _object(delta, ChoiceDelta, f"{where}delta")
            if content := _field(delta, "content", str, f"{where}delta."):
                text.append(content)
            if refused := _field(delta, "refusal", str, f"{where}delta."):
                refusal.append(refused)
            calls.extend(_tool_calls(delta, f"{where}delta."))
        finish = _field(choice, "finish_reason", str, where)
        if finish:
            finish_reasons.append(finish)
    usage = _usage(getattr(chunk, "usage", None))
    return ChunkParts(
        model,
        "".join(text),
        tuple(finish_reasons),
        usage,
        tuple(calls),
        "".join(refusal),
    )


def read_completion(answer: object) -> ChunkParts:
    """``read_chunk`` for an unstreamed answer (a ``chat.completion``): its model, the text
    of its choices, their finish reasons and its usage, each checked the same way."""
    if not isinstance(answer, ChatCompletion):
        raise MalformedChunk(f"the answer is {type(answer).__name__}, not a completion object")
    model = _field(answer, "model", str, "") or ""
    choices = _field(answer, "choices", list, "") or []
    text: list[str] = []
    finish_reasons: list[str] = []
    for index, choice in enumerate(choices):
        where = f"choices[{index}]."
        _object(choice, AnswerChoice, f"choices[{index}]")
        message = getattr(choice, "message", None)
        if message is not None:
            _object(message, ChatCompletionMessage, f"{where}message")
            if content := _field(message, "content", str, f"{where}message."):
                text.append(content)
        finish = _field(choice, "finish_reason", str, where)
        if finish:
            finish_reasons.append(finish)
    usage = _usage(getattr(answer, "usage", None))
    return ChunkParts(model, "".join(text), tuple(finish_reasons), usage)
