"""Embed tools (``kind: embed``): a text or a list of texts to vectors.

The contract is fixed: ``{"input": "text" | ["text", ...]}`` (at most 2,048 texts) to
``{"vectors": [[...], ...], "model": ...}``, one vector per text. The call is the
planner's ``Embed`` (``model_calls``) with the tool's model (default: the planner's
embedding model) and ``dimensions``; the tokens it spent come back with the output.
Embeddings are deterministic, so a ``cache_ttl`` caches them (keyed by the texts, the
model and the dimensions).

Batches (``batch`` in the file): the texts of every item go in one embeddings request
(several when they are more than the API's 2,048, each item's texts kept together),
and the vectors are handed back to their items; the request's tokens are split between
the items by the size of their texts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from trellis.planner.v1 import planner_pb2
from trellis_toolgateway.tools import model_calls
from trellis_toolgateway.tools.base import (
    BatchItem,
    BatchTool,
    CallInfo,
    ItemResult,
    Json,
    Metered,
    Spec,
    current_call,
)
from trellis_toolgateway.tools.config import EMBED_INPUT_SCHEMA, EMBED_OUTPUT_SCHEMA
from trellis_toolgateway.tools.config import EmbedTool as EmbedDecl
from trellis_toolgateway.tools.model_calls import ModelAccess

#: The most texts one embeddings request carries (the API's limit).
MAX_INPUTS = 2048


def texts(args: dict[str, Json]) -> list[str]:
    value = args["input"]
    return [value] if isinstance(value, str) else list(value)


class EmbedTool(BatchTool):
    """One ``kind: embed`` entry of the tools file (see the module docstring)."""

    def __init__(self, decl: EmbedDecl, access: ModelAccess | None) -> None:
        self._decl = decl
        self._access = access
        self.spec = Spec(
            name=decl.name,
            description=decl.description or "Embeds a text, or a list of texts, as vectors.",
            input_schema=EMBED_INPUT_SCHEMA,
            output_schema=EMBED_OUTPUT_SCHEMA,
            timeout=decl.timeout,
            calls_model=True,
        )

    def cache_key_args(self, args: dict[str, Json]) -> Json:
        return {"input": args["input"], "model": self._decl.model or "", "d": self._decl.dimensions}

    async def run(self, args: dict[str, Json]) -> Metered:
        (result,) = await self._request([texts(args)], [current_call()])
        if isinstance(result, Metered):
            return result
        raise result

    async def run_batch(self, items: Sequence[BatchItem]) -> list[ItemResult]:
        groups, chunk, size = [], [], 0
        for index, item in enumerate(items):
            count = len(texts(item.args))
            if chunk and size + count > MAX_INPUTS:
                groups.append(chunk)
                chunk, size = [], 0
            chunk.append(index)
            size += count
        groups.append(chunk)
        answers = await asyncio.gather(
            *(
                self._request([texts(items[i].args) for i in group], [items[i].call for i in group])
                for group in groups
            )
        )
        results: list[ItemResult] = [None] * len(items)
        for group, answer in zip(groups, answers, strict=True):
            for index, result in zip(group, answer, strict=True):
                results[index] = result
        return results

    async def _request(self, inputs: list[list[str]], calls: list[CallInfo]) -> list[ItemResult]:
        """One Embed for the texts of several calls; each call's vectors or error."""
        if self._access is None:
            raise model_calls.no_access(self.spec.name)
        bound, within = model_calls.time_budget(self.spec.timeout)
        request = planner_pb2.EmbedRequest(
            inputs=[text for group in inputs for text in group],
            model=self._decl.model or "",
            shares=[
                model_calls.share(call, sum(map(len, group)))
                for call, group in zip(calls, inputs, strict=True)
            ],
            timeout=bound,
            tool=self.spec.name,
            dimensions=self._decl.dimensions or 0,
        )
        response = await self._access.embed(request, within=within)
        usages = model_calls.usages(response.usage, len(calls))
        if response.HasField("error"):
            return [model_calls.failure(response.error, self.spec.name, u) for u in usages]
        vectors = [list(e.values) for e in response.embeddings]
        results: list[ItemResult] = []
        start = 0
        for group, usage in zip(inputs, usages, strict=True):
            mine = vectors[start : start + len(group)]
            start += len(group)
            results.append(Metered({"vectors": mine, "model": usage.model}, usage))
        return results
