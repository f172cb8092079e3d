"""Trellis offline rules model: a deterministic, RULE-BASED OpenAI-compatible server.

It is not an LLM, and not a sixth Trellis service: it is a development tool (hence
``app/``, beside the CLI) so the demo, the embedded stack, compose without a key and the
tests run the real ``openai`` client path (HTTP, SSE streaming, tool calls, usage,
retries) with no network and no weights. It reads requests as a real server would, never
the planner's prose:

- ``conversation`` the request read: the catalog from ``tools`` / ``response_format`` /
                   tool-spec JSON lines, the goal, earlier calls, outcomes, tool results
- ``planning``     goal + catalog -> nodes, by keyword rules (``matching``: any tool, by
                   its name and description, arguments from the goal)
- ``tool_rounds``  function calling: the plan one round of parallel calls at a time
- ``answering``    goal + outcomes -> a short deterministic answer (or the tools there are)
- ``rules``        a request in, a reply out: JSON Lines, a ``{"nodes"}`` document, tool
                   calls, or an answer
- ``generating`` model tools' structured output (one answer per item of a batch) and
                   the embeddings' vectors, made up by rules
- ``tokens``       the deterministic tokenizer used for usage and stream pieces
- ``behaviour``    what to do instead of the rules for one request, on cue (text, a plan,
                   raw deltas, HTTP errors, stalls, a broken stream); tests queue them
                   (tests/support/model_script.py)
- ``server``       the aiohttp app (OpenAI's chunk shapes) and ``start_offline_model``
"""
