"""Model tools (``kind: model``): a prompt made from the arguments, sent to a model.

The file gives the prompt as messages with ``{arg}`` placeholders (a string argument as
it is, any other value as compact JSON, a missing optional one as nothing), a model
(default: the planner's), ``max_output_tokens``, ``temperature`` and optionally an
``output_schema``: then the call asks for strict structured output and the node's
output is the parsed JSON object; without one it is the answer's text. The call is the
planner's ``Generate`` (``model_calls``), and the tokens it spent come back with the
output (``Metered``) or the error, so the node reports them and the run counts them.

Caching: a model tool is cached only when deterministic (``temperature: 0`` and a
``cache_ttl``; the file is refused otherwise), and its cache key covers the model and
the rendered prompt, not only the arguments (``cache_key_args``).

Batches (``batch`` in the file): one request carries every item's messages, each under
``## Item <n>`` with ``### <role>`` sections, after a system message asking for
``{"results": [...]}``, one answer per item in order, as strict structured output of an
array of the item's schema. An item the answer lacks or gets wrong (short array, an
answer not matching the schema, not JSON at all) is asked again on its own, once; a
failed request fails every item (the execution policy may retry them). The request's
tokens are split between the items by the size of their prompts (``UsageShare.weight``);
an item asked again adds that call's tokens to its share. The headings are read
literally by the offline model (``trellis_offline_model.generating``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence

from jsonschema import Draft202012Validator

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import to_struct
from trellis_toolgateway.tools import model_calls
from trellis_toolgateway.tools.base import (
    BatchItem,
    BatchTool,
    CallInfo,
    ItemResult,
    Json,
    Metered,
    Spec,
    ToolError,
    current_call,
)
from trellis_toolgateway.tools.config import PLACEHOLDERS
from trellis_toolgateway.tools.config import ModelTool as ModelDecl
from trellis_toolgateway.tools.model_calls import ModelAccess

TEXT_SCHEMA: dict[str, Json] = {"type": "string"}
ITEM_HEADING = "## Item {index}"
ROLE_HEADING = "### {role}"
BATCH_SYSTEM = (
    'You are given {count} independent requests, each under its own "## Item <n>" '
    'heading with its messages as "### <role>" sections. Answer each one on its own, as '
    'if it were the only request, and reply with one JSON object {{"results": [...]}} '
    "holding one answer per item, in item order."
)
#: Usage id suffix of an item asked again on its own after a batch.
SINGLE = "single"
BAD_OUTPUT = "MODEL_BAD_OUTPUT"


def _text(value: Json) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def output_name(tool: str) -> str:
    """The structured output's name as the API allows it (``[A-Za-z0-9_-]{1,64}``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", tool)[:64] or "output"


class ModelTool(BatchTool):
    """One ``kind: model`` entry of the tools file (see the module docstring)."""

    def __init__(self, decl: ModelDecl, access: ModelAccess | None) -> None:
        self._decl = decl
        self._access = access
        self._schema = decl.output_schema
        self._checker = Draft202012Validator(self._schema or TEXT_SCHEMA)
        first = decl.prompt[-1].content.splitlines()[0]
        self.spec = Spec(
            name=decl.name,
            description=decl.description or f"Asks a model: {first[:200]}",
            input_schema=decl.input_schema or {"type": "object"},
            output_schema=self._schema or TEXT_SCHEMA,
            timeout=decl.timeout,
            calls_model=True,
        )

    def render(self, args: dict[str, Json]) -> list[planner_pb2.ChatMessage]:
        """The prompt with the arguments in place of its placeholders."""

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            return _text(args[name]) if name in args else ""

        return [
            planner_pb2.ChatMessage(role=m.role, content=PLACEHOLDERS.sub(fill, m.content))
            for m in self._decl.prompt
        ]

    def cache_key_args(self, args: dict[str, Json]) -> Json:
        return {
            "model": self._decl.model or "",
            "messages": [[m.role, m.content] for m in self.render(args)],
            "output_schema": self._schema,
            "max_output_tokens": self._decl.max_output_tokens,
        }

    async def run(self, args: dict[str, Json]) -> Metered:
        return await self._single(self.render(args), current_call(), "")

    async def run_batch(self, items: Sequence[BatchItem]) -> list[ItemResult]:
        prompts = [self.render(item.args) for item in items]
        schema = {
            "type": "object",
            "properties": {"results": {"type": "array", "items": self._schema or TEXT_SCHEMA}},
            "required": ["results"],
            "additionalProperties": False,
        }
        shares = [
            model_calls.share(item.call, _size(prompt))
            for item, prompt in zip(items, prompts, strict=True)
        ]
        response = await self._generate(_batch_messages(prompts), schema, shares)
        usages = model_calls.usages(response.usage, len(items))
        if response.HasField("error"):
            return [model_calls.failure(response.error, self.spec.name, u) for u in usages]
        answers = _results(response.text)
        results: list[ItemResult] = []
        again: list[int] = []
        for index in range(len(items)):
            answer = answers[index] if index < len(answers) else _MISSING
            if answer is not _MISSING and self._checker.is_valid(answer):
                results.append(Metered(answer, usages[index]))
            else:
                results.append(None)
                again.append(index)
        singles = await asyncio.gather(
            *(self._again(prompts[i], items[i].call, usages[i]) for i in again)
        )
        for index, result in zip(again, singles, strict=True):
            results[index] = result
        return results

    async def _again(
        self, prompt: list[planner_pb2.ChatMessage], call: CallInfo, spent: common_pb2.Usage
    ) -> ItemResult:
        """An item the batch's answer lacked, asked on its own; its share is added."""
        try:
            single = await self._single(prompt, call, SINGLE)
        except ToolError as error:
            error.usage = model_calls.plus(spent, error.usage or common_pb2.Usage())
            return error
        return Metered(single.output, model_calls.plus(spent, single.usage))

    async def _single(
        self, prompt: list[planner_pb2.ChatMessage], call: CallInfo, suffix: str
    ) -> Metered:
        response = await self._generate(
            prompt, self._schema, [model_calls.share(call, _size(prompt), suffix)]
        )
        (usage,) = model_calls.usages(response.usage, 1)
        if response.HasField("error"):
            raise model_calls.failure(response.error, self.spec.name, usage)
        if self._schema is None:
            return Metered(response.text, usage)
        try:
            return Metered(json.loads(response.text), usage)
        except ValueError as error:
            raise ToolError(
                BAD_OUTPUT,
                f"{self.spec.name}: the model's answer is not JSON ({error})",
                details={"tool": self.spec.name},
                usage=usage,
            ) from None

    async def _generate(
        self,
        messages: list[planner_pb2.ChatMessage],
        schema: dict[str, Json] | None,
        shares: list[planner_pb2.UsageShare],
    ) -> planner_pb2.GenerateResponse:
        if self._access is None:
            raise model_calls.no_access(self.spec.name)
        decl = self._decl
        bound, within = model_calls.time_budget(self.spec.timeout)
        request = planner_pb2.GenerateRequest(
            messages=messages,
            model=decl.model or "",
            max_output_tokens=decl.max_output_tokens or 0,
            shares=shares,
            timeout=bound,
            tool=self.spec.name,
        )
        if schema is not None:
            request.output_schema.CopyFrom(to_struct(schema))
            request.output_name = output_name(self.spec.name)
        if decl.temperature is not None:
            request.temperature = decl.temperature
        return await self._access.generate(request, within=within)


_MISSING = object()


def _size(prompt: Sequence[planner_pb2.ChatMessage]) -> int:
    return sum(len(m.content) for m in prompt)


def _batch_messages(
    prompts: Sequence[list[planner_pb2.ChatMessage]],
) -> list[planner_pb2.ChatMessage]:
    parts = []
    for index, prompt in enumerate(prompts, 1):
        parts.append(ITEM_HEADING.format(index=index))
        for message in prompt:
            parts.append(ROLE_HEADING.format(role=message.role))
            parts.append(message.content)
        parts.append("")
    return [
        planner_pb2.ChatMessage(role="system", content=BATCH_SYSTEM.format(count=len(prompts))),
        planner_pb2.ChatMessage(role="user", content="\n".join(parts)),
    ]


def _results(text: str) -> list[Json]:
    """The answers of a batch reply (an empty list when it is not ``{"results": [...]}``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    results = value.get("results") if isinstance(value, dict) else None
    return results if isinstance(results, list) else []
